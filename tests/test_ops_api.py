"""The public ops API: input validation, backend dispatch, and eq. 5-7 on tiny hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_masks_equal

import memloc_kernels as mk
from memloc_kernels import _dispatch

T, F = True, False

BACKENDS = [pytest.param(name, id=name) for name in _dispatch.BACKEND_NAMES]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _require(backend: str, device: str) -> torch.device:
    """Skip unless ``backend`` can run tensors on ``device`` here (decided at run time: some
    backends depend on environment switches such as TRITON_INTERPRET)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    impl = _dispatch.get_backend(backend)
    ok, why = impl.availability()
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    if not impl.supports(torch.device(device)):
        pytest.skip(f"backend {backend} does not run {device} tensors")
    return torch.device(device)


def _mask(rows, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool, device=device)


# --- eq. 5-7 by hand ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eq5_topk_with_tie_and_eq6_strict_null(backend, device):
    dev = _require(backend, device)
    weight = torch.tensor([[1.0, -2.0, 0.5, 3.0]], device=dev)
    sumsq = torch.tensor([1.0, 1.0, 16.0, 1.0], device=dev)
    # scores |W| * sqrt(sumsq) = [1, 2, 2, 3]; s = 0.5 gives k = 2: column 3, then the tie at 2
    # between columns 1 and 2 goes to column 1. Eq. 5 selects {1, 3}.
    null_sumsq = torch.tensor([0.0, 0.0, 0.0, 9.0], device=dev)
    # null scores = [0, 0, 0, 3]: column 3 has score 3 == null 3, not strictly greater: dropped.
    mask = mk.memorized_mask(weight, sumsq, null_sumsq, 0.5, backend=backend)
    assert_masks_equal(mask, _mask([[F, T, F, F]], dev))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eq5_k_is_floor_of_sparsity_times_d_in_at_least_one(backend, device):
    dev = _require(backend, device)
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-4.0, 0.0, 0.25, 1.0]], device=dev, dtype=torch.float16)
    sumsq = torch.tensor([1.0, 4.0, 4.0, 9.0], device=dev)
    null_sumsq = torch.zeros(4, device=dev)
    # row 0 scores [1, 2, 2, 3]; row 1 scores [4, 0, 0.5, 3]
    expected = {
        0.01: [[F, F, F, T], [T, F, F, F]],  # k = max(1, floor(0.04)) = 1
        0.74: [[F, T, F, T], [T, F, F, T]],  # k = floor(2.96) = 2; row 0's tie at 2 goes to column 1
        1.0: [[T, T, T, T], [T, F, T, T]],  # k = 4: all, but score 0 is not > null score 0
    }
    for sparsity, rows in expected.items():
        mask = mk.memorized_mask(weight, sumsq, null_sumsq, sparsity, backend=backend)
        assert_masks_equal(mask, _mask(rows, dev), f"s={sparsity}")
    # sumsq == null_sumsq: every score equals its null score, nothing is memorized
    mask = mk.memorized_mask(weight, sumsq, sumsq.clone(), 1.0, backend=backend)
    assert not mask.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eq7_union_over_timesteps_per_subset(backend, device):
    dev = _require(backend, device)
    weight = torch.tensor([[1.0, 2.0, 3.0]], device=dev)
    sumsq = torch.tensor(
        [
            [[9.0, 1.0, 0.0], [0.0, 4.0, 1.0]],  # subset 0: scores [3, 2, 0] then [0, 4, 3]
            [[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]],  # subset 1: scores [1, 2, 3] then [2, 0, 0]
        ],
        device=dev,
    )
    null_sumsq = torch.tensor([0.0, 0.0, 1.0], device=dev)  # shared: null scores [0, 0, 3]
    # s = 0.34, d_in = 3: k = 1. Subset 0 picks column 0 at t0 and column 1 at t1; subset 1 picks
    # column 2 at t0 (score 3 == null 3: dropped) and column 0 at t1.
    expected = _mask([[[T, T, F]], [[T, F, F]]], dev)
    assert_masks_equal(mk.memorized_mask(weight, sumsq, null_sumsq, 0.34, backend=backend), expected)

    # the same union built with out=: one timestep per call, OR-ed into a packed and a bool mask
    packed = mk.memorized_mask(weight, sumsq[:, 0], null_sumsq, 0.34, packed=True, backend=backend)
    dense = mk.memorized_mask(weight, sumsq[:, 0], null_sumsq, 0.34, backend=backend)
    assert_masks_equal(dense, _mask([[[T, F, F]], [[F, F, F]]], dev), "t0 alone")
    mk.memorized_mask(weight, sumsq[:, 1], null_sumsq, 0.34, packed=True, out=packed, backend=backend)
    mk.memorized_mask(weight, sumsq[:, 1], null_sumsq, 0.34, out=dense, backend=backend)
    assert_masks_equal(mk.unpack_mask(packed), expected, "packed out")
    assert_masks_equal(dense, expected, "bool out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_decided_after_ieee_sqrt(backend, device):
    dev = _require(backend, device)
    # Two different float32 sums of squares with the same IEEE float32 square root 1.4142149686813354
    # (correctly rounded). Their scores tie, so with k = 1 the lower column wins. A sqrt that is
    # one ulp low on the first value (torch.sqrt on some CPUs) would pick column 1 instead.
    sumsq = torch.tensor([2.0000038146972656, 2.0000040531158447], device=dev)
    assert sumsq[0].item() != sumsq[1].item()
    weight = torch.ones(1, 2, device=dev, dtype=torch.float16)
    mask = mk.memorized_mask(weight, sumsq, torch.zeros(2, device=dev), 0.5, backend=backend)
    assert_masks_equal(mask, _mask([[T, F]], dev))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_wanda_scores_by_hand(backend, device):
    dev = _require(backend, device)
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, -0.25, 3.0]], device=dev, dtype=torch.bfloat16)
    sumsq = torch.tensor([[4.0, 9.0, 0.0], [1.0, 0.25, 16.0]], device=dev)
    scores = mk.wanda_scores(weight, sumsq, backend=backend)
    expected = torch.tensor(
        [[[2.0, 6.0, 0.0], [0.0, 0.75, 0.0]], [[1.0, 1.0, 2.0], [0.0, 0.125, 12.0]]], device=dev
    )
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_sumsq_by_hand(backend, device):
    dev = _require(backend, device)
    h = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0], [2.0, 0.0]], device=dev, dtype=torch.float16)
    acc = torch.tensor([10.0, 0.0], device=dev)
    mk.accumulate_sumsq(h, acc, backend=backend)
    torch.testing.assert_close(acc, torch.tensor([25.0, 5.25], device=dev), rtol=0, atol=0)
    groups = torch.zeros(2, 2, device=dev, dtype=torch.float64)
    mk.accumulate_sumsq(h, groups, group_size=2, backend=backend)
    expected = torch.tensor([[10.0, 4.25], [5.0, 1.0]], device=dev, dtype=torch.float64)
    torch.testing.assert_close(groups, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_apply_restore_density_iou_by_hand(backend, device):
    dev = _require(backend, device)
    mask = torch.zeros(2, 33, dtype=torch.bool, device=dev)
    mask[0, [0, 2, 32]] = True
    mask[1, [0, 31]] = True
    packed = mk.pack_mask(mask, backend=backend)
    words = torch.tensor([[5, 1], [1 - 2**31, 0]], dtype=torch.int32, device=dev)  # bit 31 is the sign bit
    assert torch.equal(packed.words, words)
    assert_masks_equal(mk.unpack_mask(packed, backend=backend), mask)

    weight = torch.tensor([[1.5, -2.0, 3.0]], device=dev)
    record = mk.apply_mask(weight, _mask([[F, T, T]], dev), backend=backend)
    assert weight.tolist() == [[1.5, 0.0, 0.0]]
    assert record.removed.tolist() == [-2.0, 3.0] and record.count == 2
    mk.restore(weight, record, backend=backend)
    assert weight.tolist() == [[1.5, -2.0, 3.0]]

    masks = _mask([[[T, T, F, F]], [[F, T, T, F]], [[F, F, F, F]], [[F, F, F, F]]], dev)
    density = mk.mask_density(masks, backend=backend)
    assert density.dtype == torch.float64 and density.tolist() == [0.5, 0.5, 0.0, 0.0]
    iou = mk.mask_iou(masks, backend=backend).cpu()
    nan = float("nan")
    expected = torch.tensor(
        [[1.0, 1 / 3, 0.0, 0.0], [1 / 3, 1.0, 0.0, 0.0], [0.0, 0.0, nan, nan], [0.0, 0.0, nan, nan]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(iou, expected, rtol=0, atol=0, equal_nan=True)
    iou_zero = mk.mask_iou(masks, empty_value=0.0, backend=backend).cpu()
    torch.testing.assert_close(iou_zero, torch.nan_to_num(expected, nan=0.0), rtol=0, atol=0)


# --- PackedMask ----------------------------------------------------------------------------------


def test_packed_mask_semantics():
    mask = torch.rand(3, 4, 70) < 0.5
    packed = mk.pack_mask(mask)
    assert packed.shape == (3, 4, 70) and packed.d_in == 70 and packed.words.shape == (3, 4, 3)
    assert packed.device == torch.device("cpu")
    assert_masks_equal(mk.unpack_mask(packed[1]), mask[1])
    assert_masks_equal(mk.unpack_mask(packed[1:, 2]), mask[1:, 2])
    with pytest.raises(IndexError):
        packed[..., 0]  # the packed column dim cannot be indexed
    copy = packed.clone()
    copy.words.zero_()
    assert_masks_equal(mk.unpack_mask(packed), mask)  # clone does not share words
    assert packed.to("cpu").shape == packed.shape
    assert mk.n_words(1) == 1 and mk.n_words(32) == 1 and mk.n_words(33) == 2


def test_packed_mask_rejects_bad_words():
    with pytest.raises(TypeError, match="int32"):
        mk.PackedMask(torch.zeros(2, 1, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="last dim"):
        mk.PackedMask(torch.zeros(2, 2, dtype=torch.int32), 5)


# --- validation: each bad input names its argument ------------------------------------------------


def _layer(d_out: int = 4, d_in: int = 10):
    return torch.randn(d_out, d_in).half(), torch.rand(d_in), torch.rand(d_in)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda w, s, n: (w, s[:-1], n), ValueError, "sumsq"),
        (lambda w, s, n: (w, s, n[:-1]), ValueError, "null_sumsq"),
        (lambda w, s, n: (w, s.expand(2, 3, -1).reshape(2, 3, 1, -1), n), ValueError, "sumsq"),
        (lambda w, s, n: (w, s.expand(2, -1), n.expand(3, -1)), ValueError, "null_sumsq"),
        (lambda w, s, n: (w[0], s, n), ValueError, "weight"),
        (lambda w, s, n: (w.int(), s, n), TypeError, "weight"),
        (lambda w, s, n: (w.double(), s, n), TypeError, "weight"),
        (lambda w, s, n: (w.t().contiguous().t(), s, n), ValueError, "weight"),
        (lambda w, s, n: (w, s.int(), n), TypeError, "sumsq"),
        (lambda w, s, n: (w, s.clone().index_fill_(0, torch.tensor([3]), float("nan")), n), ValueError, "sumsq"),
        (lambda w, s, n: (w, s, n.clone().index_fill_(0, torch.tensor([0]), float("inf"))), ValueError, "null_sumsq"),
        (lambda w, s, n: (w, s.clone().index_fill_(0, torch.tensor([9]), -1.0), n), ValueError, "sumsq"),
        (lambda w, s, n: ("w", s, n), TypeError, "weight"),
    ],
    ids=[
        "sumsq_short",
        "null_short",
        "sumsq_4d",
        "null_other_batch",
        "weight_1d",
        "weight_int",
        "weight_float64",
        "weight_noncontiguous",
        "sumsq_int",
        "sumsq_nan",
        "null_inf",
        "sumsq_negative",
        "weight_not_tensor",
    ],
)
def test_memorized_mask_rejects_bad_tensors(change, error, name):
    weight, sumsq, null_sumsq = change(*_layer())
    with pytest.raises(error, match=rf"\b{name}\b"):
        mk.memorized_mask(weight, sumsq, null_sumsq, 0.1)


@pytest.mark.parametrize(
    "sparsity, error",
    [(0, ValueError), (0.0, ValueError), (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
     (float("inf"), ValueError), (True, TypeError), ("0.1", TypeError), (None, TypeError)],
    ids=["zero_int", "zero", "negative", "above_one", "nan", "inf", "bool", "str", "none"],
)
def test_memorized_mask_rejects_bad_sparsity(sparsity, error):
    with pytest.raises(error, match="sparsity"):
        mk.memorized_mask(*_layer(), sparsity)
    with pytest.raises(error, match="sparsity"):
        mk.memorized_masks([_layer()[0]], [_layer()[1]], [_layer()[2]], sparsity)


def test_memorized_mask_rejects_mismatched_devices():
    weight, sumsq, null_sumsq = _layer()
    with pytest.raises(ValueError, match=r"sumsq on meta"):
        mk.memorized_mask(weight, sumsq.to("meta"), null_sumsq, 0.1)
    with pytest.raises(ValueError, match=r"null_sumsq on meta"):
        mk.memorized_mask(weight, sumsq, null_sumsq.to("meta"), 0.1)
    with pytest.raises(ValueError, match=r"acc on meta"):
        mk.accumulate_sumsq(torch.randn(3, 10), torch.zeros(10, device="meta"))
    with pytest.raises(ValueError, match=r"acc on meta"):
        mk.geglu_sumsq(torch.randn(3, 20), torch.zeros(10, device="meta"))


def test_wanda_scores_rejects_mismatched_devices():
    weight, sumsq, _ = _layer()
    with pytest.raises(ValueError, match=r"sumsq on meta"):
        mk.wanda_scores(weight, sumsq.to("meta"))


def test_memorized_mask_rejects_bad_out():
    weight, sumsq, null_sumsq = _layer()
    with pytest.raises(TypeError, match="out"):
        mk.memorized_mask(weight, sumsq, null_sumsq, 0.1, out=torch.zeros(4, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match="out"):
        mk.memorized_mask(weight, sumsq, null_sumsq, 0.1, out=torch.zeros(4, 11, dtype=torch.bool))
    with pytest.raises(TypeError, match="out"):
        mk.memorized_mask(weight, sumsq, null_sumsq, 0.1, packed=True, out=torch.zeros(4, 10, dtype=torch.bool))
    wrong = mk.pack_mask(torch.zeros(2, 4, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="out"):
        mk.memorized_mask(weight, sumsq, null_sumsq, 0.1, packed=True, out=wrong)


def test_memorized_masks_rejects_mismatched_lists():
    weight, sumsq, null_sumsq = _layer()
    with pytest.raises(ValueError, match="same length"):
        mk.memorized_masks([weight, weight], [sumsq], [null_sumsq], 0.1)
    with pytest.raises(TypeError, match=r"weights\[1\]"):
        mk.memorized_masks([weight, weight.int()], [sumsq, sumsq], [null_sumsq, null_sumsq], 0.1)


@pytest.mark.parametrize(
    "h, acc, group_size, error, name",
    [
        (torch.randn(6, 4), torch.zeros(4, dtype=torch.int32), None, TypeError, "acc"),
        (torch.randn(6, 4), torch.zeros(4, dtype=torch.float16), None, TypeError, "acc"),
        (torch.randn(6, 4), torch.zeros(5), None, ValueError, "acc"),
        (torch.randn(6, 4), torch.zeros(2, 4), 2, ValueError, "acc"),
        (torch.randn(6, 4), torch.zeros(2, 4), 4, ValueError, "group_size"),
        (torch.randn(6, 4), torch.zeros(2, 4), 0, ValueError, "group_size"),
        (torch.randn(6, 4), torch.zeros(2, 4), True, ValueError, "group_size"),
        (torch.randint(0, 3, (6, 4)), torch.zeros(4), None, TypeError, "h"),
        (torch.randn(4, 6).t(), torch.zeros(4), None, ValueError, "h"),
        (torch.randn(6, 4), torch.zeros(8)[::2], None, ValueError, "acc"),
    ],
    ids=["acc_int", "acc_fp16", "acc_shape", "acc_groups", "group_not_dividing", "group_zero", "group_bool",
         "h_int", "h_noncontiguous", "acc_noncontiguous"],
)
def test_accumulate_sumsq_rejects_bad_inputs(h, acc, group_size, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        mk.accumulate_sumsq(h, acc, group_size=group_size)


def test_geglu_sumsq_rejects_odd_width():
    with pytest.raises(ValueError, match="proj_out"):
        mk.geglu_sumsq(torch.randn(3, 7), torch.zeros(3))


def test_wanda_scores_rejects_batched_timesteps():
    with pytest.raises(ValueError, match="sumsq"):
        mk.wanda_scores(torch.randn(2, 5), torch.rand(2, 3, 5))


def test_mask_ops_reject_bad_inputs():
    weight = torch.randn(3, 5)
    with pytest.raises(TypeError, match="mask"):
        mk.apply_mask(weight, torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask"):
        mk.apply_mask(weight, torch.zeros(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        mk.apply_mask(weight, mk.pack_mask(torch.zeros(2, 5, dtype=torch.bool)))
    with pytest.raises(TypeError, match="weight"):
        mk.apply_mask(weight.int(), torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="record"):
        mk.restore(weight, "not a record")
    record = mk.apply_mask(weight, torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="record"):
        mk.restore(weight.half(), record)
    with pytest.raises(TypeError, match="mask"):
        mk.unpack_mask(torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="masks"):
        mk.mask_iou(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="masks"):
        mk.mask_density(torch.zeros(5, dtype=torch.bool))


# --- dispatch -------------------------------------------------------------------------------------


def test_available_backends_lists_reference_first():
    names = mk.available_backends()
    assert names[0] == "reference"
    assert set(names) <= set(_dispatch.BACKEND_NAMES)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        mk.memorized_mask(*_layer(), 0.1, backend="fastest")


def test_explicit_unavailable_backend_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(_dispatch._loaded, "cpu", _dispatch._Missing("cpu", "simulated: _C not built"))
    with pytest.raises(mk.BackendUnavailableError, match=r"'cpu'.*simulated: _C not built"):
        mk.memorized_mask(*_layer(), 0.1, backend="cpu")
    assert "cpu" not in mk.available_backends()
    weight, sumsq, null_sumsq = _layer()
    auto = mk.memorized_mask(weight, sumsq, null_sumsq, 0.1, backend="auto")
    assert_masks_equal(auto, mk.reference.memorized_mask(weight, sumsq, null_sumsq, 0.1))


def test_backend_that_cannot_run_the_device_raises():
    impl = _dispatch.get_backend("cpu")
    if not impl.availability()[0]:
        pytest.skip(f"cpu backend unavailable: {impl.availability()[1]}")
    weight, sumsq, null_sumsq = (t.to("meta") for t in _layer())
    with pytest.raises(mk.BackendUnavailableError, match=r"'cpu'.*meta"):
        mk.memorized_mask(weight, sumsq, null_sumsq, 0.1, check_finite=False, backend="cpu")


def test_auto_matches_reference():
    weight, sumsq, null_sumsq = torch.randn(16, 300).half(), *(torch.rand(2, 300) for _ in range(2))
    auto = mk.memorized_mask(weight, sumsq, null_sumsq, 0.05)
    assert_masks_equal(auto, mk.reference.memorized_mask(weight, sumsq, null_sumsq, 0.05))
    assert math.isclose(float(mk.mask_density(auto).mean()), float(auto.double().mean()))


class _FakeBackend:
    """Stands in for a GPU backend in dispatch tests (no GPU needed: nothing is launched)."""

    device_note = "fake"

    def __init__(self, name: str) -> None:
        self.name = name

    def availability(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def memorized_mask(self, *args) -> None:  # present so that select() sees the op
        raise AssertionError("not called")


@pytest.mark.parametrize(
    "shapes, expected",
    [
        ([(1280, 12), (2560, 25), (5120, 51)], "cuda"),  # SD1.5 at s = 1 %: the warp kernel takes them all
        ([(5120, 51), (5120, 102)], "triton"),  # k > 96: the CUDA block kernel would run, slower than Triton
        ([(1283, 12)], "triton"),  # d_in not a multiple of 8
        ([(16384, 163)], "triton"),  # wider than the warp kernel
    ],
)
def test_auto_takes_the_cuda_warp_kernel_only_for_layers_it_takes(monkeypatch, shapes, expected):
    fakes = {"cuda": _FakeBackend("cuda"), "triton": _FakeBackend("triton")}
    monkeypatch.setattr(_dispatch, "_loaded", {**_dispatch._loaded, **fakes})
    device = torch.device("cuda")
    assert _dispatch.select_memorized_mask("auto", device, shapes).name == expected
    assert _dispatch.select_memorized_mask("cuda", device, shapes).name == "cuda"  # explicit: always cuda
