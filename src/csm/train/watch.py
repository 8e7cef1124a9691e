"""What a person sees of a training run: a progress bar, TensorBoard events beside log.jsonl, and its curves.

    tensorboard --logdir runs/            # every run's out/tb: losses, learning rate, held-out loss, audio
    csm plot runs/NAME                    # runs/NAME/loss.png (also drawn when a run ends)

Both trainers (`csm train`, `csm train-codec`) log through one `Watch`; `Listener` (csm train --listen) speaks a few
held-out lines at each evaluation, into TensorBoard with Whisper's WER. TensorBoard is optional (`pip install
tensorboard`, in the `train` extra): without it the run says so once and keeps its log.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


class Watch:
    def __init__(self, out: Path, total: int, initial: int, desc: str, progress: bool = True,
                 tensorboard: bool = True, enabled: bool = True) -> None:
        self.bar = self.writer = None
        self.out = Path(out) if enabled else None
        if not enabled:  # other ranks of a distributed run
            return
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.print("TensorBoard is not installed (pip install tensorboard): logging to log.jsonl only")
            else:
                self.writer = SummaryWriter(str(Path(out) / "tb"), purge_step=initial or None)

    def step(self, n: int = 1, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)

    def scalars(self, step: int, record: dict) -> None:
        """Every number of a log record, grouped as train/ (losses, lr, speed) or eval/ (keys starting eval/val)."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            group = "eval" if key.startswith(("eval", "val", "listen")) else "train"
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def audio(self, step: int, tag: str, wav: torch.Tensor, sample_rate: int, caption: str = "") -> None:
        if self.writer is not None:
            self.writer.add_audio(tag, wav.detach().float().reshape(1, -1).clamp(-1, 1).cpu(), step, sample_rate)
            if caption:
                self.writer.add_text(tag, caption, step)

    def print(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        """End of the run: the bar and events closed, and its curves drawn into OUT/loss.png (with matplotlib)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.out is not None and (self.out / "log.jsonl").is_file():
            try:
                plot_run(self.out)
            except ImportError:
                pass


# Curves drawn from log.jsonl, by trainer: (title, keys) per panel.
_PANELS = [("loss", ("loss", "eval_loss", "mel_loss", "val_mel_l1", "val_gta_mel_l1")),
           ("parts", ("c0_loss", "decoder_loss", "eval_c0_loss", "eval_decoder_loss", "commit")),
           ("heard", ("listen_wer",)), ("learning rate", ("lr",))]


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """log.jsonl of a `csm train` / `csm train-codec` run -> a PNG of its curves (default RUN/loss.png).
    Needs matplotlib (the `train` extra)."""
    import json

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or csm[train])") from e
    run = Path(run)
    log = run / "log.jsonl" if run.is_dir() else run
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no log.jsonl (a csm train / csm train-codec output folder?)")
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    panels = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in _PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(f"{log}: nothing to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, ms=3, label=key)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(run), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else (run if run.is_dir() else run.parent) / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class Listener:
    """Hear the model as it trains: held-out lines spoken at each evaluation, with Whisper's WER when it is there."""

    def __init__(self, lines_file: str, n_lines: int, codec: str, tokenizer_file: Path, init: str | None,
                 device: torch.device, speaker: int = 0) -> None:
        from ..evaluate import read_texts
        from ..generate import generation_defaults
        from ..mimi import load_mimi
        from ..tokenizer import TextTokenizer

        self.lines = read_texts(lines_file)[:n_lines]
        self.speaker = speaker
        self.tokenizer = TextTokenizer.from_file(tokenizer_file)
        # Spoken as `csm say` speaks with the model being fine-tuned (`init`'s generation.json: top-k, temperature).
        defaults = generation_defaults(init) if init else {}
        self.defaults = {k: v for k, v in defaults.items() if k in ("temperature", "topk")}
        self.codec = load_mimi(codec, device=device)
        try:
            from ..metrics import Transcriber

            self.transcriber = Transcriber()
        except ImportError:
            self.transcriber = None

    @torch.no_grad()
    def __call__(self, model, watch: Watch, step: int) -> dict:
        from ..metrics import word_error_rate
        from ..generate import Generator

        was_training = model.training
        # fuse=False: the model being trained must keep its parameters (fusing would swap them for new tensors the
        # optimizer does not hold)
        gen = Generator(model, self.tokenizer, self.codec, engine="eager", fuse=False)
        gen.defaults.update(self.defaults)
        errors, words = 0.0, 0
        for i, line in enumerate(self.lines):
            speech = gen.generate(line, speaker=self.speaker, seed=0,
                                  max_audio_length_ms=min(20_000, 1500 + 600 * len(line.split())))
            wav = speech.audio.float().cpu()
            caption = line
            if self.transcriber is not None:
                heard = self.transcriber(wav.numpy(), self.codec.sample_rate)
                errors += word_error_rate(line, heard) * len(line.split())
                words += len(line.split())
                caption = f"{line}  \n*heard:* {heard}"
            watch.audio(step, f"listen/{i}", wav, self.codec.sample_rate, caption)
        model.train(was_training)
        return {"listen_wer": errors / words} if words else {}
