import os

import pytest
import torch

from harmo_min.model import build_tiny

# Every script a test launches (torchrun ranks, benchmarks) inherits this: a rank that dies of a signal (SIGABRT,
# SIGSEGV) then prints where each of its Python threads was, instead of only torchrun's "Signal 6 received".
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def sharpen(model, factor: float = 5.0):
    """Scale the random weights so the tiny model's next-token distribution is peaked and varied.

    At init every logit is ~0 and greedy decoding repeats one token; a sharper random model makes parity tests
    meaningful (many different tokens, ties impossible in practice).
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(factor)
    return model


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    model, processor = build_tiny(seed=0)
    return sharpen(model), processor
