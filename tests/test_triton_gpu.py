"""The Triton backend on a CUDA GPU at SD1.5 and SDXL shapes: masks identical, GEGLU exact."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels, not the interpreter"),
]
pytest.importorskip("triton", reason="the triton backend needs the triton package")

import memloc_kernels as mk  # noqa: E402
from memloc_kernels import reference as ref  # noqa: E402

TR = "triton"
CUDA = torch.device("cuda")
# FFN second layers as (d_out, d_in); see benchmarks/bench_gpu_ops.py for how they were counted
SD15 = [(320, 1280)] * 5 + [(640, 2560)] * 5 + [(1280, 5120)] * 6
SDXL = [(640, 2560)] * 10 + [(1280, 5120)] * 60


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = actual != expected
    if bool(diff.any()):
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} entries differ, first at "
                             f"{diff.nonzero()[:5].tolist()}")


def layer_stats(shapes, lead=(), device=CUDA):
    """Weights and heavy-tailed statistics like a UNet's (some dead features, a shared null)."""
    weights, sumsqs, nulls = [], [], []
    for d_out, d_in in shapes:
        weights.append(torch.randn(d_out, d_in, device=device, dtype=torch.float16) * 0.02)
        s = torch.exp(torch.randn(*lead, d_in, device=device) * 1.5) * 1e3
        s[..., torch.rand(d_in, device=device) < 0.02] = 0.0
        sumsqs.append(s)
        nulls.append(torch.exp(torch.randn(d_in, device=device) * 1.5) * 1e3)
    return weights, sumsqs, nulls


def check_layers(weights, sumsqs, nulls, sparsity):
    got = mk.memorized_masks(weights, sumsqs, nulls, sparsity, backend=TR)
    for i, (w, s, n) in enumerate(zip(weights, sumsqs, nulls)):
        want = ref.memorized_mask(w, s, n, sparsity)
        assert_same(mk.unpack_mask(got[i]), want, f"layer {i} {tuple(w.shape)}")


@pytest.mark.parametrize("lead", [(), (2, 3)], ids=["single", "S2T3"])
@pytest.mark.parametrize("sparsity", [0.01, 0.03], ids=["s1pct", "s3pct"])
def test_sd15_layers_identical(lead, sparsity):
    check_layers(*layer_stats(SD15, lead), sparsity)


def test_sdxl_layers_identical():
    check_layers(*layer_stats(SDXL), 0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_other_weight_dtypes_identical(dtype):
    weights, sumsqs, nulls = layer_stats([(1280, 5120)], (3,))
    check_layers([weights[0].to(dtype)], sumsqs, nulls, 0.01)


def test_planted_ties_and_zero_rows_identical():
    w = (torch.randn(1280, 5120, device=CUDA) * 4).round().to(torch.float16)  # few distinct |W|
    w[:50] = 0.0
    s = torch.ones(2, 5120, device=CUDA)
    s[1, ::7] = 4.0
    check_layers([w], [s], [torch.zeros(5120, device=CUDA)], 0.01)


def test_large_sparsity_dense_path_identical():
    check_layers(*layer_stats([(640, 2560)], (2,)), 0.2)


def test_or_into_existing_masks():
    weights, sumsqs, nulls = layer_stats(SD15[:6], (2, 2))
    starts = [torch.rand(2, *w.shape, device=CUDA) < 0.01 for w in weights]
    outs = [mk.pack_mask(x) for x in starts]
    mk.memorized_masks(weights, sumsqs, nulls, 0.01, outs=outs, backend=TR)
    for i, (w, s, n) in enumerate(zip(weights, sumsqs, nulls)):
        assert_same(mk.unpack_mask(outs[i]), starts[i] | ref.memorized_mask(w, s, n, 0.01), f"layer {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_geglu_bit_identical_to_diffusers(dtype):
    proj_out = (torch.randn(2, 4096, 2 * 1280, device=CUDA) * 2).to(dtype)
    acc = torch.zeros(2, 1280, device=CUDA)
    h = mk.geglu_sumsq(proj_out, acc, group_size=4096, backend=TR)
    try:
        from diffusers.models.activations import GEGLU
    except ImportError:
        expected = ref.geglu(proj_out)  # the same two lines diffusers runs
    else:
        module = GEGLU(8, 1280).to(device=CUDA, dtype=dtype)
        module.proj = torch.nn.Identity()
        expected = module(proj_out)
    assert_same(h, expected, "GEGLU output")
    want = h.double().square().sum(dim=1)
    assert ((acc.double() - want).abs() / want).max().item() <= 1e-5


@pytest.mark.parametrize("d, tokens", [(1280, 4096), (5120, 256)], ids=["level1", "level3"])
def test_accumulate_sumsq_within_1e5_of_float64(d, tokens):
    h = torch.randn(32 * tokens, d, device=CUDA, dtype=torch.float16) * 3
    acc = torch.zeros(32, d, device=CUDA)
    mk.accumulate_sumsq(h, acc, group_size=tokens, backend=TR)
    want = h.double().square().reshape(32, tokens, d).sum(dim=1)
    err = ((acc.double() - want).abs() / want).max().item()
    assert err <= 1e-5, f"max relative error {err:.3g}"


def test_apply_restore_round_trip_at_sd15_size():
    weights, sumsqs, nulls = layer_stats(SD15[-1:])
    w = weights[0]
    original = w.clone()
    mask = mk.memorized_mask(w, sumsqs[0], nulls[0], 0.03, packed=True, backend=TR)
    record = mk.apply_mask(w, mask, backend=TR)
    dense = mk.unpack_mask(mask)
    assert_same(record.removed, original[dense], "removed values")
    assert not bool(w[dense].any()) and torch.equal(w[~dense], original[~dense])
    mk.restore(w, record, backend=TR)
    assert_same(w.view(torch.int16), original.view(torch.int16), "restored bits")


def test_iou_of_sd15_size_masks():
    words_per_mask = sum(o * i for o, i in SD15) // 32
    words = torch.randint(-2**31, 2**31 - 1, (40, words_per_mask), device=CUDA, dtype=torch.int32)
    words[3] = 0
    masks = mk.PackedMask(words, words_per_mask * 32)
    inter = torch.zeros(40, 40, dtype=torch.float64, device=CUDA)
    for start in range(0, words_per_mask, 1 << 16):
        chunk = words[:, start:start + (1 << 16)]
        bits = ref.unpack_mask(chunk, chunk.shape[1] * 32).to(torch.float32)
        inter += (bits @ bits.T).double()  # 0/1 products summed in float32: exact below 2**24
    sizes = torch.diagonal(inter)
    union = sizes[:, None] + sizes[None, :] - inter
    want = torch.where(union == 0, torch.full_like(inter, float("nan")), inter / union.clamp(min=1))
    got = mk.mask_iou(masks, backend=TR)
    assert torch.equal(got.isnan(), want.isnan())
    assert_same(torch.nan_to_num(got), torch.nan_to_num(want), "IoU")
    assert_same(mk.mask_density(mk.PackedMask(words[:, None, :], words_per_mask * 32), backend=TR),
                sizes / torch.full_like(sizes, words_per_mask * 32), "density")  # a true division: CUDA
    # turns division by a Python scalar into a multiply by its reciprocal (1 ulp off)
