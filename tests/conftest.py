import sys
from pathlib import Path

# tests/oracles.py holds the reference implementations shared by the parity tests.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    """A small BPE over two conversational lines: enough text tokens for the tiny random models."""
    from csm.tokenizer import train_tokenizer

    return train_tokenizer(["hello there, how are you?", "fine thanks, and you?"] * 5, vocab_size=300)
