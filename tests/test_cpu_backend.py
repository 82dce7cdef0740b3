"""The C++/OpenMP CPU backend against the reference oracle: identical masks and bits, sums within tolerance."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_masks_equal

import memloc_kernels as mk
from memloc_kernels import reference as ref
from memloc_kernels.backends import cpu as cpu_backend

_AVAILABLE, _WHY = cpu_backend.BACKEND.availability()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"cpu backend not built: {_WHY}")

WEIGHT_DTYPES = [
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
]

# Shapes that break tiling: d_in = 1, primes, not multiples of 8/32/64 (the kernel's lanes and
# chunks), a tail chunk; d_out = 1.
SMALL_SHAPES = [(1, 1), (1, 37), (3, 7), (5, 33), (2, 64), (4, 65), (7, 100), (3, 257), (2, 1031)]
SPARSITIES = [0.001, 0.01, 0.05, 0.3, 1.0]  # 0.001: k = 1 everywhere; 1.0: k = d_in

# SD1.5's FFN second layers (d_out, d_in), one of each size.
SD15_SHAPES = [(320, 1280), (640, 2560), (1280, 5120)]


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality of two tensors of one dtype; on failure, how many elements differ and where."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    diff = (actual.contiguous().view(ints) != expected.contiguous().view(ints)).nonzero()
    if diff.numel():
        first = [tuple(i.tolist()) for i in diff[:5]]
        raise AssertionError(f"{what}: {diff.shape[0]} of {actual.numel()} elements differ in bits, first at {first}")


def random_stats(d_in: int, *lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive sumsq and null_sumsq of the given shape, spread over a few orders of magnitude."""
    sumsq = torch.rand(*lead, d_in).pow(3) * 100
    null_sumsq = torch.rand(*lead, d_in).pow(3) * 100
    return sumsq, null_sumsq


def both_masks(weight, sumsq, null_sumsq, sparsity, check_finite=True):
    actual = mk.memorized_mask(weight, sumsq, null_sumsq, sparsity, check_finite=check_finite, backend="cpu")
    expected = ref.memorized_mask(weight, sumsq, null_sumsq, sparsity)
    return actual, expected


# --- eq. 5 + 6: selection ---------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memorized_mask_matches_reference(shape, dtype, sparsity):
    weight = torch.randn(shape).to(dtype)
    sumsq, null_sumsq = random_stats(shape[1])
    assert_masks_equal(*both_masks(weight, sumsq, null_sumsq, sparsity))


