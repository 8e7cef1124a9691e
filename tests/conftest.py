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


@pytest.fixture
def joins_midway():
    """A check for continuous batching: `requests` go to a Batcher over `gen` (the first alone, the rest a frame
    later, as a server sees them), and each must come out as `reference` generates it alone. Returns the batcher."""
    import torch

    from csm.serve.batcher import Batcher

    def check(reference, gen, requests, slots: int = 2) -> Batcher:
        alone = [reference.generate_batch([r])[0].codes for r in requests]
        b = Batcher(gen, slots=slots)
        jobs = [b.submit(requests[0])]
        b.step()
        jobs += [b.submit(r) for r in requests[1:]]
        b.drain()
        for job, want in zip(jobs, alone):
            got = list(job)
            assert torch.equal(torch.stack(got, 1) if got else want[:, :0], want)
        return b

    return check
