"""The streaming memorized_mask kernels (blocks, blocks-bisect, list, split, regs) against the reference."""

from __future__ import annotations

import pytest
import torch
from _triton_env import DEVICE, INTERPRET, MARKS  # first: it decides compiled or interpreted Triton

import memloc_kernels as mk
from memloc_kernels import reference as ref
from memloc_kernels.triton import _config, mask_stream

pytestmark = MARKS
VARIANTS = ["blocks", "blocks-bisect", "list", "split", "regs"]


def masks(weights, sumsqs, nulls, sparsity, **overrides):
    """(triton, reference) masks per layer; the triton ones forced onto the streaming kernel."""
    with _config.mask_overrides(kernel="stream"), _config.stream_overrides(**overrides):
        got = mk.memorized_masks([w.to(DEVICE) for w in weights], [s.to(DEVICE) for s in sumsqs],
                                 [n.to(DEVICE) for n in nulls], sparsity, backend="triton")
    want = [ref.memorized_mask(w, s, n, sparsity) for w, s, n in zip(weights, sumsqs, nulls)]
    return [mk.unpack_mask(g).cpu() for g in got], want


def assert_masks(weights, sumsqs, nulls, sparsity, **overrides):
    got, want = masks(weights, sumsqs, nulls, sparsity, **overrides)
    for i, (g, w) in enumerate(zip(got, want)):
        differ = int((g != w).sum())
        assert differ == 0, f"layer {i}: {differ} of {w.numel()} mask entries differ from the reference"


def slow_count() -> int:
    return int(mask_stream.slow_path_counter(DEVICE).item())


def lognormal(*shape):
    """Statistics spread like real sums of squares (several octaves)."""
    return torch.exp(torch.randn(*shape) * 1.5) * 10


