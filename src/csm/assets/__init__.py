"""Files shipped inside the package: the embedded tiny voice (model, tokenizer, codec) once trained."""

from __future__ import annotations

from pathlib import Path

VOICE_DIR = Path(__file__).parent / "voice"


def default_model() -> str:
    """Directory of the embedded voice, the default model of `csm say`."""
    if not (VOICE_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no embedded voice is shipped in this build ({VOICE_DIR} is empty); pass --model DIR, e.g. a random "
            "tiny checkpoint made by `python scripts/make_tiny_checkpoint.py DIR`"
        )
    return str(VOICE_DIR)
