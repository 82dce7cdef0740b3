"""benchmarks/model_mask_warp.py models the CUDA warp kernel's selection: its top k must be the reference's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from model_mask_warp import instructions, pair_bounds, select_row, select_row_bounds  # noqa: E402

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



@pytest.mark.parametrize("d_in, sparsity", [c for c in CASES if ref.topk_count(c[1], c[0]) <= 64])
def test_model_bound_path_selects_the_reference_top_k(d_in, sparsity):
    # The bound path of batched calls: a row's vectors in order, each window search started from the
    # previous vector's bound. Where it does not hand the problem on (loose), its top k is the
    # reference's; on spread statistics it hands on few problems.
    k = ref.topk_count(sparsity, d_in)
    weight = (torch.randn(4, d_in) * 0.02).half()
    loose = total = 0
    for r in range(4):
        wguess = -1
        for _ in range(4):
            sumsq = torch.exp(torch.randn(d_in) * 1.5) * 1e3
            want = ref.topk_row_mask(ref.wanda_scores(weight[r : r + 1], sumsq), k)[0]
            cols, trips = select_row_bounds(weight[r].float().abs().numpy(), torch.sqrt(sumsq).numpy(), k,
                                            wguess=wguess)
            total += 1
            if trips.loose:
                loose += 1
                continue
            assert not trips.exact
            assert cols.tolist() == torch.nonzero(want).flatten().tolist()
            wguess = trips.guess
    assert loose <= total // 4, f"{loose} of {total} problems left the bound path"


def test_model_bound_path_hands_crossed_pairs_on():
    # In every column pair the large |w| meets the small norm: the bounds overshoot every score.
    d_in = 2560
    even = np.arange(d_in) % 2 == 0
    rng = np.random.default_rng(0)
    abs_w = np.where(even, 1 + rng.random(d_in), 1e-3 * rng.random(d_in)).astype(np.float32)
    norms = np.where(even, 1e-3 * rng.random(d_in), 1 + rng.random(d_in)).astype(np.float32)
    cols, trips = select_row_bounds(abs_w, norms, ref.topk_count(0.01, d_in))
    assert cols is None and trips.loose


def test_model_pair_bounds_bound_every_block_maximum():
    # Non-negative score bits (as the kernel orders them) never exceed their block's bound, with
    # zeros, infinities and NaN among the weights and norms (a NaN score sits above +inf).
    rng = np.random.default_rng(1)
    abs_w = np.abs(rng.standard_normal(4096)).astype(np.float32) * 0.02
    norms = np.exp(rng.standard_normal(4096) * 3).astype(np.float32)
    abs_w[rng.choice(4096, 40, replace=False)] = 0
    abs_w[rng.choice(4096, 20, replace=False)] = np.inf
    norms[rng.choice(4096, 40, replace=False)] = 0
    norms[rng.choice(4096, 20, replace=False)] = np.inf
    norms[rng.choice(4096, 10, replace=False)] = np.nan
    with np.errstate(invalid="ignore"):
        scores = (abs_w * norms).astype(np.float32)
    bits = scores.view(np.int32).copy()
    bits[np.isnan(scores)] = 0x7FFFFFFF
    block_max = np.maximum(bits.reshape(-1, 8).max(axis=1), -1)
    bounds = pair_bounds(abs_w, norms)
    assert (bounds >= block_max).all()
    assert (bounds == 0x7FFFFFFF).sum() >= 40, "a non-finite value in a pair makes its block's bound NaN"
