"""What a person sees of a training run: a progress bar, and TensorBoard events beside log.jsonl.

    tensorboard --logdir runs/            # every run's out/tb: losses, learning rate, held-out loss, audio

Both trainers (`csm train`, `csm train-codec`) log through one `Watch`. TensorBoard is optional (`pip install
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
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
