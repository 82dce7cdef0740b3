"""The ops API at the edges of its contract, on every backend that runs CPU tensors here.

Non-finite weights, a PackedMask with bits past d_in, tensors autograd tracks, a damaged undo
record, empty tensors and numpy scalars: each either gets one defined answer from every backend or
a clear error naming the argument (found by an audit of the API, eighteenth session).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_masks_equal

import memloc_kernels as mk
from memloc_kernels import _dispatch


def _backends() -> list[str]:
    """The backends that run CPU tensors here (triton under TRITON_INTERPRET=1)."""
    names = []
    for name in _dispatch.BACKEND_NAMES:
        impl = _dispatch.get_backend(name)
        if impl.availability()[0] and impl.supports(torch.device("cpu")):
            names.append(name)
    return names


BACKENDS = _backends()


# --- non-finite weights: refused unless the caller turns the checks off ---------------------------


@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf")], ids=["nan", "neg_nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_weights_are_refused(backend, bad):
    weight, sumsq, null = torch.randn(3, 40), torch.rand(40), torch.zeros(40)
    weight[1, 3] = bad
    with pytest.raises(ValueError, match=r"\bweight\b.*NaN or inf"):
        mk.memorized_mask(weight, sumsq, null, 0.05, backend=backend)
    with pytest.raises(ValueError, match=r"weights\[1\].*NaN or inf"):
        mk.memorized_masks([weight[:1].contiguous(), weight], [sumsq] * 2, [null] * 2, 0.05, backend=backend)
    # the caller's promise that the inputs are clean skips every check
    mk.memorized_mask(weight, sumsq, null, 0.05, check_finite=False, backend=backend)


def test_float64_statistics_that_overflow_float32_are_refused():
    weight, null = torch.randn(2, 8), torch.zeros(8, dtype=torch.float64)
    sumsq = torch.full((8,), 1e39, dtype=torch.float64)  # finite in float64, inf as float32
    with pytest.raises(ValueError, match=r"\bsumsq\b.*float32"):
        mk.memorized_mask(weight, sumsq, null, 0.25)


# --- a PackedMask's padding bits ------------------------------------------------------------------


def _dirty_masks(d_in: int = 40) -> tuple[mk.PackedMask, torch.Tensor]:
    """Two [1, 1, d_in] masks whose words carry a bit past d_in; and the clean bool masks."""
    clean = torch.zeros(2, 1, d_in, dtype=torch.bool)
    clean[0, 0, 32] = True
    words = mk.pack_mask(clean).words.clone()
    words[:, 0, -1] |= 1 << 9  # column 41 of a 40-column mask
    return mk.PackedMask(words, d_in), clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_masks_with_bits_past_d_in_are_refused(backend):
    dirty, clean = _dirty_masks()
    with pytest.raises(ValueError, match=r"masks has bits set past column 39"):
        mk.mask_density(dirty, backend=backend)
    with pytest.raises(ValueError, match=r"masks has bits set past column 39"):
        mk.mask_iou(dirty, backend=backend)
    with pytest.raises(ValueError, match=r"mask has bits set past column 39"):
        mk.apply_mask(torch.randn(1, 40), dirty[0], backend=backend)
    # the same masks without the stray bit are counted as the bool masks say
    assert mk.mask_density(mk.pack_mask(clean), backend=backend).tolist() == [1 / 40, 0.0]
    iou = mk.mask_iou(mk.pack_mask(clean), backend=backend)
    assert iou[0, 0] == 1.0 and iou[0, 1] == 0.0 and bool(iou[1, 1].isnan())


def test_packed_mask_checks_its_fields():
    with pytest.raises(TypeError, match="words"):
        mk.PackedMask([[0]], 5)
    for d_in in (-5, 0, 40.0, True):
        with pytest.raises(ValueError, match="d_in"):
            mk.PackedMask(torch.zeros(2, 2, dtype=torch.int32), d_in)


# --- autograd: in place only where autograd is not watching ---------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_ops_refuse_tensors_that_require_grad(backend):
    layer = torch.nn.Linear(40, 4)
    mask = torch.zeros(4, 40, dtype=torch.bool)
    mask[1, 7] = True
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"weight requires grad"):
        mk.apply_mask(layer.weight, mask, backend=backend)
    assert torch.equal(layer.weight.detach(), before)
    with torch.no_grad():
        record = mk.apply_mask(layer.weight, mask, backend=backend)
    assert layer.weight[1, 7].item() == 0.0
    with pytest.raises(ValueError, match=r"weight requires grad"):
        mk.restore(layer.weight, record, backend=backend)
    with torch.no_grad():
        mk.restore(layer.weight, record, backend=backend)
    assert torch.equal(layer.weight.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_ops_bump_the_version_counter(backend):
    # A tensor saved for backward and then pruned: backward must notice, as with torch's own ops.
    weight = torch.randn(4, 40)
    x = torch.randn(3, 4, requires_grad=True)
    y = (x @ weight).sum()
    mask = torch.zeros(4, 40, dtype=torch.bool)
    mask[0, 0] = True
    version = weight._version
    record = mk.apply_mask(weight, mask, backend=backend)
    assert weight._version > version
    version = weight._version
    mk.restore(weight, record, backend=backend)
    assert weight._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# --- exact undo, and a damaged record -------------------------------------------------------------


@pytest.mark.parametrize("dtype, bits, signalling", [
    (torch.float32, torch.int32, 0x7F800001), (torch.float16, torch.int16, 0x7C01),
    (torch.bfloat16, torch.int16, 0x7F81), (torch.float64, torch.int64, 0x7FF0000000000001),
], ids=["f32", "f16", "bf16", "f64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_keeps_signalling_nan_payloads(backend, dtype, bits, signalling):
    weight = torch.randn(2, 40).to(dtype)
    weight.view(bits)[0, 1] = signalling
    weight.view(bits)[1, 5] = -1  # a negative NaN with every payload bit set
    before = weight.view(bits).clone()
    for cols in ([(0, 1)], [(0, 1), (1, 5), (1, 6)]):  # torch's index_put takes another path for one value
        mask = torch.zeros(2, 40, dtype=torch.bool)
        for r, c in cols:
            mask[r, c] = True
        record = mk.apply_mask(weight, mask, backend=backend)
        assert record.count == len(cols)
        mk.restore(weight, record, backend=backend)
        assert torch.equal(weight.view(bits), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_refuses_a_damaged_record(backend):
    weight = torch.randn(3, 40)
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, :5] = True
    record = mk.apply_mask(weight, mask, backend=backend)
    damaged = [
        (mk.PruneRecord(record.mask, record.removed.double(), record.shape, record.dtype), "1-D torch.float32"),
        (mk.PruneRecord(record.mask, record.removed[:4], record.shape, record.dtype), "holds 4 values but"),
        (mk.PruneRecord(record.mask, record.removed[None], record.shape, record.dtype), "1-D torch.float32"),
        (mk.PruneRecord(_dirty_masks(40)[0][0], record.removed, record.shape, record.dtype), "record.mask"),
    ]
    zeroed = weight.clone()
    for bad, message in damaged:
        with pytest.raises(ValueError, match=message):
            mk.restore(weight, bad, backend=backend)
        assert torch.equal(weight, zeroed), "a refused restore writes nothing"
    # a removed tensor that is a strided view of the right values restores the same bits
    strided = torch.stack([record.removed, torch.zeros_like(record.removed)], dim=1)[:, 0]
    mk.restore(weight, mk.PruneRecord(record.mask, strided, record.shape, record.dtype), backend=backend)
    assert weight[0, :5].tolist() == record.removed.tolist()


# --- empty tensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_statistics_of_empty_masks(backend):
    assert mk.mask_density(torch.zeros(0, 40, dtype=torch.bool), backend=backend).isnan().all()
    density = mk.mask_density(torch.zeros(2, 0, 40, dtype=torch.bool), backend=backend)
    assert density.shape == (2,) and density.isnan().all()
    assert mk.mask_iou(torch.zeros(0, 4, 40, dtype=torch.bool), backend=backend).shape == (0, 0)
    iou = mk.mask_iou(torch.zeros(3, 0, 40, dtype=torch.bool), empty_value=0.0, backend=backend)
    assert torch.equal(iou, torch.zeros(3, 3, dtype=torch.float64))
    for op in (mk.pack_mask, mk.mask_density, mk.mask_iou):
        with pytest.raises(ValueError, match="non-empty last"):
            op(torch.zeros(2, 4, 0, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match=r"\bh\b.*non-empty"):
        mk.accumulate_sumsq(torch.zeros(3, 0), torch.zeros(0), backend=backend)
    with pytest.raises(ValueError, match=r"proj_out.*non-zero"):
        mk.geglu_sumsq(torch.zeros(3, 0), torch.zeros(0), backend=backend)


# --- argument types ----------------------------------------------------------------------------------


def test_numpy_scalars_are_numbers():
    weight, sumsq, null = torch.randn(3, 40), torch.rand(40), torch.zeros(40)
    want = mk.memorized_mask(weight, sumsq, null, 0.1)
    assert_masks_equal(mk.memorized_mask(weight, sumsq, null, np.float32(0.1)), want)
    assert_masks_equal(mk.memorized_mask(weight, sumsq, null, np.float64(0.1)), want)
    acc = torch.zeros(2, 40)
    mk.accumulate_sumsq(torch.randn(4, 40), acc, group_size=np.int64(2))
    assert acc.gt(0).all()
    assert mk.topk_count(np.float64(0.1), np.int64(40)) == 4


def test_remaining_arguments_are_checked():
    with pytest.raises(ValueError, match="sparsity"):
        mk.memorized_masks([], [], [], 5.0)
    assert mk.memorized_masks([], [], [], 0.5) == []
    with pytest.raises(ValueError, match="sparsity"):
        mk.topk_count(0, 40)
    with pytest.raises(ValueError, match="d_in"):
        mk.topk_count(0.5, 0)
    with pytest.raises(TypeError, match="empty_value"):
        mk.mask_iou(torch.zeros(2, 3, 4, dtype=torch.bool), empty_value="x")
    with pytest.raises(ValueError, match=r"got shape \(40,\)"):  # the mask's shape, not its packed words'
        mk.mask_iou(torch.zeros(40, dtype=torch.bool))
