"""Mimi, Kyutai's streaming neural audio codec (24 kHz mono <-> 12.5 Hz frames of 32 RVQ codes), in plain PyTorch.

    from csm.mimi import load_mimi
    mimi = load_mimi("kyutai/mimi")          # or "sesame/csm-1b", a local directory, or a .safetensors file
    codes = mimi.encode(wav)                 # [T] float 24 kHz -> [32, ceil(T / 1920)] long
    wav = mimi.decode(codes)                 # [32, F] -> [F * 1920]
    stream = mimi.decode_stream()            # stream.decode(codes[None, :, i:i+1]) -> [1, 1, 1920], == decode()
"""

from .config import PRESETS, MimiConfig, preset
from .model import Mimi, MimiDecodeStream, MimiEncodeStream
from .weights import (
    MimiWeightsError,
    convert_state_dict,
    load_into,
    load_mimi,
    load_model_codec,
    read_state_dict,
    save_mimi,
)

load_codec = load_mimi  # the name csm.cli / csm.evaluate look up

__all__ = [
    "PRESETS",
    "Mimi",
    "MimiConfig",
    "MimiDecodeStream",
    "MimiEncodeStream",
    "MimiWeightsError",
    "convert_state_dict",
    "load_codec",
    "load_into",
    "load_mimi",
    "load_model_codec",
    "preset",
    "read_state_dict",
    "save_mimi",
]
