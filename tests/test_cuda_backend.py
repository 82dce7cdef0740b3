"""The CUDA C++ backend vs the reference oracle and the Triton backend: identical masks and bits, sums in tolerance.

Runs on a CUDA GPU with ``memloc_kernels._C`` built with ``MEMLOC_CUDA=1``; elsewhere every GPU test
skips with the reason (set ``MEMLOC_REQUIRE_CUDA_BACKEND=1`` to make that a failure instead, e.g.
on the GPU machine, so that a build without CUDA cannot pass silently).
"""

from __future__ import annotations

import pytest
import torch

import memloc_kernels as mk
from memloc_kernels import reference as ref
from memloc_kernels._dispatch import get_backend
from memloc_kernels.backends import cuda as cuda_backend

_AVAILABLE = cuda_backend.BACKEND.availability()[0]
_TRITON_OK = _AVAILABLE and get_backend("triton").availability()[0]

# The backends every CUDA result is compared with: the reference always, Triton where it runs.
ORACLES = [pytest.param("reference", id="vs-reference")] + (
    [pytest.param("triton", id="vs-triton")] if _TRITON_OK else []
)

WEIGHT_DTYPES = [
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
]

# d_in = 1, primes, not multiples of 32 (a lane's columns) or of 32 * E (a warp's), one warp of
# padding, d_in < 32 (no filter), the largest d_in of the kernel; d_out = 1.
SMALL_SHAPES = [
    (1, 1),
    (1, 37),
    (3, 7),
    (5, 33),
    (2, 64),
    (4, 65),
    (7, 100),
    (3, 257),
    (2, 1031),
    (2, 4097),
    (2, 16384),
]
SPARSITIES = [0.001, 0.01, 0.05, 0.3, 1.0]  # 0.001: k = 1 for d_in < 2000; 1.0: k = d_in

SD15_LAYERS = [(320, 1280)] * 5 + [(640, 2560)] * 5 + [(1280, 5120)] * 6
SDXL_FFN2 = [(640, 2560)] * 10 + [(1280, 5120)] * 60


def assert_words_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "words") -> None:
    """Exact equality of packed masks; on failure, how many words differ and where."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.cpu() != expected.cpu()).nonzero()
    if diff.numel():
        first = [tuple(i.tolist()) for i in diff[:5]]
        raise AssertionError(f"{what}: {diff.shape[0]} of {actual.numel()} words differ, first at {first}")


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality of two tensors of one dtype; on failure, how many elements differ and where."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    diff = (actual.contiguous().view(ints).cpu() != expected.contiguous().view(ints).cpu()).nonzero()
    if diff.numel():
        first = [tuple(i.tolist()) for i in diff[:5]]
        raise AssertionError(f"{what}: {diff.shape[0]} of {actual.numel()} elements differ in bits, first at {first}")


def random_stats(d_in: int, *lead: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive sumsq and null_sumsq, spread over a few orders of magnitude (made on the CPU: seeded)."""
    sumsq = torch.rand(*lead, d_in).pow(3) * 100
    null_sumsq = torch.rand(*lead, d_in).pow(3) * 100
    return sumsq.to(device), null_sumsq.to(device)


