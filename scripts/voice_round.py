#!/usr/bin/env python
"""One round of GPU training for the embedded voice, shaped by the device tool's limits (docs/voice.md, step 6).

The GPU machine gets the working tree plus at most 64 MiB in all (the repository itself is ~37 MB), has none of
our data and no internet, and gives back at most 8 files of at most 16 MB. So a round has three halves:

    python scripts/voice_round.py bundle .gpu/bundle                 # here, on the CPU: ~1 hour on 2 cores
    python3 scripts/voice_round.py train .gpu/bundle $OUT --minutes 4    # on the GPU machine (carry .gpu/bundle)
    python scripts/voice_round.py unpack FILES_DIR runs/round           # here: what came back -> checkpoints

`bundle` makes the three synthetic corpora of docs/voice.md step 1 (the spliced one with a new `--splice-seed`, so
each round brings new sentences), encodes the second and third with the shipped codec's encoder (decoder-only codec
fine-tuning leaves the codes unchanged), splits the second into train / unseen-sentence eval exactly as the shipped
voice's runs did, and packs the codes (xz) with as many Ogg Opus clips for the codec as fit beside them, plus the
soundfile wheels the GPU image lacks. The first corpus is made only to define that eval split: its codes are what
the shipped voice trained on longest and are left behind to make room for clips.

`train` continues both halves of the shipped voice side by side on the one GPU for `--minutes`: the CSM (the
hyperparameters of docs/voice.md run f) and the codec's decoder side (decoder-only, as codec run 3). It writes four
files: csm.part-0, csm.part-1 (the CSM in float16, split to fit the 16 MB limit), codec.safetensors and meta.tar
(configs, logs, the commands). `unpack` reassembles them into checkpoint folders that `csm eval` and
`scripts/package_voice.py` read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOICE = REPO / "src" / "csm" / "assets" / "voice"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on the working tree plus carried paths
RETURN_LIMIT = 15 * 10**6  # under the 16 MB per returned file
WHEELS = ["soundfile==0.13.1", "cffi==2.0.0", "pycparser==3.12"]  # the GPU image (Python 3.12) has no soundfile
CSM_ARGS = ("--seq-len 384 --batch-size 64 --steps 1000000 --lr 5e-4 --min-lr 3e-5 --warmup-steps 100 "
            "--amortization 2 --code-noise 0.5 --eval-every 400 --save-every 0 --log-every 50")
CODEC_ARGS = ("--decoder-only --batch-size 32 --segment-frames 16 --lr 1e-4 --min-lr 1e-5 --warmup-steps 100 "
              "--steps 1000000 --eval-every 1000 --save-every 0 --log-every 100 --no-progress")


def run(cmd: list[str], **kw) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def tracked_bytes() -> int:
    """Size of the files git would send: the repository part of the device tool's 64 MiB."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    return sum((REPO / f).stat().st_size for f in files.decode().split("\0") if f and (REPO / f).is_file())


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# --- bundle (here) --------------------------------------------------------------------------------------------------


def make_corpus(out: Path, seed: int, num: int, jobs: int, *extra: str) -> None:
    if (out / "manifest.jsonl").is_file() and (out / "corpus.json").is_file():
        print(f"{out}: already made", flush=True)
        return
    run([sys.executable, str(REPO / "scripts" / "make_corpus.py"), str(out), "--num-utterances", str(num),
         "--seed", str(seed), "--jobs", str(jobs), *extra])


def prepare(manifest: Path, out: Path) -> None:
    run([sys.executable, "-m", "csm", "prepare", str(manifest), "-o", str(out), "--codec", str(VOICE / "codec"),
         "--tokenizer", str(VOICE / "tokenizer.json"), "--device", "cpu", "--no-progress"])


def slim_index(rows: list[dict]) -> str:
    """Index rows without what only the machine that encoded them can use (absolute audio paths)."""
    return "".join(json.dumps({k: v for k, v in r.items() if k != "audio"}) + "\n" for r in rows)


