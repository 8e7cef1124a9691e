"""A training run's directory, for both trainers: step-NNNNNN/ checkpoints written whole (into a .tmp directory,
then renamed, so a crash never leaves half of one), the newest N kept and out/best with them, the newest found
again for --resume; and the files a fine-tune carries from the model it started from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .data import data_dirs, data_speakers

STATE_FILE, LOG_FILE = "train_state.pt", "log.jsonl"
BEST = "best"  # out/best: a link to the checkpoint with the lowest held-out loss (csm train --patience)
# What makes a model directory speak beside its weights: a fine-tune of it speaks the same way (`csm say --model
# runs/ft/step-N` finds its codec and defaults). Files are hard-linked where the file system allows.
CARRIED = ("generation.json", "codec")


def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first."""
    return sorted(p for p in out.glob("step-*") if (p / STATE_FILE).is_file() and not p.name.endswith(".tmp"))


def find_resume_dir(resume: str, out: str | Path) -> Path:
    """`resume` as a checkpoint directory, or for "latest" the newest complete one in `out`."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a training checkpoint (no {STATE_FILE})")
        return path
    dirs = checkpoint_dirs(Path(out))
    if not dirs:
        raise FileNotFoundError(f"--resume latest: no checkpoint with {STATE_FILE} in {out}")
    return dirs[-1]


def begin_checkpoint(out: str | Path, step: int) -> Path:
    """An empty out/step-NNNNNN.tmp to write a checkpoint into; `commit` makes it out/step-NNNNNN."""
    tmp = Path(out) / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, keep: int = 0) -> Path:
    """Rename the written `tmp` into place, then keep only the newest `keep` checkpoints (0: all) and out/best."""
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep > 0:
        best = (final.parent / BEST).resolve() if (final.parent / BEST).exists() else None
        for old in checkpoint_dirs(final.parent)[:-keep]:
            if old.resolve() != best:  # the best checkpoint stays whatever its age
                shutil.rmtree(old, ignore_errors=True)
    return final


def carry_model_files(init: str | None, out: Path, data: str) -> None:
    """Link `init`'s codec and generation.json into the checkpoint `out`. When `init` names the speakers it knows,
    a fine-tune on a new speaker id (in the prepared `data`) adds it, as the default if it is the only one."""
    src = Path(init) if init else None
    if src is None or not src.is_dir():
        return
    for name in CARRIED:
        path = src / name
        if path.is_dir():
            shutil.copytree(path, out / name, copy_function=link_or_copy, dirs_exist_ok=True)
        elif path.is_file():
            link_or_copy(path, out / name)
    gen_file = out / "generation.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    if gen.get("speakers") is None:
        return
    ids = sorted(data_speakers(data_dirs(data)))
    new = {str(s): f"fine-tuned on {data}" for s in ids if str(s) not in gen["speakers"]}
    if new:
        gen["speakers"] = {**gen["speakers"], **new}
        if len(new) == 1:  # the one voice fine-tuned in is what `csm say --model OUT` speaks by default
            gen["speaker"] = int(next(iter(new)))
        gen_file.unlink()  # a hard link to the base's file: write a new one
        gen_file.write_text(json.dumps(gen) + "\n")


def link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