CASES = [
    pytest.param((4, 37), (37,), (37,), 0.1, id="d37-single"),
    pytest.param((1, 100), (100,), (100,), 0.01, id="dout1-k1"),
    pytest.param((3, 300), (2, 3, 300), (2, 3, 300), 0.02, id="d300-S2T3"),
    pytest.param((5, 1280), (2, 1280), (1280,), 0.01, id="d1280-S2"),
    pytest.param((2, 77), (77,), (77,), 1.0, id="sparsity-1"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("w_shape, s_shape, n_shape, sparsity", CASES)
def test_identical_to_reference(variant, w_shape, s_shape, n_shape, sparsity):
    w = (torch.randn(w_shape) * 0.02).half()
    assert_masks([w], [lognormal(*s_shape)], [lognormal(*n_shape)], sparsity, variant=variant)


@pytest.mark.parametrize("loads", [{"pipe": 0, "prefetch": 0}, {"pipe": 0, "prefetch": 1}, {"pipe": 0, "prefetch": 2}],
                         ids=["ahead0", "ahead1", "ahead2"])
@pytest.mark.parametrize("w_shape, s_shape, n_shape, sparsity", CASES)
def test_prefetching_pass_one_changes_nothing(w_shape, s_shape, n_shape, sparsity, loads):
    """The blocks kernel with pass 1's loads issued 0, 1 or 2 chunks ahead in registers instead of
    by Triton's pipeliner (the default, which every other test runs), incl. partial chunks."""
    w = (torch.randn(w_shape) * 0.02).half()
    assert_masks([w], [lognormal(*s_shape)], [lognormal(*n_shape)], sparsity, **loads)


@pytest.mark.parametrize("warps", [1, 2], ids=["w1", "w2"])
def test_several_widths_in_one_launch(warps):
    """Layers of different widths (and k) share one launch: per-layer d_in, k and offsets from tables."""
    shapes = [(3, 160), (2, 77), (4, 320), (1, 40)]
    ws = [(torch.randn(s) * 0.02).half() for s in shapes]
    assert_masks(ws, [lognormal(2, 2, d) for _, d in shapes], [lognormal(d) for _, d in shapes], 0.03,
                 num_warps=warps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_weight_dtypes(dtype):
    w = (torch.randn(3, 200) * 3).to(dtype)
    assert_masks([w], [lognormal(2, 200)], [lognormal(200)], 0.05)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ties_at_the_kth_place_go_to_the_lower_column(variant):
    """Equal scores straddling the k-th place: rows of equal |W|, a zero row, rounded values."""
    w = torch.ones(4, 100)
    w[0, ::3] = -2.0
    w[1] = 0.0
    w[2] = torch.randn(100).round()
    assert_masks([w.half()], [torch.ones(2, 100)], [torch.zeros(100)], 0.05, variant=variant)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "regs"])  # regs: a fixed 128-block list
def test_overflow_takes_the_exact_slow_path(variant):
    """A list of 8 slots cannot hold the candidates: every problem takes the slow path, still exact."""
    counter = mask_stream.slow_path_counter(DEVICE)
    counter.zero_()
    w = (torch.randn(3, 320) * 0.02).half()
    assert_masks([w], [lognormal(2, 320)], [lognormal(320)], 0.05, variant=variant, cap=8)
    assert slow_count() > 0, "the overflow never reached the slow path"


BLOCK_VARIANTS = [v for v in VARIANTS if v != "list"]


@pytest.mark.parametrize("variant", [v for v in BLOCK_VARIANTS if v != "regs"])  # regs has no `refine`
def test_loose_bound_is_raised_to_fit_the_tile(variant):
    """``refine``: with no bound steps, far more than 32 blocks reach the bound; raising it on the block maxima
    decides every problem in the tile: exact, no slow path, and the refinement counted."""
    counters = mask_stream._counters(DEVICE)
    counters.zero_()
    w = (torch.randn(5, 1280) * 0.02).half()
    assert_masks([w], [lognormal(2, 1280)], [lognormal(1280)], 0.02, variant=variant, cap=32, bound_steps=0,
                 refine=1)
    assert int(mask_stream.refined_counter(DEVICE).item()) > 0, "the bound was never raised"
    assert slow_count() == 0


@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
def test_bound_that_cannot_fit_takes_the_slow_path(variant):
    """40 blocks tie at the k-th place and the tile holds 32: no bound fits, so the slow path decides."""
    counters = mask_stream._counters(DEVICE)
    counters.zero_()
    w = torch.full((3, 640), 0.01)
    w[:, : 40 * 8 : 8] = 1.0  # 40 equal winners, one per block; k = 25 of them in column order
    assert_masks([w.half()], [torch.ones(2, 640)], [torch.zeros(640)], 0.04, variant=variant, cap=32, refine=1)
    assert slow_count() > 0 and int(mask_stream.refined_counter(DEVICE).item()) == 0


def test_no_slow_path_on_spread_statistics():
    """The fast path decides every problem when scores are spread (what the benchmark times)."""
    counter = mask_stream.slow_path_counter(DEVICE)
    counter.zero_()
    w = (torch.randn(6, 2560) * 0.02).half()
    assert_masks([w], [lognormal(2, 2560)], [lognormal(2560)], 0.01)
    assert slow_count() == 0


def test_zero_rows_zero_statistics_and_null_equal():
    w = torch.randn(3, 100).half()
    w[0] = 0
    s = lognormal(2, 3, 100)
    s[..., :60] = 0  # many zero scores: ties at 0
    assert_masks([w], [s], [torch.zeros(2, 3, 100)], 0.3)
    same = lognormal(2, 100)
    got, _ = masks([w], [same], [same.clone()], 0.05)
    assert not bool(got[0].any()), "sumsq equal to null_sumsq must select nothing"


def test_union_over_timesteps_with_short_spans():
    """Vectors split into spans of one: programs share a subset's words through atomic OR."""
    w = (torch.randn(3, 256) * 0.02).half()
    assert_masks([w], [lognormal(2, 5, 256)], [lognormal(2, 5, 256)], 0.02, span=1, progs_per_sm=1)


@pytest.mark.parametrize("group, rows, by_width", [(0, 4, 0), (2, 2, 0), (4, 8, 1), (0, 4, 1)],
                         ids=["one-group", "3-groups-R2", "2-groups-R8-by-width", "one-group-by-width"])
def test_split_groups_of_subsets_and_pass1_rows(group, rows, by_width):
    """The split variant: vectors in groups of whole subsets (buffer offsets, output subsets shift per
    group), pass-1 programs of 2-8 rows (layers whose height is not a multiple), several widths
    (k 7, 16 and 32: tiles of 32, 64 and 128 blocks when each width gets its own) selected in one
    launch or in one launch per width."""
    shapes = [(5, 160), (3, 77), (6, 320), (2, 160)]
    ws = [(torch.randn(s) * 0.02).half() for s in shapes]
    assert_masks(ws, [lognormal(3, 2, d) for _, d in shapes], [lognormal(3, 2, d) for _, d in shapes], 0.1,
                 variant="split", group=group, rows=rows, by_width=by_width)


def test_split_group_must_hold_whole_subsets():
    w = (torch.randn(2, 64) * 0.02).half()
    with pytest.raises(ValueError, match="multiple of the timesteps"):
        masks([w], [lognormal(2, 2, 64)], [lognormal(2, 2, 64)], 0.05, variant="split", group=3)


def test_or_into_existing_words():
    w = (torch.randn(3, 100) * 0.02).half()
    s, n = lognormal(2, 2, 100), lognormal(2, 2, 100)
    start = torch.rand(2, 3, 100) < 0.2
    out = mk.pack_mask(start.to(DEVICE))
    with _config.mask_overrides(kernel="stream"):
        mk.memorized_mask(w.to(DEVICE), s.to(DEVICE), n.to(DEVICE), 0.05, packed=True, out=out, backend="triton")
    assert torch.equal(mk.unpack_mask(out).cpu(), start | ref.memorized_mask(w, s, n, 0.05))


def test_config_keeps_k_strided_groups_and_room_for_2k():
    cfg = mask_stream.stream_config([5120], [51], 1, 1280, DEVICE)
    assert cfg.chunk >= 51 and cfg.cap >= 2 * 51 and not cfg.refine
    wide_k = mask_stream.stream_config([400], [120], 1, 8, DEVICE)
    assert wide_k.chunk >= 120 and wide_k.cap >= 240
    with _config.stream_overrides(refine=1):  # a tile of k plus a margin; overflows raise the bound
        refined = mask_stream.stream_config([5120], [51], 1, 1280, DEVICE)
        assert 51 + 51 // 8 <= refined.cap < 2 * 51 and refined.refine
    assert not mask_stream.stream_eligible([129]) and mask_stream.stream_eligible([128])


def test_overrides_reject_unknown_fields():
    with pytest.raises(ValueError, match="unknown StreamConfig"), _config.stream_overrides(colour=1):
        pass


def test_launch_rejects_a_one_slot_stats_tensor():
    """The blocks kernels write two counters; a caller's one-element ``stats`` is refused, not overrun."""
    w = torch.randn(2, 64).half().to(DEVICE)
    roots = torch.ones(128, device=DEVICE)
    outs = [torch.zeros(1, 2, 2, dtype=torch.int32, device=DEVICE)]
    with pytest.raises(ValueError, match="stats must be int32 with 2 elements"):
        mask_stream.launch_stream([w], roots, [0], [64], [1], outs, 1, 1, stats=torch.zeros(1, dtype=torch.int32))


@pytest.mark.skipif(not INTERPRET, reason="a check for the interpreted (CI) run: Triton 3.6's interpreter, on the "
                    "GPU image, cannot run tl.range with tensor bounds (TypeError, seen on the H100 2026-12-06)")
def test_stream_probe_layouts_compute_what_they_time():
    """benchmarks/bench_stream_probe.py's kernels (rows and column-slab layouts) match torch under the
    interpreter, so the rates it reports on a GPU are for correct work."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_stream_probe.py"
    run = subprocess.run([sys.executable, str(script), "--interpret-check"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "all variants match torch" in run.stdout, run.stdout + run.stderr


# --- the regs variant (mask_regs.py): d_in a multiple of 16 up to 8192, k <= 96 ------------------

REGS_SHAPES = [(3, 16), (3, 1280), (2, 1008), (2, 2560), (2, 2576), (2, 5120), (1, 8192)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", REGS_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("serial", [0, 1], ids=["parallel", "serial"])
def test_regs_variant_identical_to_reference(shape, dtype, serial):
    counter = mask_stream.slow_path_counter(DEVICE)
    counter.zero_()
    w = (torch.randn(shape) * 0.02).to(dtype)
    assert_masks([w], [lognormal(2, 2, shape[1])], [lognormal(shape[1])], 0.01, variant="regs", serial=serial)
    assert slow_count() == 0, "spread statistics should never need the exact path"


def test_regs_variant_ties_take_the_exact_path():
    counter = mask_stream.slow_path_counter(DEVICE)
    counter.zero_()
    w = torch.randn(4, 1280).abs() + 1
    k = mk.topk_count(0.01, 1280)
    order = w.argsort(dim=1, descending=True)
    w.scatter_(1, order[:, k : k + 2], w.gather(1, order[:, k - 1 : k]).expand(-1, 2))
    assert_masks([w.half()], [torch.ones(2, 1280)], [lognormal(1280)], 0.01, variant="regs")
    assert slow_count() == 4 * 2, "every (row, vector) has equal scores straddling the k-th place"


def test_regs_variant_leaves_other_layers_to_the_blocks_kernel():
    shapes = [(3, 1280), (2, 100), (2, 2560), (3, 1288)]  # 100 and 1288: not multiples of 16
    weights = [(torch.randn(s) * 0.02).half() for s in shapes]
    assert_masks(weights, [lognormal(2, s[1]) for s in shapes], [lognormal(s[1]) for s in shapes], 0.02,
                 variant="regs")
