"""benchmarks/model_mask_thread.py models the CUDA thread kernel's per-thread path: its top k is the reference's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from model_mask_thread import kth_block_max, select_row  # noqa: E402

from memloc_kernels import reference as ref  # noqa: E402


def _bits(weight: torch.Tensor, sumsq: torch.Tensor) -> np.ndarray:
    return ref.wanda_scores(weight, sumsq).numpy().view(np.int32)


def _want(bits_row: np.ndarray, k: int) -> list[int]:
    scores = torch.from_numpy(bits_row.view(np.float32).copy())[None]
    return torch.nonzero(ref.topk_row_mask(scores, k)[0]).flatten().tolist()


@pytest.mark.parametrize("d_in, sparsity", [(256, 0.001), (256, 0.01), (1280, 0.01), (1280, 0.05), (2560, 0.01),
                                            (5120, 0.01), (8192, 0.005)])
def test_model_selects_the_reference_top_k_cold_and_warm(d_in, sparsity):
    # a row's vectors in order, each problem warm-started from the previous one: ordinary vectors,
    # a repeat, 1e4 jumps up (the list fills and is raised) and down (a miss: the warp fallback)
    k = ref.topk_count(sparsity, d_in)
    weight = (torch.randn(4, d_in) * 0.02).half()
    base = torch.exp(torch.randn(d_in) * 1.5) * 1e3
    vectors = [base, torch.exp(torch.randn(d_in) * 1.5) * 1e3, base, base * 1e4, base * 1e-4, base * 3]
    decided = 0
    for r in range(4):
        guess, drop = -1, None
        for i, vec in enumerate(vectors):
            bits = _bits(weight, vec)[r]
            cols, trip = select_row(bits, k, guess, drop)
            if cols is None:
                assert trip.failed
                guess = kth_block_max(bits, k)
            else:
                assert cols.tolist() == _want(bits, k), f"row {r} vector {i}"
                decided += 1
                guess = trip.guess
            drop = trip.drop
        assert trip.drop >= 1 << 21
    assert decided >= 4 * len(vectors) - 4 * 2, "only the jump down may miss (and a cold start with ties)"


def test_model_raises_the_bound_while_scoring_a_cold_row():
    weight = (torch.randn(1, 5120) * 0.02).half()
    bits = _bits(weight, torch.exp(torch.randn(5120) * 1.5) * 1e3)[0]
    cols, trip = select_row(bits, 51)
    assert trip.raises > 0 and not trip.failed
    assert cols.tolist() == _want(bits, 51)


def test_model_leaves_ties_at_the_kth_place_to_the_warp_path():
    weight = torch.randn(1, 1280).abs() + 1
    k = ref.topk_count(0.01, 1280)
    order = weight.argsort(dim=1, descending=True)
    weight.scatter_(1, order[:, k : k + 2], weight.gather(1, order[:, k - 1 : k]).expand(-1, 2))
    bits = weight.numpy().astype(np.float32).view(np.int32)[0]
    cols, trip = select_row(bits, k)
    assert cols is None and trip.failed and not trip.miss


def test_model_all_equal_row_fails_without_overrunning_the_list():
    bits = np.zeros(1280, np.int32)  # every score 0: every block ties
    cols, trip = select_row(bits, 12)
    assert cols is None and trip.failed