def masks(weight, sumsq, null_sumsq, sparsity, oracle: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed words of the cuda backend and of the oracle backend for the same inputs."""
    actual = mk.memorized_mask(weight, sumsq, null_sumsq, sparsity, packed=True, backend="cuda")
    expected = mk.memorized_mask(weight, sumsq, null_sumsq, sparsity, packed=True, backend=oracle)
    return actual.words, expected.words


# --- memorized_mask: eq. 5 + 6 (+ 7) -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memorized_mask_small_shapes(cuda, shape, dtype, sparsity, oracle):
    weight = torch.randn(shape).to(dtype).to(cuda)
    sumsq, null_sumsq = random_stats(shape[1], 2, 3, device=cuda)  # [S, T, d_in]
    assert_words_equal(*masks(weight, sumsq, null_sumsq, sparsity, oracle))


@pytest.mark.gpu
@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("lead", [(), (4,), (4, 3)], ids=["one-vector", "S4", "S4xT3"])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", [(320, 1280), (640, 2560), (1280, 5120)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_memorized_mask_sd15_shapes(cuda, shape, dtype, lead, oracle):
    weight = (torch.randn(shape) * 0.02).to(dtype).to(cuda)
    sumsq, null_sumsq = random_stats(shape[1], *lead, device=cuda)
    assert_words_equal(*masks(weight, sumsq, null_sumsq, 0.01, oracle))


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.01, 0.02, 0.03, 0.1], ids=lambda s: f"s{s}")
def test_memorized_mask_larger_k_takes_the_exact_fallback(cuda, monkeypatch, sparsity):
    # The block kernel: k above ~1.5% of d_in leaves too many filter candidates, so its block-wide
    # radix select runs (the warp kernel would take s = 1 %: MEMLOC_CUDA_MASK=block keeps it out).
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "block")
    weight = torch.randn(64, 5120).half().to(cuda)
    sumsq, null_sumsq = random_stats(5120, 2, 2, device=cuda)
    assert_words_equal(*masks(weight, sumsq, null_sumsq, sparsity, "reference"))


@pytest.mark.gpu
def test_memorized_mask_shared_null_and_1d_sumsq(cuda):
    weight = torch.randn(33, 700).half().to(cuda)
    sumsq, null_sumsq = random_stats(700, 3, device=cuda)
    null_1d = null_sumsq[0]
    assert_words_equal(*masks(weight, sumsq, null_1d, 0.02, "reference"), "[S] with shared null")
    assert_words_equal(*masks(weight, sumsq[0], null_1d, 0.02, "reference"), "1-D sumsq")


@pytest.mark.gpu
def test_memorized_mask_ors_into_out(cuda):
    weight = torch.randn(40, 300).half().to(cuda)
    sumsq, null_sumsq = random_stats(300, 2, 3, device=cuda)
    prior = torch.rand(2, 40, 300, device=cuda) < 0.05
    out = mk.pack_mask(prior.clone(), backend="reference")
    got = mk.memorized_mask(weight, sumsq, null_sumsq, 0.02, packed=True, out=out, backend="cuda")
    assert got is out
    fresh = ref.memorized_mask(weight, sumsq, null_sumsq, 0.02)
    assert_words_equal(got.words, ref.pack_mask(prior | fresh), "out | mask")


@pytest.mark.gpu
def test_memorized_mask_on_a_side_stream(cuda):
    weight = torch.randn(256, 1280).half().to(cuda)
    sumsq, null_sumsq = random_stats(1280, 3, 2, device=cuda)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = mk.memorized_mask(weight, sumsq, null_sumsq, 0.01, packed=True, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    expected = ref.pack_mask(ref.memorized_mask(weight, sumsq, null_sumsq, 0.01).reshape(-1, 1280))
    assert_words_equal(got.words.reshape(-1, 40), expected, "side stream")


# --- the warp kernel (mask_warp.cu) and the block kernel (memorized_mask.cu) ---------------------

# d_in multiples of 8 (the warp kernel's blocks) at the edges of its 256-column chunks and of its
# compiled chunk counts (5, 10, 20, 32): one block, one chunk, partial chunks, and rows that fill
# every chunk of their count (1280, 2560, 5120, 8192: the SD / SDXL widths).
WARP_SHAPES = [(5, 8), (3, 256), (4, 1000), (6, 1288), (2, 2568), (3, 5128), (2, 8192), (3, 1280), (2, 2560),
               (2, 5120)]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["warp", "block"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["one-vector", "S3", "S2xT3"])
@pytest.mark.parametrize("sparsity", [0.01, 0.05], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", WARP_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memorized_mask_warp_and_block_kernels(cuda, monkeypatch, shape, dtype, sparsity, lead, kernel):
    monkeypatch.setenv("MEMLOC_CUDA_MASK", kernel)
    weight = torch.randn(shape).to(dtype).to(cuda)
    sumsq, null_sumsq = random_stats(shape[1], *lead, device=cuda)
    assert_words_equal(*masks(weight, sumsq, null_sumsq, sparsity, "reference"), kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("warps", ["1", "3", "4", "8"])
def test_memorized_mask_warp_kernel_rows_per_block(cuda, monkeypatch, warps):
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    monkeypatch.setenv("MEMLOC_CUDA_MASK_WARPS", warps)
    weight = torch.randn(37, 2560).half().to(cuda)  # 37 rows: a last block with fewer rows than warps
    sumsq, null_sumsq = random_stats(2560, 4, 2, device=cuda)
    assert_words_equal(*masks(weight, sumsq, null_sumsq, 0.01, "reference"), f"{warps} warps")


@pytest.mark.gpu
def test_memorized_mask_warp_kernel_single_vectors_rows_of_different_scales(cuda, monkeypatch):
    # Single vectors: row counts that leave the last block fewer rows than warps, rows of very
    # different scales in one layer, all-zero rows (the exact path).
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    weights = [(torch.randn(d_out, d_in) * 0.02).half() for d_out, d_in in [(37, 2560), (5, 1280), (26, 5120)]]
    weights[0][::3] *= 1000
    weights[2][1::4] = 0
    for weight in weights:
        sumsq, null_sumsq = random_stats(weight.shape[1], device="cpu")
        got = masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference")
        assert_words_equal(*got, f"{tuple(weight.shape)}")


@pytest.mark.gpu
def test_memorized_mask_warp_kernel_counts_its_exact_path(cuda, monkeypatch):
    from memloc_kernels.backends.cuda import exact_path_counter

    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    counter = exact_path_counter(cuda)
    weight = (torch.randn(64, 1280) * 0.02).half()
    sumsq, null_sumsq = random_stats(1280, 2, device="cpu")
    counter.zero_()
    assert_words_equal(*masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference"), "random")
    assert int(counter.item()) == 0, "random statistics should never need the exact path"
    # the k-th and (k+1)-th scores of every row equal: ties straddle the k-th place in every problem
    weight = weight.float().abs() + 1
    k = mk.topk_count(0.01, 1280)
    order = weight.argsort(dim=1, descending=True)
    weight.scatter_(1, order[:, k : k + 2], weight.gather(1, order[:, k - 1 : k]).expand(-1, 2))
    weight = weight.half().float()  # exact in fp16: the ties survive the cast
    counter.zero_()
    assert_words_equal(*masks(weight.half().to(cuda), torch.ones_like(sumsq).to(cuda), null_sumsq.to(cuda), 0.01,
                              "reference"), "ties")
    assert int(counter.item()) == 2 * 64, "every problem has a tie at the k-th place"


@pytest.mark.gpu
def test_memorized_mask_wider_than_the_kernel_falls_back_to_torch(cuda):
    weight = torch.randn(2, 16385).half().to(cuda)
    sumsq, null_sumsq = random_stats(16385, 1, 2, device=cuda)
    assert_words_equal(*masks(weight, sumsq, null_sumsq, 0.01, "reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 257), (320, 1280)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_wanda_scores_are_the_oracles_bits(cuda, shape, dtype, oracle):
    weight = torch.randn(shape).to(dtype).to(cuda)
    sumsq, _ = random_stats(shape[1], 3, device=cuda)
    got = mk.wanda_scores(weight, sumsq, backend="cuda")
    assert_bits_equal(got, mk.wanda_scores(weight, sumsq, backend=oracle), "scores")


@pytest.mark.gpu
def test_geglu_sumsq_has_no_cuda_kernel(cuda):
    proj_out = torch.randn(4, 8, device=cuda).half()
    with pytest.raises(mk.BackendUnavailableError, match="does not implement geglu_sumsq"):
        mk.geglu_sumsq(proj_out, torch.zeros(4, device=cuda), backend="cuda")


# --- planted ties and degenerate statistics ------------------------------------------------------


def _quantized(shape, levels: int = 3) -> torch.Tensor:
    """Weights in {-levels..levels}: most scores tie with many others."""
    return torch.randint(-levels, levels + 1, shape).float()


@pytest.mark.gpu
@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", [(7, 100), (64, 1280), (16, 5120)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "case",
    [
        "quantized-weights-equal-sumsq",
        "repeated-columns",
        "zero-rows-and-zero-weights",
        "sumsq-equals-null",
        "zero-null",
        "zero-sumsq",
        "few-huge-columns",
        "ties-at-the-kth-score",
    ],
)
def test_memorized_mask_planted_ties(cuda, case, shape, dtype, oracle):
    d_out, d_in = shape
    sumsq, null_sumsq = random_stats(d_in, 2, 2, device="cpu")
    weight = torch.randn(shape)
    if case == "quantized-weights-equal-sumsq":
        weight, sumsq = _quantized(shape), torch.ones_like(sumsq)
    elif case == "repeated-columns":
        period = 10
        weight = weight[:, :period].repeat(1, d_in // period + 1)[:, :d_in].contiguous()
        sumsq = sumsq[..., :period].repeat(1, 1, d_in // period + 1)[..., :d_in].contiguous()
    elif case == "zero-rows-and-zero-weights":
        weight[::2] = 0
        weight[torch.rand(shape) < 0.9] = 0
    elif case == "sumsq-equals-null":
        null_sumsq = sumsq.clone()
    elif case == "zero-null":
        null_sumsq = torch.zeros_like(sumsq)
    elif case == "zero-sumsq":
        sumsq = torch.zeros_like(sumsq)
    elif case == "few-huge-columns":  # massive activations: the top k crowd into a few columns
        sumsq[..., torch.randperm(d_in)[:3]] = 1e6
    elif case == "ties-at-the-kth-score":  # the k-th and (k+1)-th scores of every row are equal
        weight = torch.randn(shape).abs() + 1
        k = mk.topk_count(0.01, d_in)
        order = weight.argsort(dim=1, descending=True)
        tied = weight.gather(1, order[:, k - 1 : k])
        weight.scatter_(1, order[:, k : k + 2], tied.expand(-1, 2))
        sumsq = torch.ones_like(sumsq)
    weight = weight.to(dtype).to(cuda)
    actual, expected = masks(weight, sumsq.to(cuda), null_sumsq.to(cuda), 0.01, oracle)
    assert_words_equal(actual, expected, case)
    if case in ("sumsq-equals-null", "zero-sumsq"):
        assert int(actual.ne(0).sum()) == 0, f"{case}: no score can beat its null score"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_memorized_mask_k1_and_sparsity_1(cuda, dtype):
    weight = torch.randn(50, 777).to(dtype).to(cuda)
    sumsq, null_sumsq = random_stats(777, 2, 2, device=cuda)
    assert_words_equal(*masks(weight, sumsq, null_sumsq, 1e-6, "reference"), "k = 1")
    actual, expected = masks(weight, sumsq, null_sumsq, 1.0, "reference")
    assert_words_equal(actual, expected, "k = d_in")
    above_null = ref.wanda_scores(weight, sumsq) > ref.wanda_scores(weight, null_sumsq)  # eq. 6 alone at s = 1
    assert_words_equal(actual, ref.pack_mask(above_null.any(dim=1)), "k = d_in is the null test alone")


# --- several layers per launch (memorized_masks) --------------------------------------------------


def _layers(shapes, device, dtype=torch.float16, lead=(2, 2)):
    weights = [(torch.randn(s) * 0.02).to(dtype).to(device) for s in shapes]
    stats = [random_stats(s[1], *lead, device=device) for s in shapes]
    return weights, [a for a, _ in stats], [b for _, b in stats]


def _check_layers(weights, sumsqs, nulls, sparsity, oracle):
    got = mk.memorized_masks(weights, sumsqs, nulls, sparsity, backend="cuda")
    expected = mk.memorized_masks(weights, sumsqs, nulls, sparsity, backend=oracle)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_words_equal(a.words, b.words, f"layer {i} {tuple(weights[i].shape)}")


@pytest.mark.gpu
@pytest.mark.parametrize("oracle", ORACLES)
def test_memorized_masks_sd15_16_layers(cuda, oracle):
    _check_layers(*_layers(SD15_LAYERS, cuda, lead=(3, 2)), 0.01, oracle)


@pytest.mark.gpu
@pytest.mark.parametrize("streams", ["1", "0"], ids=["side-streams", "serial"])
@pytest.mark.parametrize("warps", ["1", "4", "8"])
@pytest.mark.parametrize("lead", [(), (2,)], ids=["one-vector", "S2"])
def test_memorized_masks_warp_kernel_all_widths_in_one_call(cuda, monkeypatch, lead, warps, streams):
    # Every chunk class in one call, row counts that are not multiples of the rows per block; the
    # width groups' launches on side streams (the default) or all on the caller's stream
    # (MEMLOC_CUDA_MASK_STREAMS=0).
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    monkeypatch.setenv("MEMLOC_CUDA_MASK_STREAMS", streams)
    monkeypatch.setenv("MEMLOC_CUDA_MASK_WARPS", warps)
    shapes = [(1283, 1280), (7, 5128), (645, 2560), (1301, 5120), (3, 8192), (9, 8), (1, 2568)]
    _check_layers(*_layers(shapes, cuda, lead=lead), 0.01, "reference")


@pytest.mark.gpu
@pytest.mark.parametrize("warps", ["1", "4"])
@pytest.mark.parametrize("lead", [(), (3, 2)], ids=["one-vector", "S3xT2"])
def test_memorized_masks_warp_kernel_full_and_partial_rows_of_one_chunk_count(cuda, monkeypatch, lead, warps):
    # Rows that fill all their chunks and rows of the same chunk count with a partial last chunk
    # (clamped loads) in one call (5: 1280 / 1032, 10: 2560 / 2312, 20: 5120 / 4872), f16, bf16 and
    # f32 (one launch group each), all-zero rows (the exact path). (A kernel form specialized for
    # full rows was measured no faster and reverted twice, twelfth session; this keeps the case
    # covered.)
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    monkeypatch.setenv("MEMLOC_CUDA_MASK_WARPS", warps)
    shapes = [(33, 1280), (17, 1032), (9, 2560), (5, 2312), (6, 5120), (3, 4872)]
    weights, sumsqs, nulls = _layers(shapes, cuda, lead=lead)
    weights[1] = weights[1].to(torch.bfloat16)
    weights[4] = weights[4].float()
    weights[0][::8] = 0
    weights[4][1::3] = 0
    _check_layers(weights, sumsqs, nulls, 0.01, "reference")


@pytest.mark.gpu
@pytest.mark.parametrize("streams", ["1", "0"], ids=["side-streams", "serial"])
@pytest.mark.parametrize("warps", ["1", "4", "8"])
def test_memorized_masks_warp_kernel_mixed_dtypes_side_streams(cuda, monkeypatch, warps, streams):
    # Every chunk class and dtype (one launch group each), several layers per launch, rows of very
    # different scales and all-zero rows (the exact path), the groups' launches on side streams (the
    # default) or not (MEMLOC_CUDA_MASK_STREAMS=0); single vectors, then the same layers batched
    # (two vectors each: the staged kernels).
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    monkeypatch.setenv("MEMLOC_CUDA_MASK_WARPS", warps)
    monkeypatch.setenv("MEMLOC_CUDA_MASK_STREAMS", streams)
    shapes = [(1283, 1280), (7, 5128), (645, 2560), (1301, 5120), (3, 8192), (9, 8), (1, 2568), (40, 1280)]
    weights, sumsqs, nulls = _layers(shapes, cuda, lead=())
    weights[3][::7] *= 1000
    weights[0][5::9] = 0
    weights[-1] = weights[-1].to(torch.bfloat16)
    weights[2] = weights[2].float()
    _check_layers(weights, sumsqs, nulls, 0.01, "reference")
    _check_layers(weights, [s.unsqueeze(0).expand(2, -1).contiguous() for s in sumsqs], nulls, 0.01, "reference")


@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(), (3, 2)], ids=["one-vector", "S3xT2"])
def test_memorized_mask_warp_kernel_many_scores_at_the_bound(cuda, monkeypatch, lead):
    # Random rows, and rows whose top k fill whole 8-column blocks (k = 96 at d_in 1920): hundreds
    # of scores reach the raised bound, more than the compact list holds, so the selection ends in
    # the register drop loop (its fallback), which runs for hundreds of distinct values.
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    for d_out, d_in in [(40, 1280), (24, 5120)]:
        weight = (torch.randn(d_out, d_in) * 0.02).half()
        sumsq, null_sumsq = random_stats(d_in, *lead, device="cpu")
        got = masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference")
        assert_words_equal(*got, f"random {d_out}x{d_in}")
    blocks = torch.arange(240).repeat_interleave(8)  # d_in = 1920: k = 96 at s = 5 %
    within = torch.arange(8).repeat(240)
    weight = (2.0 ** (-blocks.float() / 4) * (1 + within.float() / 16)).expand(6, -1).half()
    weight = weight * torch.where(torch.rand(6, 1920) < 0.5, -1.0, 1.0).half()
    ones = torch.ones(*lead, 1920)
    assert_words_equal(*masks(weight.to(cuda), ones.to(cuda), (ones * 0.25).to(cuda), 0.05, "reference"), "blocks")


@pytest.mark.gpu
@pytest.mark.parametrize("warm", ["1", "0"], ids=["warm", "cold"])
def test_memorized_mask_warp_kernel_warm_start(cuda, monkeypatch, warm):
    # A warp walks the vectors of its row in order and starts each bound search a little below the
    # previous vector's k-th largest block maximum. Vectors whose scale jumps by 1e4 up and down (the
    # guess lands far above or below the bound), equal vectors (the guess is exact) and an all-zero
    # vector (no bound: the exact path) in one call; with the warm start and without
    # (MEMLOC_CUDA_MASK_WARM=0).
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    monkeypatch.setenv("MEMLOC_CUDA_MASK_WARM", warm)
    scales = torch.tensor([1.0, 1e4, 1e-4, 1.0, 1.0, 0.0, 3.0, 1e-8, 1e8, 0.5])
    for d_out, d_in in [(33, 1280), (9, 2560), (21, 5120)]:
        weight = (torch.randn(d_out, d_in) * 0.02).half()
        sumsq, null_sumsq = random_stats(d_in, 2, 10, device="cpu")
        sumsq = sumsq * scales[:, None]
        sumsq[:, 4] = sumsq[:, 3]
        null_sumsq = null_sumsq * scales[:, None]
        got = masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference")
        assert_words_equal(*got, f"warm={warm} {d_out}x{d_in}")


@pytest.mark.gpu
@pytest.mark.parametrize("min_blocks", ["2", "3"], ids=["regs128", "regs80"])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_memorized_mask_warp_kernel_register_budget(cuda, monkeypatch, dtype, min_blocks):
    # Unstaged (single-vector) launches run kernels compiled for 80 registers per thread (6 blocks
    # per SM) unless MEMLOC_CUDA_MASK_MINBLOCKS=2 (128 registers): all widths of one call, d_out not a
    # multiple of the rows per block; masks equal the reference's under both.
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    monkeypatch.setenv("MEMLOC_CUDA_MASK_MINBLOCKS", min_blocks)
    shapes = [(1283, 5120), (643, 2560), (321, 1280), (77, 8192)]
    weights = [(torch.randn(s) * 0.02).to(dtype).to(cuda) for s in shapes]
    stats = [random_stats(d_in, device="cpu") for _, d_in in shapes]
    got = mk.memorized_masks(weights, [s.to(cuda) for s, _ in stats], [n.to(cuda) for _, n in stats], 0.01,
                             backend="cuda")
    for i, (g, w, (s, n)) in enumerate(zip(got, weights, stats)):
        expected = mk.memorized_mask(w, s.to(cuda), n.to(cuda), 0.01, packed=True, backend="reference")
        assert_words_equal(g.words, expected.words, f"min_blocks={min_blocks} layer {i} {tuple(w.shape)}")


# The bound path (batched calls): block bounds from the pair maxima of |W| and of the norms, with
# the block-maxima path as its fallback (mask_warp.cuh, solve_problem_bounds).
BOUND_SHAPES = [(7, 1280), (5, 2568), (9, 5120), (3, 8192), (4, 1000), (6, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("bounds", ["1", "0"], ids=["bounds", "no-bounds"])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", BOUND_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memorized_mask_warp_kernel_bound_path(cuda, monkeypatch, shape, dtype, bounds):
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    monkeypatch.setenv("MEMLOC_CUDA_MASK_BOUNDS", bounds)
    loose = cuda_backend.loose_bound_counter(cuda)
    loose.zero_()
    weight = (torch.randn(shape) * 0.02).to(dtype)
    sumsq, null_sumsq = random_stats(shape[1], 2, 3, device="cpu")
    assert_words_equal(*masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference"), bounds)
    problems = shape[0] * 6
    if bounds == "0":
        assert int(loose.item()) == 0, "MEMLOC_CUDA_MASK_BOUNDS=0 keeps the block-maxima path"
    else:  # random rows: the bounds nearly always list the top k
        assert int(loose.item()) <= problems // 10, f"{int(loose.item())} of {problems} problems left the bound path"


@pytest.mark.gpu
def test_pair_norm_maxima_kernel(cuda):
    norms = torch.rand(3, 2, 72) * 10
    flat = norms.view(-1)
    flat[[0, 5, 9, 20]] = torch.tensor([float("inf"), float("nan"), -0.0, 0.0])
    flat[[30, 31]] = float("inf")
    got = cuda_backend._pair_maxima(norms.to(cuda)).cpu()
    expected = (norms.abs() + norms * 0).unflatten(-1, (-1, 2)).amax(-1)  # NaN where a pair is not finite
    assert got.shape == (3, 2, 36)
    assert torch.isnan(got.view(-1)[[0, 2, 15]]).all() and not torch.signbit(got.view(-1)[4])
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_memorized_mask_warp_kernel_loose_bounds_fall_back(cuda, monkeypatch):
    # Within every column pair the large |w| meets the small norm and the other way round: the pair
    # bounds (max |w| * max norm) overshoot every score about 1000 times, so the listed blocks never
    # show k scores >= lo. Then equal bounds everywhere (no window of counts). Every problem goes to
    # the block-maxima path and still matches the reference.
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    loose = cuda_backend.loose_bound_counter(cuda)
    g = torch.Generator().manual_seed(5)
    rows, d_in = 16, 2560
    even = torch.arange(d_in) % 2 == 0
    weight = torch.where(even, 1 + torch.rand(rows, d_in, generator=g), 1e-3 * torch.rand(rows, d_in, generator=g))
    weight = (weight * torch.where(torch.rand(rows, d_in, generator=g) < 0.5, -1.0, 1.0)).half()
    sumsq = torch.where(even, 1e-6 * torch.rand(2, 3, d_in, generator=g), 1 + torch.rand(2, 3, d_in, generator=g))
    null_sumsq = torch.rand(2, 3, d_in, generator=g) * 1e-6
    loose.zero_()
    assert_words_equal(*masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01, "reference"), "crossed")
    assert int(loose.item()) == rows * 6, "crossed pairs: every problem leaves the bound path"
    weight = torch.full((rows, d_in), 0.5).half()
    ones = torch.ones(2, 3, d_in)
    loose.zero_()
    assert_words_equal(*masks(weight.to(cuda), ones.to(cuda), (ones / 4).to(cuda), 0.01, "reference"), "equal")
    assert int(loose.item()) == rows * 6, "equal bounds: no window, every problem leaves the bound path"


@pytest.mark.gpu
@pytest.mark.parametrize("bounds", ["1", "0"], ids=["bounds", "no-bounds"])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_memorized_mask_warp_kernel_infinite_weights_and_statistics(cuda, monkeypatch, dtype, bounds):
    # +-inf weights and inf statistics (check_finite=False): inf scores, tied, take the top places;
    # a pair bound with an inf in it is NaN (above every score), so those blocks are always listed.
    monkeypatch.setenv("MEMLOC_CUDA_MASK", "warp")
    monkeypatch.setenv("MEMLOC_CUDA_MASK_BOUNDS", bounds)
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(12, 2560, generator=g) * 0.02
    weight = torch.where(weight.abs() < 1e-3, 1e-3, weight)  # no zero weights after the cast either
    weight.view(-1)[torch.randperm(weight.numel(), generator=g)[:40]] = float("inf")
    weight.view(-1)[torch.randperm(weight.numel(), generator=g)[:40]] = float("-inf")
    weight = weight.to(dtype)
    sumsq, null_sumsq = random_stats(2560, 2, 3, device="cpu")
    sumsq = sumsq + 1e-3  # no zero statistics: inf * 0 would make NaN scores
    sumsq.view(-1)[torch.randperm(sumsq.numel(), generator=g)[:30]] = float("inf")
    args = (weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), 0.01)
    got = mk.memorized_mask(*args, packed=True, check_finite=False, backend="cuda")
    expected = mk.memorized_mask(*args, packed=True, check_finite=False, backend="reference")
    assert_words_equal(got.words, expected.words, f"inf, bounds={bounds}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["warp", "block"])
@pytest.mark.parametrize("sparsity", [0.01, 0.3], ids=lambda s: f"s{s}")
def test_memorized_mask_negative_zero_statistics(cuda, monkeypatch, kernel, sparsity):
    # sqrt(-0.0) = -0.0 and |W| * -0.0 = -0.0: the reference ties it with +0.0 (the lowest score);
    # ordered by raw bits it would sit below -1 (int32) or above every score (uint32).
    monkeypatch.setenv("MEMLOC_CUDA_MASK", kernel)
    weight = torch.randn(48, 1280).half()
    sumsq, null_sumsq = random_stats(1280, 2, device="cpu")
    cols = torch.randperm(1280, generator=torch.Generator().manual_seed(3))[:64]
    sumsq[..., cols] = -0.0
    null_sumsq[..., cols[:32]] = -0.0
    assert torch.signbit(sumsq).any(), "the statistics hold -0.0"
    assert_words_equal(*masks(weight.to(cuda), sumsq.to(cuda), null_sumsq.to(cuda), sparsity, "reference"), kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("oracle", ORACLES)
def test_memorized_masks_sdxl_ffn2_70_layers(cuda, oracle):
    _check_layers(*_layers(SDXL_FFN2, cuda, lead=(2, 2)), 0.01, oracle)


@pytest.mark.gpu
def test_memorized_masks_more_layers_than_one_launch_mixed_dtypes(cuda):
    # 70 layers of one shape class (two launches of the 64-layer table), plus other classes and dtypes.
    shapes = [(8, 96)] * 70 + [(5, 1280), (3, 100), (4, 2560)]
    weights, sumsqs, nulls = _layers(shapes, cuda, lead=(2, 3))
    weights[-1] = weights[-1].float()
    weights[-2] = weights[-2].bfloat16()
    _check_layers(weights, sumsqs, nulls, 0.05, "reference")
    singles = [mk.memorized_mask(w, s, n, 0.05, packed=True, backend="cuda") for w, s, n in zip(weights, sumsqs, nulls)]
    multi = mk.memorized_masks(weights, sumsqs, nulls, 0.05, backend="cuda")
    for i, (a, b) in enumerate(zip(multi, singles)):
        assert_words_equal(a.words, b.words, f"multi vs single, layer {i}")


# --- accumulate_sumsq ---------------------------------------------------------------------------

INPUT_DTYPES = [
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
]
# float32 accumulators: every output is a sum of <= 4096 positive squares taken in <= 56 sequential
# float32 additions (32 per row-lane, 8 lanes, then chunk partials), so its relative error is
# below 56 * 2^-24 = 3.3e-6; float64: below 1e-13.
ACC_TOLERANCES = [
    pytest.param(torch.float32, 1e-5, id="acc-fp32-rtol1e-5"),
    pytest.param(torch.float64, 1e-12, id="acc-fp64-rtol1e-12"),
]
# (rows, d_in, group_size): single sums, groups of one row, groups that span several 256-row
# chunks with a tail, SD1.5's 64x64 latents (4096 tokens) per sample.
SUMSQ_SHAPES = [
    (1, 1, None),
    (7, 33, None),
    (12, 100, 4),
    (300, 65, 1),
    (600, 257, 300),
    (513, 31, None),
    (2 * 4096, 1280, 4096),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SUMSQ_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
@pytest.mark.parametrize("acc_dtype, rtol", ACC_TOLERANCES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_accumulate_sumsq_matches_float64(cuda, dtype, acc_dtype, rtol, shape):
    rows, d_in, group_size = shape
    h = (torch.randn(rows, d_in) * 3).to(dtype).to(cuda)
    groups = 1 if group_size is None else rows // group_size
    start = torch.rand(groups, d_in, dtype=torch.float64).to(acc_dtype)
    expected = start.double() + h.double().cpu().square().reshape(groups, -1, d_in).sum(dim=1)
    acc = start.to(cuda, copy=True)
    mk.accumulate_sumsq(h, acc[0] if group_size is None else acc, group_size=group_size, backend="cuda")
    torch.testing.assert_close(acc.double().cpu(), expected, rtol=rtol, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=["acc-fp32", "acc-fp64"])
def test_accumulate_sumsq_is_deterministic(cuda, acc_dtype):
    h = torch.randn(2 * 4096, 640).half().to(cuda)
    runs = []
    for _ in range(3):
        acc = torch.zeros(2, 640, dtype=acc_dtype, device=cuda)
        mk.accumulate_sumsq(h, acc, group_size=4096, backend="cuda")
        runs.append(acc)
    assert_bits_equal(runs[1], runs[0], "second run")
    assert_bits_equal(runs[2], runs[0], "third run")


@pytest.mark.gpu
@pytest.mark.skipif(not _TRITON_OK, reason="triton backend unavailable")
def test_accumulate_sumsq_agrees_with_triton(cuda):
    h = torch.randn(4, 4096, 1280).half().to(cuda)
    a = torch.zeros(4, 1280, device=cuda)
    b = torch.zeros(4, 1280, device=cuda)
    mk.accumulate_sumsq(h, a, group_size=4096, backend="cuda")
    mk.accumulate_sumsq(h, b, group_size=4096, backend="triton")
    torch.testing.assert_close(a, b, rtol=2e-5, atol=0)


# --- apply_mask / restore -----------------------------------------------------------------------


def _special_values(weight: torch.Tensor) -> torch.Tensor:
    """Plants -0.0, +-inf, a NaN with a payload and a subnormal, to check that bits move exactly."""
    flat = weight.view(-1)
    n = flat.numel()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    payload_nan = {
        torch.float16: 0x7E01,
        torch.bfloat16: 0x7FC1,
        torch.float32: 0x7FC00001,
        torch.float64: 0x7FF8000000000001,
    }[weight.dtype]
    specials = [(0, -0.0), (1, float("inf")), (2, float("-inf")), (4, torch.finfo(weight.dtype).tiny / 4)]
    for i, value in specials:
        if i < n:
            flat[i] = value
    if 3 < n:
        flat.view(ints)[3] = payload_nan
    return weight


@pytest.mark.gpu
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0], ids=lambda d: f"p{d}")
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 33), (64, 1280), (1280, 5120)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_apply_and_restore_are_bit_exact(cuda, shape, dtype, density):
    weight = _special_values(torch.randn(shape).to(dtype)).to(cuda)
    mask = torch.rand(shape, device=cuda) < density
    if density > 0:
        mask.view(-1)[:5] = True  # the special values are removed
    original = weight.clone()
    expected_weight = original.clone()
    expected_removed = ref.apply_mask(expected_weight, mask)
    record = mk.apply_mask(weight, mask, backend="cuda")
    assert_bits_equal(record.removed, expected_removed, "removed values")
    assert_bits_equal(weight, expected_weight, "pruned weight")
    mk.restore(weight, record, backend="cuda")
    assert_bits_equal(weight, original, "restored weight")


@pytest.mark.gpu
def test_apply_mask_ignores_padding_bits(cuda):
    # A PackedMask whose last words carry bits past d_in: like the reference, they are not part of the mask.
    d_in = 37
    weight = torch.randn(4, d_in).half().to(cuda)
    words = torch.randint(-(2**31), 2**31 - 1, (4, 2), dtype=torch.int32).to(cuda)
    mask = mk.PackedMask(words, d_in)
    expected_weight = weight.clone()
    expected_removed = ref.apply_mask(expected_weight, ref.unpack_mask(words, d_in))
    record = mk.apply_mask(weight, mask, backend="cuda")
    assert_bits_equal(record.removed, expected_removed, "removed values")
    assert_bits_equal(weight, expected_weight, "pruned weight")


@pytest.mark.gpu
def test_restore_rejects_a_wrong_removed_length(cuda):
    weight = torch.randn(8, 64).half().to(cuda)
    record = mk.apply_mask(weight, torch.rand(8, 64, device=cuda) < 0.2, backend="cuda")
    short = mk.PruneRecord(record.mask, record.removed[:-1], record.shape, record.dtype)
    with pytest.raises(ValueError, match="removed holds"):
        mk.restore(weight, short, backend="cuda")


# --- popcounts: mask_density and mask_iou -------------------------------------------------------


def _random_words(n: int, w: int, ands: int, device) -> torch.Tensor:
    """Random int32 words with each bit set with probability 2**-ands (an AND of random words)."""
    words = torch.full((n, w), -1, dtype=torch.int32, device=device)
    for _ in range(ands):
        words &= torch.randint(-(2**31), 2**31 - 1, (n, w), dtype=torch.int32, device=device)
    return words


def _intersections_oracle(words: torch.Tensor) -> torch.Tensor:
    """popcount(a & b) for all pairs via float64 matmuls of 0/1 bits, 4096 words at a time (exact)."""
    n, w = words.shape
    total = torch.zeros(n, n, dtype=torch.int64, device=words.device)
    for start in range(0, w, 4096):
        bits = ref.unpack_mask(words[:, start : start + 4096], min(4096, w - start) * 32).double()
        total += (bits @ bits.T).round().to(torch.int64)
    return total


@pytest.mark.gpu
@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("n, w", [(1, 1), (2, 3), (16, 33), (17, 40), (65, 129), (130, 4101)], ids=lambda v: str(v))
def test_mask_popcount_and_intersections_small(cuda, n, w, oracle):
    words = _random_words(n, w, 2, cuda)  # density 1/4
    words[0] = 0  # an empty mask
    impl, other = get_backend("cuda"), get_backend(oracle)
    assert torch.equal(impl.mask_popcount(words).cpu(), other.mask_popcount(words).cpu())
    assert torch.equal(impl.mask_intersections(words).cpu(), other.mask_intersections(words).cpu())


@pytest.mark.gpu
def test_mask_intersections_long_masks_split_over_blocks(cuda):
    # 300 masks of 100003 words (3.2 M bits): several tiles, the word range split across blocks.
    words = _random_words(300, 100_003, 7, cuda)  # density 1/128
    got = get_backend("cuda").mask_intersections(words)
    assert torch.equal(got, _intersections_oracle(words))
    assert torch.equal(get_backend("cuda").mask_popcount(words), torch.diagonal(got))


@pytest.mark.gpu
def test_mask_iou_and_density_through_the_ops_api(cuda):
    bits = torch.rand(6, 16, 100, device=cuda) < 0.1
    bits[1] = False  # empty masks: IoU NaN against each other
    bits[2] = False
    for name, fn in (("iou", mk.mask_iou), ("density", mk.mask_density)):
        got = fn(mk.pack_mask(bits), backend="cuda")
        expected = fn(mk.pack_mask(bits), backend="reference")
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=name)


# --- pack / unpack ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 32), (4, 33), (7, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_and_unpack_match_reference(cuda, shape):
    mask = torch.rand(shape, device=cuda) < 0.4
    words = get_backend("cuda").pack_mask(mask)
    assert torch.equal(words, ref.pack_mask(mask))
    assert torch.equal(get_backend("cuda").unpack_mask(words, shape[1]), mask)


# --- availability (runs everywhere) ---------------------------------------------------------------


def test_availability_explains_itself():
    ok, why = cuda_backend.BACKEND.availability()
    assert cuda_backend.BACKEND.name == "cuda"
    assert cuda_backend.BACKEND.supports(torch.device("cuda", 0))
    assert not cuda_backend.BACKEND.supports(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert not ok and why, "without a CUDA device the backend must be unavailable, with a reason"
    if ok:
        assert why == ""
