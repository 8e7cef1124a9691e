"""`csm` command line: `csm say`, and the subcommands other modules register (prepare, train, eval, ...)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

# Modules that add subcommands through `add_subcommand(subparsers)`. Missing ones are skipped, so the CLI works
# while a capability is being built.
SUBCOMMAND_MODULES = ("csm.train.cli", "csm.train.codec", "csm.evaluate", "csm.bench", "csm.serve.cli")


def _seed(value: str) -> int:
    """--seed as the server takes it: an integer in [0, 2**63)."""
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {seed}")
    return seed


def _say(args: argparse.Namespace) -> int:
    import torch

    from .audio import check_speed
    from .generate import load_generator

    if (args.text is None) == (args.dialogue is None):
        raise ValueError("give either TEXT or --dialogue FILE")
    turns = None
    if args.dialogue is not None:
        if args.speaker is not None or args.no_split:
            raise ValueError("--speaker and --no-split do not apply to --dialogue (each line names its speaker)")
        turns = parse_dialogue(sys.stdin.read() if args.dialogue == "-" else Path(args.dialogue).read_text())
    elif args.text == "-":  # the text from stdin: a paragraph or a whole file (the generator rejects empty text)
        args.text = sys.stdin.read()
    check_speed(args.speed, "--speed")  # before the generation it would otherwise follow
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    gen = load_generator(args.model, device=device, codec=_load_codec(args, device), quantize=args.quantize,
                         engine=args.engine, gemv=args.gemv)
    context = [_context_segment(gen, spec) for spec in args.context or []]
    t1 = time.perf_counter()
    kwargs = dict(context=context, max_audio_length_ms=args.max_ms, temperature=args.temperature, topk=args.topk,
                  seed=args.seed)
    if turns is not None:
        speech = gen.generate_dialogue(turns, **kwargs, max_words=args.max_words, pause_ms=args.pause_ms,
                                       progress=True)
    elif args.no_split:
        speech = gen.generate(args.text, args.speaker, **kwargs)
    else:  # one sentence at a time, each in the context of the one before: models learn from single utterances
        speech = gen.generate_long(args.text, args.speaker, **kwargs, max_words=args.max_words,
                                   pause_ms=args.pause_ms, progress=True)
    t2 = time.perf_counter()
    if speech.codes.shape[1] == 0:  # the first frame was end-of-utterance: nothing to write
        print("csm say: error: the model ended the line before speaking (no audio, nothing written); "
              "try another --seed", file=sys.stderr)
        return 1
    out = Path(args.output)
    if speech.audio is not None and out.suffix.lower() != ".npy":
        from .audio import TimeStretch, save_audio

        audio = speech.audio
        if args.speed != 1.0:  # the same words in less (or more) time, at the same pitch
            audio = TimeStretch(args.speed, speech.sample_rate).process(audio, final=True)
        save_audio(out, audio, speech.sample_rate)
    else:
        import numpy as np

        out = out.with_suffix(".npy")
        np.save(out, speech.codes.numpy())
    rtf = (t2 - t1) / max(speech.duration_s, 1e-9)
    print(
        f"{speech.codes.shape[1]} frames ({speech.duration_s:.2f} s of audio) in {t2 - t1:.2f} s "
        f"(RTF {rtf:.2f}; load {t1 - t0:.2f} s)",
        file=sys.stderr,
    )
    print(out)
    return 0


def parse_dialogue(script: str) -> list[tuple[int, str]]:
    """'SPEAKER: text' per line -> [(speaker, text)]; blank lines and lines starting with # are skipped."""
    turns = []
    for n, line in enumerate(script.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        speaker, sep, text = line.partition(":")
        if not sep or not speaker.strip().isdigit() or not text.strip():
            raise ValueError(f"dialogue line {n}: expected 'SPEAKER: text' with a speaker id, got {line!r}")
        turns.append((int(speaker), text.strip()))
    if not turns:
        raise ValueError("the dialogue has no turns")
    return turns


def _load_codec(args: argparse.Namespace, device: str):
    """--codec, else the codec that travels with the model; None (codes only) when there is none."""
    if args.codec == "none":
        return None
    from .mimi import load_mimi, load_model_codec

    if args.codec:
        return load_mimi(args.codec, device=device)
    codec = load_model_codec(args.model, device=device)
    if codec is None:
        print(f"no audio codec found with {args.model} (pass --codec): writing Mimi codes, not audio", file=sys.stderr)
    return codec


def _context_segment(gen, spec: str):
    """SPEAKER:TEXT:PATH, where PATH is an audio file (encoded with the codec) or a .npy of Mimi codes."""
    import numpy as np
    import torch

    from .frames import Segment

    try:
        speaker, text, path = spec.split(":", 2)
        speaker = int(speaker)
    except ValueError:
        raise ValueError(f"--context expects SPEAKER:TEXT:AUDIO_PATH, got {spec!r}") from None
    if path.endswith(".npy"):
        audio = torch.from_numpy(np.load(path, allow_pickle=False)).long()
    else:
        from .audio import load_audio

        audio = load_audio(path, sample_rate=gen.sample_rate)
    return Segment(speaker, text, audio)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csm", description="Conversational Speech Model: speak a line in context.")
    sub = p.add_subparsers(dest="command", required=True)

    say = sub.add_parser("say", help="speak TEXT and write a wav (or Mimi codes as .npy without a codec)")
    say.add_argument("text", nargs="?", help="what to say; '-' reads it from stdin")
    say.add_argument("--dialogue", metavar="FILE", default=None,
                     help="speak a conversation instead of TEXT: one 'SPEAKER: text' turn per line ('-': stdin), "
                          "each in the context of the turns before it")
    say.add_argument("-o", "--output", default="out.wav", help="output .wav (or .npy for raw codes)")
    say.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the embedded voice)")
    say.add_argument("--codec", default=None, help="Mimi weights (directory/hub id); default: from --model; 'none'")
    say.add_argument("--speaker", type=int, default=None, help="speaker id (default: the model's, else 0)")
    say.add_argument("--context", action="append", metavar="SPEAKER:TEXT:AUDIO", help="earlier turn (repeatable)")
    say.add_argument("--max-ms", type=float, default=10_000, help="generation budget per sentence, in milliseconds")
    say.add_argument("--no-split", action="store_true",
                     help="speak TEXT as one line (default: sentence by sentence, each in the context of the last)")
    say.add_argument("--pause-ms", type=float, default=200, help="silence between sentences (default 200)")
    say.add_argument("--speed", type=float, default=1.0,
                     help="play the speech faster (2.0) or slower (0.5) at the same pitch, 0.25-4 (default 1)")
    say.add_argument("--max-words", type=int, default=None,
                     help="a longer sentence is cut at its commas (default: the model's, else 30)")
    say.add_argument("--temperature", type=float, default=None, help="default: the model's, else 0.9")
    say.add_argument("--topk", type=int, default=None, help="default: the model's, else 50")
    say.add_argument("--seed", type=_seed, default=None, help="a non-negative integer: the same seed, the same speech")
    say.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    say.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    say.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only linears (~1.7x faster on a CPU)")
    say.add_argument("--engine", choices=["eager", "graph", "compile"], default=None,
                     help="frame step: eager (CPU default), graph (CUDA graph, GPU default), compile (fused; "
                          "pays off on long outputs)")
    say.add_argument("--gemv", choices=["matmul", "inductor"], default="matmul",
                     help="with --engine compile: inductor writes the matrix-vector products, fused with their "
                          "neighbours (faster on a GPU, not bit-identical)")
    say.set_defaults(func=_say)

    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the module itself is absent: capability not built yet
                continue
            raise
        module.add_subcommand(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "say" and args.model is None:
            from .assets import default_model

            args.model = default_model()
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"csm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