@pytest.mark.parametrize("shape", SD15_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memorized_mask_sd15_shapes(shape):
    weight = (torch.randn(shape) * 0.02).half()
    sumsq, null_sumsq = random_stats(shape[1])
    assert_masks_equal(*both_masks(weight, sumsq, null_sumsq, 0.01))


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_memorized_mask_batched_subsets_and_timesteps(dtype):
    weight = torch.randn(9, 300).to(dtype)
    sumsq, null_sumsq = random_stats(300, 3, 4)  # [S, T, d_in]: union over T (eq. 7)
    assert_masks_equal(*both_masks(weight, sumsq, null_sumsq, 0.02), "[S, T] with [S, T] null")
    assert_masks_equal(*both_masks(weight, sumsq, null_sumsq[0, 0], 0.02), "[S, T] with a shared [d_in] null")
    assert_masks_equal(*both_masks(weight, sumsq[:, 0], null_sumsq[:, 0], 0.02), "[S] with [S] null")


@pytest.mark.parametrize("packed", [False, True], ids=["bool_out", "packed_out"])
def test_memorized_mask_or_into_out(packed):
    weight = torch.randn(6, 97).half()
    first = random_stats(97, 2)
    second = random_stats(97, 2)
    out = mk.memorized_mask(weight, *first, 0.05, packed=packed, backend="cpu")
    returned = mk.memorized_mask(weight, *second, 0.05, packed=packed, out=out, backend="cpu")
    assert returned is out
    expected = ref.memorized_mask(weight, *first, 0.05) | ref.memorized_mask(weight, *second, 0.05)
    assert_masks_equal(mk.unpack_mask(out) if packed else out, expected)


@pytest.mark.parametrize("threads", [1, 2], ids=["1thread", "2threads"])
def test_memorized_mask_independent_of_thread_count(threads):
    weight = torch.randn(64, 640).half()
    sumsq, null_sumsq = random_stats(640)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = mk.memorized_mask(weight, sumsq, null_sumsq, 0.01, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    assert_masks_equal(actual, ref.memorized_mask(weight, sumsq, null_sumsq, 0.01))


# --- planted ties and degenerate rows -----------------------------------------------------------


def _quantized(shape, levels: int, dtype) -> torch.Tensor:
    """Weights with few distinct magnitudes, so that many scores tie exactly."""
    return (torch.randint(-levels, levels + 1, shape).float() / levels).to(dtype)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("d_in", [33, 1000, 4099])
def test_ties_equal_weights_and_equal_sumsq(d_in, dtype):
    weight = _quantized((12, d_in), 3, dtype)
    sumsq = torch.full((d_in,), 4.0)  # every column's norm ties: the order is decided by |W| and the column
    null_sumsq = torch.randint(0, 9, (d_in,)).float()
    for sparsity in (0.01, 0.1, 0.5):
        assert_masks_equal(*both_masks(weight, sumsq, null_sumsq, sparsity), f"s={sparsity}")


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_ties_repeated_columns(dtype):
    base = torch.randn(10, 40)
    weight = torch.cat([base, base, base[:, :13]], dim=1).to(dtype)  # columns repeat exactly
    sumsq_base = torch.rand(40) * 10
    sumsq = torch.cat([sumsq_base, sumsq_base, sumsq_base[:13]])
    null_sumsq = torch.rand(93) * 10
    for sparsity in (0.02, 0.05, 0.2):
        assert_masks_equal(*both_masks(weight, sumsq, null_sumsq, sparsity), f"s={sparsity}")


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_ties_sumsq_equal_to_null(dtype):
    weight = torch.randn(8, 130).to(dtype)
    sumsq = torch.rand(130) * 10
    null_sumsq = torch.rand(130) * 10
    null_sumsq[::3] = sumsq[::3]  # score == null score there: never memorized (strict >)
    actual, expected = both_masks(weight, sumsq, null_sumsq, 0.1)
    assert_masks_equal(actual, expected)
    assert not actual[:, ::3].any()


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_zero_weights_and_zero_rows(dtype):
    weight = torch.randn(9, 700).to(dtype)
    weight[torch.rand(9, 700) < 0.5] = 0
    weight[2] = 0  # all-zero row: every score is 0 and ties with its null score
    weight[5, :650] = 0  # 50 nonzero weights: most of the row ties at score 0
    weight[7] = -0.0
    sumsq, null_sumsq = random_stats(700)
    sumsq[:50] = 0  # zero norms: score 0 whatever the weight
    sumsq[50] = -0.0  # passes validation (not < 0); sqrt(-0.0) = -0.0 ties with 0
    actual, expected = both_masks(weight, sumsq, null_sumsq, 0.05)
    assert_masks_equal(actual, expected)
    assert not actual[2].any() and not actual[7].any()


def test_all_zero_weight_and_zero_null():
    weight = torch.zeros(3, 64, dtype=torch.float16)
    sumsq, _ = random_stats(64)
    null_sumsq = torch.zeros(64)
    actual, expected = both_masks(weight, sumsq, null_sumsq, 0.1)
    assert_masks_equal(actual, expected)
    assert not actual.any()


def test_nan_and_inf_weights_follow_torch_topk():
    # Degenerate input the API refuses by default (check_finite) and this backend still defines:
    # torch.topk ranks NaN above every number, so a NaN score takes a top-k slot without ever
    # being memorized (NaN > x is false). (The triton backend's kernels do not follow this rule.)
    weight = torch.randn(12, 300)
    weight[torch.rand(12, 300) < 0.03] = float("nan")
    weight[3] = float("nan")
    weight[4, :2] = float("nan")
    weight[6, 10:20] = float("inf")
    sumsq, null_sumsq = random_stats(300)
    sumsq[15] = 0  # inf * 0 = NaN score in row 6
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for sparsity in (0.005, 0.02, 0.1):
            actual, expected = both_masks(weight.to(dtype), sumsq, null_sumsq, sparsity, check_finite=False)
            assert_masks_equal(actual, expected, f"{dtype} s={sparsity}")


# --- eq. 2/4: scores ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (17, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_wanda_scores_are_ieee_float32(shape, dtype):
    weight = torch.randn(shape).to(dtype)
    sumsq = torch.rand(3, shape[1]) * 50
    sumsq[0, 0] = 0
    actual = mk.wanda_scores(weight, sumsq, backend="cpu")
    # IEEE float32 sqrt (the float64 sqrt rounded to float32 is correctly rounded) times |W|.
    norms = torch.sqrt(sumsq.double()).float()
    assert_bits_equal(actual, weight.float().abs() * norms[:, None, :], "scores vs IEEE float32")
    # torch.sqrt on the CPU may be one ulp off (a vector math library), hence 2 ulp here.
    torch.testing.assert_close(actual, ref.wanda_scores(weight, sumsq), rtol=2**-22, atol=0)


# --- sums of squares ------------------------------------------------------------------------------

# (h dtype, accumulator dtype, rtol against float64 sums). The kernel sums in float64 (squares of
# fp16/bf16/fp32 are exact there) and rounds once into the accumulator: measured <= 6e-8 with
# float32 accumulators (half an ulp), <= 3e-15 with float64 ones.
ACCUMULATE_CASES = [
    pytest.param(h, acc, tol, id=f"{hid}-{aid}")
    for h, hid in [(torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32"), (torch.float64, "fp64")]
    for acc, aid, tol in [(torch.float32, "acc32", 2.4e-7), (torch.float64, "acc64", 1e-12)]
]


@pytest.mark.parametrize("h_dtype, acc_dtype, rtol", ACCUMULATE_CASES)
@pytest.mark.parametrize(
    "rows, d_in, group_size",
    [(1, 1, None), (37, 33, None), (600, 77, 200), (2500, 65, None), (3 * 2100, 300, 2100)],
    ids=["1x1", "37x33", "groups200", "2500rows", "groups2100"],  # >1024 rows: several row blocks
)
def test_accumulate_sumsq_vs_float64(rows, d_in, group_size, h_dtype, acc_dtype, rtol):
    h = (torch.randn(rows, d_in) * 3).to(h_dtype)
    acc_shape = (d_in,) if group_size is None else (rows // group_size, d_in)
    acc = torch.rand(acc_shape, dtype=acc_dtype)
    expected = acc.double().clone()
    ref.accumulate_sumsq(h.double(), expected, group_size)
    mk.accumulate_sumsq(h, acc, group_size=group_size, backend="cpu")
    torch.testing.assert_close(acc.double(), expected, rtol=rtol, atol=0)


def test_accumulate_sumsq_deterministic_across_thread_counts():
    h = torch.randn(4 * 3000, 130).half()
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            acc = torch.zeros(4, 130)
            mk.accumulate_sumsq(h.view(4, 3000, 130), acc, group_size=3000, backend="cpu")
            results.append(acc)
    finally:
        torch.set_num_threads(previous)
    assert_bits_equal(results[1], results[0], "2 threads vs 1")
    assert_bits_equal(results[2], results[0], "rerun")


# GEGLU: the kernel computes torch's formula 0.5 * x * (1 + erf(x / sqrt(2))) in float32 with the
# C library's erff, then rounds to the dtype. torch's own CPU GELU uses a vectorized erf
# approximation, so elements differ where the formula cancels (gate < -2, |gelu| < 0.05): measured
# on 1.3 M N(0, 2) gates, fp16: 0.6% of h differ (mostly 1 ulp, up to 11 ulp, |diff| <= 2.5e-4);
# bf16: 0.07% (<= 2 ulp); fp32: most elements by a few ulp (|diff| <= 4e-6); fp64: <= 1e-14.
GEGLU_CASES = [
    pytest.param(torch.float16, 5e-4, 1e-3, 0.98, id="fp16"),
    pytest.param(torch.bfloat16, 5e-4, 8e-3, 0.995, id="bf16"),
    pytest.param(torch.float32, 1e-5, 1e-6, 0.0, id="fp32"),
    pytest.param(torch.float64, 1e-13, 1e-13, 0.0, id="fp64"),
]


@pytest.mark.parametrize("dtype, atol, rtol, min_bit_exact", GEGLU_CASES)
@pytest.mark.parametrize("group_size", [None, 50], ids=["one_sum", "groups50"])
def test_geglu_sumsq_vs_reference(dtype, atol, rtol, min_bit_exact, group_size):
    proj_out = (torch.randn(200, 2 * 131) * 2).to(dtype)
    acc_shape = (131,) if group_size is None else (200 // group_size, 131)
    acc = torch.zeros(acc_shape, dtype=torch.float64)
    h = mk.geglu_sumsq(proj_out, acc, group_size=group_size, backend="cpu")
    expected_h = ref.geglu(proj_out)
    assert h.dtype == dtype and h.shape == (200, 131)
    torch.testing.assert_close(h, expected_h, atol=atol, rtol=rtol)
    bit_exact = (h == expected_h).double().mean().item()
    assert bit_exact >= min_bit_exact, f"only {bit_exact:.4f} of h is bit-identical to the reference"
    # acc holds the float64 sums of squares of the returned (rounded) h
    own = torch.zeros(acc_shape, dtype=torch.float64)
    ref.accumulate_sumsq(h.double(), own, group_size)
    torch.testing.assert_close(acc, own, rtol=1e-13, atol=0)


def test_geglu_output_keeps_leading_dims():
    proj_out = torch.randn(2, 5, 2 * 16).half()
    h = mk.geglu_sumsq(proj_out, torch.zeros(2, 16), group_size=5, backend="cpu")
    assert h.shape == (2, 5, 16)
    torch.testing.assert_close(h, ref.geglu(proj_out), atol=5e-4, rtol=1e-3)


# --- packed masks ---------------------------------------------------------------------------------

MASK_SHAPES = [(1, 1), (3, 31), (5, 32), (7, 33), (4, 100), (2, 3, 65)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pack_unpack_roundtrip(shape):
    mask = torch.rand(shape) < 0.3
    packed = mk.pack_mask(mask, backend="cpu")
    expected_words = ref.pack_mask(mask)
    assert_bits_equal(packed.words, expected_words, "words")
    assert_masks_equal(mk.unpack_mask(packed, backend="cpu"), mask)
    assert_masks_equal(mk.unpack_mask(packed, backend="cpu"), ref.unpack_mask(expected_words, shape[-1]))


APPLY_DTYPES = WEIGHT_DTYPES + [pytest.param(torch.float64, id="fp64")]

# Special bit patterns per dtype (unsigned): -0.0, NaNs with payloads (quiet and signalling, both
# signs), -inf.
SPECIAL_BITS = {
    torch.float16: [0x8000, 0x7E01, 0xFD55, 0x7C01, 0xFC00],
    torch.bfloat16: [0x8000, 0x7FC1, 0xFF91, 0x7F81, 0xFF80],
    torch.float32: [0x80000000, 0x7FC00123, 0xFFAA55FF, 0x7F800001, 0xFF800000],
    torch.float64: [0x8000000000000000, 0x7FF8000000000123, 0xFFF800000000AAAB, 0x7FF0000000000001, 0xFFF0000000000000],
}
_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _special_values(dtype) -> torch.Tensor:
    bits = torch.finfo(dtype).bits
    signed = [b - (1 << bits) if b >= 1 << (bits - 1) else b for b in SPECIAL_BITS[dtype]]
    return torch.tensor(signed, dtype=_INT_VIEW[dtype]).view(dtype)


@pytest.mark.parametrize("dtype", APPLY_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (16, 100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_apply_restore_bit_exact(shape, dtype):
    weight = torch.randn(shape).to(dtype)
    specials = _special_values(dtype)[: weight.numel()]
    weight.view(-1)[: specials.numel()] = specials
    mask = torch.rand(shape) < 0.4
    # prune every other special value; the others must come through untouched
    mask.view(-1)[: specials.numel()] = torch.arange(specials.numel()) % 2 == 0
    original = weight.clone()
    expected = original.clone()
    expected_removed = ref.apply_mask(expected, mask)

    record = mk.apply_mask(weight, mask, backend="cpu")
    assert_bits_equal(weight, expected, "pruned weight")
    assert_bits_equal(record.removed, expected_removed, "removed values")
    assert record.count == int(mask.sum())
    mk.restore(weight, record, backend="cpu")
    assert_bits_equal(weight, original, "restored weight")


def test_restore_rejects_a_removed_buffer_of_the_wrong_length():
    weight = torch.randn(4, 40)
    record = mk.apply_mask(weight, torch.rand(4, 40) < 0.5, backend="cpu")
    short = mk.PruneRecord(record.mask, record.removed[:-1], record.shape, record.dtype)
    with pytest.raises(ValueError, match="removed"):
        mk.restore(weight, short, backend="cpu")


def test_apply_mask_kernel_ignores_padding_bits():
    # The API refuses such a PackedMask (tests/test_ops_contract.py); the kernel itself reads only
    # the columns below d_in all the same.
    from memloc_kernels.backends.cpu import BACKEND

    weight = torch.randn(3, 40)
    mask = torch.rand(3, 40) < 0.5
    words = ref.pack_mask(mask)
    words[:, 1] |= torch.tensor(-(2**31), dtype=torch.int32)  # bit 63: past d_in = 40
    with pytest.raises(ValueError, match="past column 39"):
        mk.apply_mask(weight.clone(), mk.PackedMask(words, 40), backend="cpu")
    pruned = weight.clone()
    removed = BACKEND.apply_mask(pruned, words)
    assert removed.numel() == int(mask.sum()) and torch.equal(pruned, weight.masked_fill(mask, 0))


# --- density and IoU --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, d_out, d_in",
    [(1, 1, 1), (5, 7, 33), (6, 40, 70), (3, 64, 4096), (2, 1, 140000)],
    ids=["1x1x1", "5x7x33", "6x40x70", "long_masks", "few_long_rows"],  # the last two take the blocked paths
)
def test_density_and_iou_vs_reference(n, d_out, d_in):
    masks = torch.rand(n, d_out, d_in) < 0.1
    if n > 2:
        masks[1] = False
        masks[2] = False  # two empty masks: their IoU is NaN
    packed = mk.pack_mask(masks, backend="cpu")
    for given in (masks, packed):
        density = mk.mask_density(given, backend="cpu")
        torch.testing.assert_close(density, ref.mask_density(masks), rtol=0, atol=0)
        iou = mk.mask_iou(given, backend="cpu")
        torch.testing.assert_close(iou, ref.mask_iou(masks), rtol=0, atol=0, equal_nan=True)
    if n > 2:
        assert math.isnan(iou[1, 2].item())
        assert mk.mask_iou(packed, empty_value=0.0, backend="cpu")[1, 2].item() == 0.0


def test_build_info_reports_the_build():
    from memloc_kernels import _C

    info = _C.build_info()
    assert set(info) >= {"openmp", "cuda", "compiler"}
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool) and info["compiler"]
