"""benchmarks/model_mask_warp.py models the CUDA warp kernel's selection: its top k must be the reference's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from model_mask_warp import instructions, select_row  # noqa: E402

from memloc_kernels import reference as ref  # noqa: E402

# (d_in, sparsity) the warp kernel takes: k <= 96 and k <= d_in / 8
CASES = [(16, 0.01), (16, 0.05), (1000, 0.01), (1000, 0.05), (1280, 0.01), (1280, 0.05), (2560, 0.01), (5120, 0.01),
         (8192, 0.01)]


@pytest.mark.parametrize("d_in, sparsity", CASES)
def test_model_selects_the_reference_top_k(d_in, sparsity):
    k = ref.topk_count(sparsity, d_in)
    assert k <= 96 and k <= d_in // 8
    weight = (torch.randn(6, d_in) * 0.02).half()
    sumsq = torch.exp(torch.randn(d_in) * 1.5) * 1e3
    scores = ref.wanda_scores(weight, sumsq)
    want = ref.topk_row_mask(scores, k)
    bits = scores.numpy().view(np.int32)
    for r in range(6):
        cols, trips = select_row(bits[r], k)
        assert not trips.exact, "spread statistics never need the exact path"
        assert cols.tolist() == torch.nonzero(want[r]).flatten().tolist()
        assert instructions(d_in, trips) > 0


def test_model_sends_ties_at_the_kth_place_to_the_exact_path():
    weight = torch.randn(1, 1280).abs() + 1
    k = ref.topk_count(0.01, 1280)
    order = weight.argsort(dim=1, descending=True)
    weight.scatter_(1, order[:, k : k + 2], weight.gather(1, order[:, k - 1 : k]).expand(-1, 2))
    bits = weight.numpy().astype(np.float32).view(np.int32)
    cols, trips = select_row(bits[0], k)
    assert cols is None and trips.exact


@pytest.mark.parametrize("d_in", [1280, 2560, 5120])
def test_model_warm_start_selects_the_reference_top_k(d_in):
    # A row's vectors in order, each search started from the previous one's guess: vectors whose
    # scale jumps by 1e4 (the guess lands far above or below), repeats (the guess is exact) and
    # ordinary ones. Every selection must be the reference's; the warm start must land at once for
    # the ordinary vector that follows an ordinary one.
    k = ref.topk_count(0.01, d_in)
    weight = (torch.randn(3, d_in) * 0.02).half()
    base = torch.exp(torch.randn(d_in) * 1.5) * 1e3
    vectors = [base, base, base * 1e4, base * 1e-4, torch.exp(torch.randn(d_in) * 1.5) * 1e3, base * 3]
    for r in range(3):
        guess, reg_steps = -1, []
        for sumsq in vectors:
            scores = ref.wanda_scores(weight[r : r + 1], sumsq)
            want = ref.topk_row_mask(scores, k)[0]
            cols, trips = select_row(scores.numpy().view(np.int32)[0], k, guess=guess)
            assert not trips.exact
            assert cols.tolist() == torch.nonzero(want).flatten().tolist()
            guess = trips.guess
            reg_steps.append(trips.reg_steps)
        assert reg_steps[1] == 0, "the same vector again: the warm start lands in the window at once"

