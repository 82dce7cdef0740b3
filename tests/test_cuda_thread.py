"""The CUDA thread kernel of memorized_mask (csrc/cuda/mask_thread.cu) vs the reference: identical masks.

``MEMLOC_CUDA_MASK=thread`` sends every layer it can take (d_in a multiple of 256 up to 8192, k <= 64)
to it, whatever the number of norm vectors; unset, it takes nothing (the warp kernel was faster on
an H100: BENCHMARKS.md, tenth session). GPU only: every test skips (or fails under
MEMLOC_REQUIRE_CUDA_BACKEND=1) elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_backend import SD15_LAYERS, WEIGHT_DTYPES, assert_words_equal, masks, random_stats

import memloc_kernels as mk

SHAPES = [(37, 256), (64, 1280), (33, 2560), (40, 5120), (5, 8192)]


def _counter(device):
    from memloc_kernels.backends.cuda import exact_path_counter

    counter = exact_path_counter(device)
    counter.zero_()
    return counter


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.001, 0.01, 0.05], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_thread_kernel_matches_reference(cuda, monkeypatch, shape, dtype, sparsity):
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "thread")
    d_out, d_in = shape
    weight = (torch.randn(d_out, d_in) * 0.02).to(dtype)
    sumsq, null_sumsq = random_stats(d_in, 3, 7, device="cpu")  # 21 vectors: the last round is partial
    counter = _counter(cuda)
    got = masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), sparsity, "reference")
    assert_words_equal(*got, f"{shape} {dtype} s={sparsity}")
    problems = d_out * 21
    left = int(counter.item())
    # the per-thread path must decide nearly all of them (a path that always gave up would still
    # give right masks through the warp fallback)
    assert left <= problems // 4, f"{left} of {problems} problems left to the warp path"


@pytest.mark.gpu
def test_thread_kernel_decides_batched_problems_itself(cuda, monkeypatch):
    # one vector per timestep drawn alike: after each thread's first problem the warm start should hold
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "thread")
    weight = (torch.randn(64, 5120) * 0.02).half()
    sumsq, null_sumsq = random_stats(5120, 2, 40, device="cpu")
    counter = _counter(cuda)
    assert_words_equal(*masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference"), "batched")
    assert int(counter.item()) <= 64 * 80 // 20, f"{int(counter.item())} of {64 * 80} problems left to the warp path"


@pytest.mark.gpu
def test_thread_kernel_ties_at_the_kth_place_go_to_the_warp_path(cuda, monkeypatch):
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "thread")
    weight = (torch.randn(40, 1280) * 0.02).float().abs() + 1
    k = mk.topk_count(0.01, 1280)
    order = weight.argsort(dim=1, descending=True)
    weight.scatter_(1, order[:, k : k + 2], weight.gather(1, order[:, k - 1 : k]).expand(-1, 2))
    weight = weight.half()
    sumsq, null_sumsq = random_stats(1280, 2, 3, device="cpu")
    counter = _counter(cuda)
    ones = torch.ones_like(sumsq)
    assert_words_equal(*masks(weight.to(cuda), ones.to(cuda), null_sumsq.to(cuda), 0.01, "reference"), "ties")
    assert int(counter.item()) == 40 * 6, "every problem has equal scores straddling the k-th place"


@pytest.mark.gpu
@pytest.mark.parametrize("jump", [1e-4, 1e4], ids=["down", "up"])
def test_thread_kernel_scale_jumps_between_vectors(cuda, monkeypatch, jump):
    # every other vector 10^4 times smaller (down: the warm bound is far too high, a miss) or larger
    # (up: every block reaches it, the list fills and the bound is raised while scoring)
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "thread")
    weight = (torch.randn(70, 2560) * 0.02).half()
    sumsq, null_sumsq = random_stats(2560, 3, 9, device="cpu")
    sumsq[:, 1::2] *= jump
    assert_words_equal(*masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference"), "jumps")


@pytest.mark.gpu
def test_thread_kernel_zero_rows_heavy_columns_and_negative_zero(cuda, monkeypatch):
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "thread")
    weight = (torch.randn(96, 1280) * 0.02).half()
    weight[::5] = 0  # every score 0: all blocks tie
    weight[1::7, :300] *= 100  # hundreds of scores far above the rest
    sumsq, null_sumsq = random_stats(1280, 2, 5, device="cpu")
    cols = torch.randperm(1280, generator=torch.Generator().manual_seed(5))[:64]
    sumsq[..., cols] = -0.0
    null_sumsq[..., cols[:32]] = -0.0
    for sparsity in (0.01, 0.05):
        got = masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), sparsity, "reference")
        assert_words_equal(*got, f"s={sparsity}")


@pytest.mark.gpu
def test_thread_kernel_many_vectors_few_rows(cuda, monkeypatch):
    # 300 vectors over one row group: the launch splits the vectors into many spans
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "thread")
    weight = (torch.randn(32, 1280) * 0.02).bfloat16()
    sumsq, null_sumsq = random_stats(1280, 30, 10, device="cpu")
    assert_words_equal(*masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference"), "spans")


@pytest.mark.gpu
def test_default_matches_reference_batched_and_single_sd15(cuda, monkeypatch):
    # MEMLOC_CUDA_MASK unset: the backend's default kernels, batched (2 x 10 vectors) and single
    monkeypatch.delenv("MEMLOC_CUDA_MASK", raising=False)
    weights = [(torch.randn(d_out, d_in) * 0.02).half().to(cuda) for d_out, d_in in SD15_LAYERS]
    for lead in ((2, 10), (1, 1)):
        stats = [random_stats(d_in, *lead, device=cuda) for _, d_in in SD15_LAYERS]
        got = mk.memorized_masks(weights, [s for s, _ in stats], [n for _, n in stats], 0.01, backend="cuda")
        want = mk.memorized_masks(weights, [s for s, _ in stats], [n for _, n in stats], 0.01, backend="reference")
        for i, (a, b) in enumerate(zip(got, want)):
            assert_words_equal(a.words, b.words, f"lead {lead}, layer {i}")