def read_index(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_prepared(src: Path, dst: Path, splits: dict[str, Path] | None = None) -> None:
    """Copy a prepared corpus's shards once; each split becomes a sub-folder with its own index and relative
    symlinks to the shared shards (what scripts/split_prepared.py makes, but portable)."""
    dst.mkdir(parents=True)
    shards = sorted(src.glob("shard-*.safetensors"))
    kept = [*shards, src / "meta.json", src / "tokenizer.json"]
    for f in kept:
        shutil.copyfile(f.resolve(), dst / f.name)
    if not splits:
        (dst / "index.jsonl").write_text(slim_index(read_index(src / "index.jsonl")))
        return
    for name, split in splits.items():
        (dst / name).mkdir()
        for f in kept:
            os.symlink(Path("..") / f.name, dst / name / f.name)
        (dst / name / "index.jsonl").write_text(slim_index(read_index(split / "index.jsonl")))


def piper_first(rows: list[tuple[Path, dict]], share: float, rng: random.Random) -> list[tuple[Path, dict]]:
    """`rows` reordered so that a `share` of them, as far as there are, come from the piper voices (the default
    speaker's engine; make_corpus.py's speakers.json beside each manifest says which ids those are)."""
    engines = {root: {int(k): v["engine"] for k, v in json.loads((root / "speakers.json").read_text()).items()}
               for root in {root for root, _ in rows}}
    piper = [r for r in rows if engines[r[0]].get(r[1].get("speaker")) == "piper"]
    other = [r for r in rows if engines[r[0]].get(r[1].get("speaker")) != "piper"]
    order = []
    while piper and other:
        order.append((piper if rng.random() < share else other).pop())
    return order + piper + other


def opus_clips(manifests: list[Path], out: Path, budget: int, seed: int, level: float = 0.7,
               piper_share: float | None = None) -> tuple[int, float]:
    """Random training utterances re-encoded as Ogg Opus until `budget` bytes are used. Returns (clips, seconds).

    They are the codec decoder's targets, so the level trades clips for fidelity: on this corpus level 0.7 is ~86
    kb/s, 2.3x the audio per MB of FLAC, with a log-mel L1 of 0.09 against the original (the codec's own error is
    ~0.9); libsndfile's default (~39 kb/s) fits 5x the audio at 0.24. `piper_share` weights the clips toward the
    piper voices (the corpora hold 2 of 5): on the CPU a decoder fine-tuned on such a mix resynthesised every speaker
    better than the shipped codec, the default one most (docs/codec_training.md)."""
    import soundfile as sf

    rows = [(m.parent, json.loads(line)) for m in manifests for line in m.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    if piper_share is not None:
        rows = piper_first(rows, piper_share, rng)
    out.mkdir(parents=True)
    used, n, seconds = 0, 0, 0.0
    for root, row in rows:
        wav, sr = sf.read(str(root / row["audio"]), dtype="float32")
        path = out / f"{n:05d}.ogg"
        sf.write(str(path), wav, sr, format="OGG", subtype="OPUS", compression_level=level)
        size = path.stat().st_size
        if used + size > budget:
            path.unlink()
            break
        used, n, seconds = used + size, n + 1, seconds + len(wav) / sr
    return n, seconds


def bundle(args: argparse.Namespace) -> None:
    out, work = args.out, args.work or args.out.with_name(args.out.name + ".work")
    if out.exists():
        sys.exit(f"{out} exists; remove it first (the work folder {work} is reused)")
    c1, c2, c3 = work / "corpus1", work / "corpus2", work / f"splice{args.splice_seed}"
    t0 = time.time()
    # 1. corpora: docs/voice.md step 1, the spliced one with this round's seed
    make_corpus(c1, 1, args.num, args.jobs)
    make_corpus(c2, 2, args.num, args.jobs)
    held = {json.dumps(t) for t in (c1 / "eval_sentences.txt").read_text().splitlines()}
    rows = [line for line in (c2 / "manifest.jsonl").read_text().splitlines()
            if line.strip() and json.dumps(json.loads(line)["text"]) not in held]
    (c2 / "manifest.filtered.jsonl").write_text("".join(r + "\n" for r in rows))
    make_corpus(c3, args.splice_seed, args.num, args.jobs, "--splice", "1",
                "--exclude-sentences", str(c1 / "eval_sentences.txt"),
                "--exclude-sentences", str(c2 / "eval_sentences.txt"))
    # 2. codes, and the unseen-sentence eval split of corpus 2 (docs/voice.md step 3)
    prepare(c2 / "manifest.filtered.jsonl", work / "prep2")
    prepare(c3 / "manifest.jsonl", work / "prep3")
    split = work / "split2"
    if not (split / "eval" / "index.jsonl").is_file():
        run([sys.executable, str(REPO / "scripts" / "split_prepared.py"), str(work / "prep2"), str(split),
             "--unseen-in", str(c1 / "manifest.jsonl"), "--eval", "150"])
    # 3. pack
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage_prepared(work / "prep2", stage / "s2", {"train": split / "train", "eval": split / "eval"})
    stage_prepared(work / "prep3", stage / "splice")
    out.mkdir(parents=True)
    with tarfile.open(out / "csm.tar.xz", "w:xz") as tar:
        tar.add(stage, arcname="data")
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux2014_x86_64", "-d", str(out / "wheels"), *WHEELS])
    for c in (c2, c3):  # the card names the corpora the voice was trained on
        shutil.copyfile(c / "corpus.json", out / f"{c.name}.corpus.json")
    left = CARRY_LIMIT - tracked_bytes() - dir_bytes(out) - args.margin_mb * 2**20
    if left <= 0:
        sys.exit(f"the codes alone leave no room in the device tool's 64 MiB ({-left / 2**20:.1f} MiB over)")
    n, seconds = opus_clips([c2 / "manifest.filtered.jsonl", c3 / "manifest.jsonl"], out / "clips", left, args.seed,
                            args.opus_level, args.piper_share)
    total = tracked_bytes() + dir_bytes(out)
    (out / "bundle.json").write_text(json.dumps({
        "splice_seed": args.splice_seed, "num_utterances": args.num, "piper_share": args.piper_share, "clips": n,
        "clip_minutes": round(seconds / 60, 1),
        "bytes": dir_bytes(out), "with_repository": total}, indent=1) + "\n")
    print(f"{out}: codes {(out / 'csm.tar.xz').stat().st_size / 2**20:.1f} MiB, {n} clips ({seconds / 60:.1f} min) "
          f"for the codec; with the repository {total / 2**20:.1f} of 64 MiB; {(time.time() - t0) / 60:.0f} min")


# --- train (on the GPU machine) -------------------------------------------------------------------------------------


def ensure_soundfile(wheels: Path, env: dict) -> None:
    probe = [sys.executable, "-c", "import soundfile"]
    if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return
    site = Path("/tmp/voice-round-site")
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
         *map(str, sorted(wheels.glob("*.whl")))])
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    subprocess.run(probe, env=env, check=True)


