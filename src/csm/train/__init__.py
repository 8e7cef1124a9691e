"""Training: `prepare` a corpus into codec codes + text tokens (data.py), then `train` (train.py), fully or with LoRA
adapters (lora.py). The command line is in cli.py (`csm prepare`, `csm train`)."""

from .data import Corpus, load_corpus, prepare, read_items
from .lora import LoRALinear, apply_lora, merge_state_dict
from .train import CSMLoss, TrainConfig, train

__all__ = [
    "CSMLoss", "Corpus", "LoRALinear", "TrainConfig", "apply_lora", "load_corpus", "merge_state_dict", "prepare",
    "read_items", "train",
]
