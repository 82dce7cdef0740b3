"""The Triton backend against the reference at small, tiling-breaking shapes (interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
from _triton_env import DEVICE, MARKS  # first: it decides compiled or interpreted Triton

import memloc_kernels as mk
from memloc_kernels import reference as ref
from memloc_kernels.backends import triton as triton_backend
from memloc_kernels.triton import _config

pytestmark = MARKS
TR = "triton"


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Exact equality; on failure say how many entries differ and where the first ones are."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    same = (actual == expected) | (actual.isnan() & expected.isnan()) if actual.is_floating_point() else (
        actual == expected)
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} entries differ, first at {bad}")


def on(x: torch.Tensor) -> torch.Tensor:
    return x.to(DEVICE)


# --------------------------------------------------------------------------------------------- contract


def test_backend_object_names_itself_triton():
    assert triton_backend.BACKEND.name == "triton"
    assert triton_backend.BACKEND.availability() == (True, "")


def test_unavailable_without_triton_gives_a_reason(monkeypatch):
    monkeypatch.setattr(triton_backend, "_IMPORT_ERROR", "triton is not importable (ImportError: no module)")
    ok, reason = triton_backend.BACKEND.availability()
    assert not ok and "triton is not importable" in reason


def test_cpu_supported_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.BACKEND.supports(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_backend.BACKEND.supports(torch.device("cpu"))
    assert triton_backend.BACKEND.supports(torch.device("cuda", 0))


def test_auto_does_not_pick_triton_for_cpu_tensors():
    from memloc_kernels._dispatch import select

    assert select("memorized_mask", "auto", torch.device("cpu")).name != "triton"


@pytest.mark.parametrize("d_in, blocks, warps", [(1280, (1024, 256), 1), (2560, (2048, 512), 2),
                                                  (5120, (4096, 1024), 4), (37, (64, 0), 1), (100, (64, 64), 1)],
                         ids=lambda x: str(x))
def test_mask_launch_heuristic_for_sd_rows(d_in, blocks, warps):
    cfg = _config.mask_config(d_in, max(1, d_in // 100), 1000)
    assert (cfg.pa, cfg.pb) == blocks  # SD rows split without padding
    assert cfg.num_warps == warps and not cfg.dense and cfg.chunk == 8
    assert cfg.cand * cfg.vec >= 2 * max(1, d_in // 100)
    assert _config.mask_config(d_in, d_in, 1).dense  # k = d_in: the dense path


# ----------------------------------------------------------------------------------- statistics

# (h dtype, acc dtype, relative tolerance against a float64 sum of the same squares)
STATS_DTYPES = [
    pytest.param(torch.float16, torch.float32, 2e-6, id="f16-acc32"),
    pytest.param(torch.bfloat16, torch.float32, 2e-6, id="bf16-acc32"),
    pytest.param(torch.float32, torch.float32, 2e-6, id="f32-acc32"),
    pytest.param(torch.float16, torch.float64, 1e-12, id="f16-acc64"),
    pytest.param(torch.float64, torch.float64, 1e-12, id="f64-acc64"),
]


def sumsq64(h: torch.Tensor, group_size: int) -> torch.Tensor:
    x = h.reshape(-1, h.shape[-1]).double()
    return x.square().reshape(-1, group_size, x.shape[-1]).sum(dim=1)


@pytest.mark.parametrize("h_dtype, acc_dtype, rtol", STATS_DTYPES)
@pytest.mark.parametrize("shape, group_size", [((3, 5, 37), 5), ((7, 100), 7), ((200, 33), 100), ((4, 160), 1)],
                         ids=["3x5x37-g5", "7x100-one-group", "200x33-split", "4x160-g1"])
def test_accumulate_sumsq_matches_float64(h_dtype, acc_dtype, rtol, shape, group_size):
    h = on(torch.randn(shape).to(h_dtype) * 4)
    d = shape[-1]
    groups = h.numel() // d // group_size
    start = on(torch.rand(groups, d, dtype=acc_dtype))
    acc = start.clone()
    mk.accumulate_sumsq(h, acc, group_size=group_size, backend=TR)
    expected = start.double() + sumsq64(h, group_size)
    err = ((acc.double() - expected).abs() / expected).max().item()
    assert err <= rtol, f"max relative error {err:.3g} > {rtol:g}"


def test_accumulate_sumsq_is_deterministic():
    h = on(torch.randn(300, 70, dtype=torch.float16))
    a, b = on(torch.zeros(1, 70)), on(torch.zeros(1, 70))
    mk.accumulate_sumsq(h, a, group_size=300, backend=TR)
    mk.accumulate_sumsq(h, b, group_size=300, backend=TR)
    assert_same(a, b, "two runs")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_geglu_output_rounds_like_diffusers(dtype):
    """Same operations and roundings as diffusers' GEGLU, bit for bit (the GELU is torch's own)."""
    proj_out = on((torch.randn(2, 19, 2 * 40) * 3).to(dtype))
    acc = on(torch.zeros(2, 40))
    h = mk.geglu_sumsq(proj_out, acc, group_size=19, backend=TR)
    assert_same(h, ref.geglu(proj_out), "GEGLU output")
    sums = acc.double()
    want = sumsq64(h, 19)
    assert ((sums - want).abs() / want.clamp(min=1e-30)).max().item() <= 2e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_geglu_equals_diffusers_module(dtype):
    """Against diffusers.models.activations.GEGLU itself (its projection replaced by identity)."""
    activations = pytest.importorskip("diffusers.models.activations", reason="needs diffusers")
    module = activations.GEGLU(4, 48).to(dtype)
    module.proj = torch.nn.Identity()
    proj_out = on((torch.randn(3, 11, 96) * 3).to(dtype))
    h = mk.geglu_sumsq(proj_out, on(torch.zeros(48)), backend=TR)
    assert_same(h, module.to(DEVICE)(proj_out), "GEGLU vs diffusers")


def test_geglu_float64():
    proj_out = on(torch.randn(6, 2 * 33, dtype=torch.float64))
    acc = on(torch.zeros(2, 33, dtype=torch.float64))
    h = mk.geglu_sumsq(proj_out, acc, group_size=3, backend=TR)
    torch.testing.assert_close(h, ref.geglu(proj_out), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(acc, sumsq64(h, 3), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("s_shape", [(37,), (3, 37)], ids=["one", "S3"])
def test_wanda_scores_bit_identical(dtype, s_shape):
    w = on(torch.randn(5, 37).to(dtype))
    s = on(torch.rand(s_shape) * 9)
    assert_same(mk.wanda_scores(w, s, backend=TR), ref.wanda_scores(w, s), "scores")


# ------------------------------------------------------------------------------- memorized_mask


def check_mask(weight, sumsq, null_sumsq, sparsity, **overrides):
    with _config.mask_overrides(**overrides):
        got = mk.memorized_mask(on(weight), on(sumsq), on(null_sumsq), sparsity, backend=TR)
    want = ref.memorized_mask(weight, sumsq, null_sumsq, sparsity)
    assert_same(got.cpu(), want, "mask")


def planted_ties(d_out: int, d_in: int) -> torch.Tensor:
    """Rows whose scores tie at the k-th place: equal |W| with equal sumsq, zero rows, repeats."""
    w = torch.ones(d_out, d_in)
    w[0, ::3] = -2.0
    w[1] = 0.0
    w[2, :] = torch.randn(d_in).round()
    return w


MASK_CASES = [
    pytest.param((4, 37), (37,), (37,), 0.1, {}, id="d37-single"),
    pytest.param((1, 100), (100,), (100,), 0.01, {}, id="dout1-k1"),
    pytest.param((3, 100), (2, 3, 100), (2, 3, 100), 0.05, {}, id="d100-S2T3"),
    pytest.param((2, 100), (1, 5, 100), (100,), 0.05, {"chunk": 2}, id="d100-T5-chunk2"),
    pytest.param((3, 160), (2, 160), (160,), 0.03, {}, id="d160-S2"),
    pytest.param((3, 320), (2, 2, 320), (2, 2, 320), 0.01, {"vec": 1}, id="d320-vec1"),
    pytest.param((3, 100), (2, 100), (100,), 0.3, {"dense": True}, id="dense-path"),
    pytest.param((2, 37), (37,), (37,), 1.0, {}, id="sparsity-1"),
]


@pytest.mark.parametrize("w_shape, s_shape, n_shape, sparsity, overrides", MASK_CASES)
def test_memorized_mask_identical_to_reference(w_shape, s_shape, n_shape, sparsity, overrides):
    w = torch.randn(w_shape).to(torch.float16)
    check_mask(w, torch.rand(s_shape) * 5, torch.rand(n_shape) * 2, sparsity, **overrides)


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("d_in", [77, 160], ids=["d77", "d160"])
def test_memorized_mask_weight_dtypes(w_dtype, d_in):
    w = (torch.randn(3, d_in) * 3).to(w_dtype)
    check_mask(w, torch.rand(2, d_in) * 5, torch.rand(d_in) * 2, 0.05)


@pytest.mark.parametrize("sparsity", [0.01, 0.05, 0.3], ids=["k1", "k5", "k30"])
def test_memorized_mask_planted_ties(sparsity):
    w = planted_ties(4, 100).to(torch.float16)
    check_mask(w, torch.ones(2, 100), torch.zeros(100), sparsity)


def test_memorized_mask_sumsq_equal_to_null_selects_nothing():
    w = torch.randn(4, 100, dtype=torch.float16)
    s = torch.rand(2, 100)
    check_mask(w, s, s.clone(), 0.05)
    assert not bool(ref.memorized_mask(w, s, s, 0.05).any())


def test_memorized_mask_zero_rows_and_zero_columns():
    w = torch.randn(3, 100)
    w[0] = 0
    s = torch.rand(2, 3, 100)
    s[..., :60] = 0  # many zero scores: most candidates tie at 0
    check_mask(w, s, torch.zeros(2, 3, 100), 0.3)


def tied_stats(s: int, t: int, d_in: int) -> torch.Tensor:
    """Every third vector all ones (with planted_ties, its rows tie at the k-th place), others random."""
    stats = torch.rand(s, t, d_in) * 5
    stats.view(-1, d_in)[::3] = 1.0  # every third (subset, timestep) vector
    return stats


# The deferred fallback (dense path in a second kernel over (row, vector) flags): ties at the
# k-th place and candidate-buffer overflows must reach it; > 32 vectors need two flag words.
DEFERRED_CASES = [
    pytest.param(lambda: planted_ties(4, 100), lambda: torch.ones(2, 100), lambda: torch.zeros(100), 0.05, {},
                 id="planted-ties"),
    pytest.param(lambda: planted_ties(3, 100), lambda: tied_stats(20, 2, 100), lambda: torch.rand(100), 0.05,
                 {"chunk": 8}, id="ties-S20T2-two-flag-words"),
    pytest.param(lambda: torch.randn(3, 320), lambda: torch.rand(2, 320) * 5, lambda: torch.rand(320), 0.05,
                 {"cand": 4}, id="overflow-cand4"),
    pytest.param(lambda: torch.randn(4, 37), lambda: torch.rand(37), lambda: torch.rand(37), 0.1, {},
                 id="d37-no-fallback"),
    pytest.param(lambda: torch.randn(3, 100), lambda: torch.rand(2, 100), lambda: torch.rand(100), 0.3,
                 {"dense": True}, id="dense-path"),
]


@pytest.mark.parametrize("make_w, make_s, make_n, sparsity, overrides", DEFERRED_CASES)
def test_memorized_mask_deferred_fallback_identical_to_reference(make_w, make_s, make_n, sparsity, overrides):
    check_mask(make_w().to(torch.float16), make_s(), make_n(), sparsity, fallback="deferred", **overrides)


def test_mask_overrides_reject_unknown_fallback():
    with pytest.raises(ValueError, match="fallback"), _config.mask_overrides(fallback="sometimes"):
        pass


def test_memorized_mask_or_into_out():
    w = torch.randn(3, 100, dtype=torch.float16)
    s, n = torch.rand(2, 2, 100), torch.rand(2, 2, 100)
    start = torch.rand(2, 3, 100) < 0.2
    out = mk.pack_mask(on(start))
    mk.memorized_mask(on(w), on(s), on(n), 0.05, packed=True, out=out, backend=TR)
    assert_same(mk.unpack_mask(out).cpu(), start | ref.memorized_mask(w, s, n, 0.05), "OR into out")


def test_memorized_masks_multi_layer_matches_per_layer():
    ws = [torch.randn(4, 100, dtype=torch.float16), torch.randn(3, 100, dtype=torch.float16),
          torch.randn(2, 160, dtype=torch.float16)]
    ss = [torch.rand(2, 2, w.shape[1]) for w in ws]
    ns = [torch.rand(w.shape[1]) for w in ws]
    got = mk.memorized_masks([on(w) for w in ws], [on(s) for s in ss], [on(n) for n in ns], 0.03, backend=TR)
    for i, (w, s, n) in enumerate(zip(ws, ss, ns)):
        assert_same(mk.unpack_mask(got[i]).cpu(), ref.memorized_mask(w, s, n, 0.03), f"layer {i}")


# ---------------------------------------------------------------------------------- packed masks


@pytest.mark.parametrize("d_in", [1, 31, 32, 33, 77, 100], ids=lambda d: f"d{d}")
def test_pack_unpack_round_trip(d_in):
    mask = torch.rand(5, d_in) < 0.5
    mask[0] = True  # bit 31 set: negative int32 words
    mask[1] = False
    packed = mk.pack_mask(on(mask), backend=TR)
    assert_same(packed.words.cpu(), ref.pack_mask(mask), "words")
    assert_same(mk.unpack_mask(packed, backend=TR).cpu(), mask, "unpacked")


SIGNED = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
          torch.float64: torch.int64}
NAN_WITH_PAYLOAD = {torch.float16: 0x7E01, torch.bfloat16: 0x7FC1, torch.float32: 0x7FC00001,
                    torch.float64: 0x7FF8000000000001}


@pytest.mark.parametrize("d_in", [70, 1100], ids=["d70", "d1100-several-word-steps"])
@pytest.mark.parametrize("dtype", list(SIGNED), ids=["f16", "bf16", "f32", "f64"])
def test_apply_and_restore_keep_exact_bits(dtype, d_in):
    w = torch.randn(5, d_in).to(dtype)
    w[0, 0] = -0.0
    w.view(SIGNED[dtype])[0, 2] = NAN_WITH_PAYLOAD[dtype]
    mask = torch.rand(5, d_in) < 0.3
    mask[0, :3] = True
    mask[1, 32:64] = True  # a full word (bit 31 set)
    mask[2, -5:] = True  # the last, partial word
    mask[4] = False  # a row with nothing removed
    original = w.clone()
    dev_w = on(w.clone())
    record = mk.apply_mask(dev_w, on(mask), backend=TR)
    expected_w = w.clone()
    expected_removed = ref.apply_mask(expected_w, mask)
    assert_same(dev_w.cpu().view(SIGNED[dtype]), expected_w.view(SIGNED[dtype]), "pruned weight bits")
    assert_same(record.removed.cpu().view(SIGNED[dtype]), expected_removed.view(SIGNED[dtype]), "removed bits")
    mk.restore(dev_w, record, backend=TR)
    assert_same(dev_w.cpu().view(SIGNED[dtype]), original.view(SIGNED[dtype]), "restored bits")


def test_apply_empty_mask_removes_nothing():
    w = on(torch.randn(3, 40))
    record = mk.apply_mask(w, on(torch.zeros(3, 40, dtype=torch.bool)), backend=TR)
    assert record.count == 0
    mk.restore(w, record, backend=TR)


@pytest.mark.parametrize("n, shape", [(1, (3, 70)), (6, (3, 70)), (23, (2, 40))], ids=["N1", "N6", "N23"])
def test_density_and_iou_match_reference(n, shape):
    masks = torch.rand(n, *shape) < torch.rand(n, 1, 1)
    masks[0] = False  # an empty mask: IoU with another empty one is NaN
    if n > 2:
        masks[1] = False
        masks[2] = True
    assert_same(mk.mask_density(on(masks), backend=TR).cpu(), ref.mask_density(masks), "density")
    assert_same(mk.mask_iou(on(masks), backend=TR).cpu(), ref.mask_iou(masks), "iou")


@pytest.mark.parametrize("kernel", ["dot", "popcount"])
def test_intersections_kernels_count_every_shared_bit(kernel, monkeypatch):
    """Both intersection kernels (int8 tensor-core dot, CUDA-core popcount) against a direct count,
    with several tiles of masks, a K split, full words (bit 31) and empty rows."""
    from memloc_kernels.triton import iou

    monkeypatch.setattr(iou, "IOU_KERNEL", kernel)
    bits = torch.rand(37, 40 * 32) < 0.3
    bits[3] = True
    bits[5] = False
    words = mk.pack_mask(bits).words.view(37, -1)
    got = iou.mask_intersections_triton(on(words)).cpu()
    want = (bits.to(torch.int64) @ bits.to(torch.int64).T)
    assert_same(got, want, f"{kernel} intersections")


@pytest.mark.parametrize("n, w", [(37, 5), (130, 40), (3, 3000), (1, 1)], ids=["short-rows", "rows-x40", "long-split",
                                                                                "one-word"])
def test_popcount_per_row(n, w):
    """Several short rows per program, long rows split into pieces: every set bit counted once."""
    from memloc_kernels.triton import iou

    words = torch.randint(-(2**31), 2**31 - 1, (n, w), dtype=torch.int64).to(torch.int32)
    words[0] = -1  # every bit, bit 31 included
    bits = (words.to(torch.int64)[..., None] >> torch.arange(32)) & 1
    assert_same(iou.mask_popcount_triton(on(words)).cpu(), bits.sum(dim=(1, 2)), "popcount")