def float16_parts(src: Path, out: Path, stem: str) -> list[Path]:
    """The checkpoint's weights in float16 (as the packaged voice stores them), split into returnable parts."""
    from safetensors.torch import load_file, save_file

    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src)).items()}
    tmp = out / f"{stem}.safetensors"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    data = tmp.read_bytes()
    if len(data) <= RETURN_LIMIT:
        return [tmp]
    tmp.unlink()
    parts = []
    for i in range(0, len(data), RETURN_LIMIT):
        parts.append(out / f"{stem}.part-{i // RETURN_LIMIT}")
        parts[-1].write_bytes(data[i : i + RETURN_LIMIT])
    return parts


def slim_state(src: Path, dst: Path) -> Path:
    """The run's training state without the optimizer (too big to return): what the model card reads."""
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in state.items() if "optimizer" not in k and "discriminator" not in k}, dst)
    return dst


def last_step(run_dir: Path) -> Path:
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    if not steps:
        raise SystemExit(f"{run_dir}: no checkpoint was written (see its log)")
    return steps[-1]


def train(args: argparse.Namespace) -> None:
    bundle_dir, out = args.bundle.resolve(), args.out.resolve()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    ensure_soundfile(bundle_dir / "wheels", env)
    with tarfile.open(bundle_dir / "csm.tar.xz") as tar:
        tar.extractall(work, filter="tar")
    data = work / "data"
    minutes = str(args.minutes)
    csm_cmd = [sys.executable, "-m", "csm", "train", "--data", f"{data / 's2' / 'train'},{data / 'splice'}",
               "--eval-data", str(data / "s2" / "eval"), "--out", str(work / "csm"), "--init", args.init,
               "--max-minutes", minutes, *shlex.split(args.csm_args)]
    codec_cmd = [sys.executable, "-m", "csm", "train-codec", "--data", str(bundle_dir / "clips"),
                 "--out", str(work / "codec"), "--init", args.codec_init, "--max-minutes", minutes,
                 *shlex.split(args.codec_args)]
    jobs = {}
    for name, cmd in (("csm", csm_cmd), ("codec", codec_cmd)):
        if name in args.only:
            print("+", shlex.join(cmd), flush=True)
            log = open(work / f"{name}.out", "w")
            jobs[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log)
    failed = []
    for name, (proc, log) in jobs.items():
        if proc.wait() != 0:
            failed.append(name)
        log.close()
        print(f"--- {name} (exit {proc.returncode}), last lines:\n"
              + "".join((work / f"{name}.out").read_text().splitlines(keepends=True)[-15:]), flush=True)
    meta = {"commands": {n: shlex.join(c) for n, c in (("csm", csm_cmd), ("codec", codec_cmd)) if n in jobs},
            "bundle": json.loads((bundle_dir / "bundle.json").read_text()), "failed": failed}
    with tarfile.open(out / "meta.tar", "w") as tar:
        for name in jobs:
            run_dir = work / name
            tar.add(work / f"{name}.out", arcname=f"{name}/train.out")
            if (run_dir / "log.jsonl").is_file():
                tar.add(run_dir / "log.jsonl", arcname=f"{name}/log.jsonl")
            if name not in failed:
                step = last_step(run_dir)
                meta[f"{name}_step"] = step.name
                for f in ("config.json", "tokenizer.json"):
                    if (step / f).is_file():
                        tar.add(step / f, arcname=f"{name}/{f}")
                state = slim_state(step / "train_state.pt", work / f"{name}.state.pt")
                tar.add(state, arcname=f"{name}/train_state.pt")
                float16_parts(step / "model.safetensors", out, name)
        for f in bundle_dir.glob("*.corpus.json"):
            tar.add(f, arcname=f"corpora/{f.name}")
        (work / "round.json").write_text(json.dumps(meta, indent=1) + "\n")
        tar.add(work / "round.json", arcname="round.json")
    print("returned:", ", ".join(sorted(p.name for p in out.iterdir())))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


