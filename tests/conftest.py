"""Shared pytest fixtures: fixed seeds, the shared prompt data, one-thread runs, a tiny pipeline, mask comparisons."""

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


@pytest.fixture
def cuda() -> torch.device:
    """The GPU for the CUDA backend's tests, or a skip (a failure under MEMLOC_REQUIRE_CUDA_BACKEND=1)
    when the backend cannot run."""
    from memloc_kernels.backends import cuda as cuda_backend

    ok, why = cuda_backend.BACKEND.availability()
    if not ok:
        if os.environ.get("MEMLOC_REQUIRE_CUDA_BACKEND") == "1":
            pytest.fail(f"cuda backend unavailable: {why}")
        pytest.skip(f"cuda backend unavailable: {why}")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the modules that ask (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    On a shared 2-core machine, two spinning OpenMP threads run 10x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    """A tiny random SD1-structured pipeline (16x16 images) on the CPU."""
    from memloc.tiny import build_tiny_pipeline, write_char_tokenizer

    pipe = build_tiny_pipeline(write_char_tokenizer(tmp_path_factory.mktemp("tokenizer")), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_masks_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "mask") -> None:
    """Exact equality of two bool masks; on failure, say how many entries differ and where."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.cpu() != expected.cpu()).nonzero()
    if diff.numel():
        first = [tuple(i.tolist()) for i in diff[:5]]
        raise AssertionError(f"{what}: {diff.shape[0]} of {actual.numel()} entries differ, first at {first}")
