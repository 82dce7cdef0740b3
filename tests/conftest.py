"""Shared pytest fixtures: fixed seeds, the shared prompt data, readable mask comparisons."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Triton decides once, at import, whether it compiles or interprets: without a GPU, interpret
# (the CPU path the tests cover), and set it before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEMLOC_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (memorized prompts, subsets, SD1 tokenizer)."""
    if not (SHARED_DATA / "sdv1_500_memorized.jsonl").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def assert_masks_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "mask") -> None:
    """Exact equality of two bool masks; on failure, say how many entries differ and where."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.cpu() != expected.cpu()).nonzero()
    if diff.numel():
        first = [tuple(i.tolist()) for i in diff[:5]]
        raise AssertionError(f"{what}: {diff.shape[0]} of {actual.numel()} entries differ, first at {first}")