# --- unpack (here) --------------------------------------------------------------------------------------------------


def unpack(args: argparse.Namespace) -> None:
    from csm.judge import CONFIG as JUDGE_CONFIG, WEIGHTS as JUDGE_WEIGHTS  # here, csm is installed

    src, out = args.files, args.out
    with tarfile.open(src / "meta.tar") as tar:
        tar.extractall(out / "meta", filter="data")
    meta = json.loads((out / "meta" / "round.json").read_text())
    for name in ("csm", "codec"):
        if f"{name}_step" not in meta:
            continue
        step = out / name / meta[f"{name}_step"]
        step.mkdir(parents=True, exist_ok=True)
        whole = src / f"{name}.safetensors"
        parts = sorted(src.glob(f"{name}.part-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
        data = whole.read_bytes() if whole.is_file() else b"".join(p.read_bytes() for p in parts)
        (step / "model.safetensors").write_bytes(data)
        for f in (out / "meta" / name).iterdir():
            shutil.copyfile(f, (step.parent if f.name in ("log.jsonl", "train.out") else step) / f.name)
        if name == "csm":  # so that `csm eval --model` samples as the shipped voice does: its best_of needs its judge
            for f in ("generation.json", JUDGE_CONFIG, JUDGE_WEIGHTS):
                if (VOICE / f).is_file():
                    shutil.copyfile(VOICE / f, step / f)
        print(f"{step}: {len(data) / 1e6:.1f} MB")
    print(json.dumps(meta["commands"], indent=1))
    if "csm_step" in meta and "codec_step" in meta:
        model, codec = out / "csm" / meta["csm_step"], out / "codec" / meta["codec_step"]
        print(f"next (docs/voice.md step 6):\n  csm eval --model {model} --codec {codec} "
              f"--corpus CORPUS1/manifest.jsonl --num 20 --threads 2 --repeats 3 --json {out}/eval.json"
              "   # and again with --seed 300, and without context (--texts ... --no-speaker)\n"
              "  # each half that beats the shipped one goes in alone (a copy of the voice first, to score it):\n"
              f"  python scripts/package_voice.py --swap-model {model} --out src/csm/assets/voice\n"
              f"  python scripts/package_voice.py --swap-codec {codec} --out src/csm/assets/voice")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="here: corpora -> codes + clips + wheels, within the device tool's 64 MiB")
    b.add_argument("out", type=Path)
    b.add_argument("--work", type=Path, default=None, help="corpora and codes (default: OUT.work; reused)")
    b.add_argument("--splice-seed", type=int, default=8,
                   help="seed of this round's spliced corpus (3 made the shipped voice's; 4-7 made dev sets)")
    b.add_argument("--num", type=int, default=30000, help="utterances per corpus (default 30000)")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b.add_argument("--seed", type=int, default=0, help="which clips the codec gets")
    b.add_argument("--margin-mb", type=int, default=1, help="MiB left free under the 64 MiB (default 1)")
    b.add_argument("--opus-level", type=float, default=0.7,
                   help="Opus compression level of the clips, 0 (best) to 1 (smallest) (default 0.7: ~86 kb/s)")
    b.add_argument("--piper-share", type=float, default=0.6,
                   help="share of the codec's clips from the piper voices, 0-1 (default 0.6; the corpora hold 0.4)")
    b.set_defaults(func=bundle)
    t = sub.add_parser("train", help="on the GPU machine: CSM and codec decoder side by side")
    t.add_argument("bundle", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--minutes", type=float, default=4.0, help="training minutes for each (default 4)")
    t.add_argument("--only", default="csm,codec", help="csm, codec or both (default)")
    t.add_argument("--init", default=str(VOICE), help="CSM to continue (default: the shipped voice)")
    t.add_argument("--codec-init", default=str(VOICE / "codec"), help="codec to continue (default: the shipped one)")
    t.add_argument("--csm-args", default=CSM_ARGS, help=f"more `csm train` flags (default: {CSM_ARGS})")
    t.add_argument("--codec-args", default=CODEC_ARGS, help=f"more `csm train-codec` flags (default: {CODEC_ARGS})")
    t.add_argument("--work", default="/tmp/voice-round")
    t.set_defaults(func=train)
    u = sub.add_parser("unpack", help="here: the returned files -> OUT/csm/step-N, OUT/codec/step-N")
    u.add_argument("files", type=Path)
    u.add_argument("out", type=Path)
    u.set_defaults(func=unpack)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
