"""Training steps and loop: loss goes down on tiny models, steps are CUDA-graph safe, schedule and stopping."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memloc.train import models
from memloc.train.denoiser import LatentSource, denoiser_step, value_names
from memloc.train.loop import lr_at, make_adamw, run_loop, set_lr
from memloc.train.shapes import render, sample_generic
from memloc.train.vae import VAE_VALUES, vae_step

CFG = models.PRESETS["tiny"]


# one intra-op thread (conftest.py): the machines have 2 shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from memloc.train.tokenizer import write_clip_tokenizer

    path = write_clip_tokenizer(tmp_path_factory.mktemp("tok"), ["a red circle", "two blue squares", "a cat"], 16)
    return CLIPTokenizer.from_pretrained(str(path))


def _caption_ids(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids


def _denoiser_setup(tokenizer, device="cpu", n=6):
    unet = models.build_unet(CFG).to(device)
    text_encoder = models.build_text_encoder(CFG, tokenizer).to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ids = _caption_ids(tokenizer, ["a red circle", "two blue squares", "a cat", ""]).to(device)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(n, 4, CFG.latent_size, CFG.latent_size, generator=g).to(device)
    sources = [
        LatentSource("photo", latents[:2], torch.tensor([2, 2], device=device), 4),
        LatentSource("generic", latents[2:], torch.tensor([0, 1, 0, 1], device=device), 4),
    ]
    alphas = models.build_scheduler().alphas_cumprod.to(device=device, dtype=torch.float32)
    return unet, text_encoder, params, ids, sources, alphas


def _mean(rows, col, sl):
    vals = [r[col] for r in rows[sl]]
    return sum(vals) / len(vals)


def test_vae_step_reduces_loss():
    vae = models.build_vae(CFG)
    params = list(vae.parameters())
    opt = make_adamw(params, 2e-3, torch.device("cpu"))
    images = render(sample_generic(8, seed=2), 16)
    step = vae_step(vae, opt, params, images[:2], images[2:], batch=8, photo_share=0.25, kl_weight=1e-6,
                    autocast_dtype=None)
    rows = [step().tolist() for _ in range(30)]
    assert all(math.isfinite(v) for r in rows for v in r)
    assert len(rows[0]) == len(VAE_VALUES)
    assert _mean(rows, 0, slice(-5, None)) < 0.8 * _mean(rows, 0, slice(0, 5))


@pytest.mark.parametrize("text_mode", ["table", "batch"])
def test_denoiser_step_reduces_loss(tokenizer, text_mode):
    unet, text_encoder, params, ids, sources, alphas = _denoiser_setup(tokenizer)
    opt = make_adamw(params, 2e-3, torch.device("cpu"))
    step = denoiser_step(unet, text_encoder, opt, params, sources, caption_ids=ids, empty_index=3,
                         alphas_cumprod=alphas, caption_dropout=0.1, text_mode=text_mode)
    before = [p.detach().clone() for p in text_encoder.parameters()]
    rows = [step().tolist() for _ in range(30)]
    assert len(rows[0]) == len(value_names(sources)) == 3
    assert _mean(rows, 0, slice(-5, None)) < 0.8 * _mean(rows, 0, slice(0, 5))
    assert any(not torch.equal(a, b) for a, b in zip(before, text_encoder.parameters())), "text encoder not trained"


def test_denoiser_step_frozen_context_and_rows(tokenizer):
    unet, text_encoder, params, ids, sources, alphas = _denoiser_setup(tokenizer)
    with torch.no_grad():
        table = text_encoder(ids)[0]
    src = LatentSource("data", sources[1].latents, sources[1].captions, 4, std=torch.full_like(sources[1].latents, 0.1),
                       rows=torch.tensor([0, 0, 0, 1, 2, 3]))
    unet_params = list(unet.parameters())
    opt = make_adamw(unet_params, 1e-3, torch.device("cpu"))
    step = denoiser_step(unet, text_encoder, opt, unet_params, [src], caption_ids=ids, empty_index=3,
                         alphas_cumprod=alphas, caption_dropout=0.0, text_mode="frozen", context_table=table,
                         prediction_type="v_prediction")
    values = step()
    assert values.shape == (2,) and torch.isfinite(values).all()
    with pytest.raises(ValueError, match="context_table"):
        denoiser_step(unet, text_encoder, opt, unet_params, [src], caption_ids=ids, empty_index=3,
                      alphas_cumprod=alphas, caption_dropout=0.0, text_mode="frozen")


class _HostSyncDetector(TorchDispatchMode):
    """Records ops that would break CUDA graph capture: host reads of device values, host-to-device copies."""

    def __init__(self):
        super().__init__()
        self.problems = []
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(str(func))
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.problems.append(str(func))
        devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if {"cpu", "meta"} <= devices:
            self.problems.append(f"{func} mixes host and device tensors")
        return func(*args, **kwargs)


class _NoOptimizer:
    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def _run_on_meta(step):
    with _HostSyncDetector() as detector:
        step()
    assert "aten.convolution_backward.default" in detector.ops, "the backward pass did not run"
    return detector.problems


def test_detector_catches_host_syncs():
    x = torch.ones(3, device="meta")
    with _HostSyncDetector() as detector:
        try:
            bool((x > 0).any())
        except (RuntimeError, NotImplementedError):
            pass
        try:
            _ = x + torch.ones(3)
        except RuntimeError:
            pass
    assert len(detector.problems) >= 2, detector.problems


def test_steps_have_no_host_syncs(tokenizer):
    """Forward and backward of both steps, on the meta device: nothing a CUDA graph could not capture."""
    unet, text_encoder, params, ids, sources, alphas = _denoiser_setup(tokenizer, device="meta")
    step = denoiser_step(unet, text_encoder, _NoOptimizer(), [], sources, caption_ids=ids, empty_index=3,
                         alphas_cumprod=alphas, caption_dropout=0.1, text_mode="table")
    assert _run_on_meta(step) == []
    vae = models.build_vae(CFG).to("meta")
    photos = torch.zeros(2, 3, 16, 16, dtype=torch.uint8, device="meta")
    step = vae_step(vae, _NoOptimizer(), [], photos, photos, batch=4, photo_share=0.5, kl_weight=1e-6,
                    autocast_dtype=None)
    assert _run_on_meta(step) == []


def test_lr_schedule():
    assert lr_at(1.0, 0, 0.0, 10) == pytest.approx(0.1)
    assert lr_at(1.0, 9, 0.0, 10) == pytest.approx(1.0)
    assert lr_at(1.0, 100, 0.5, 10) == pytest.approx(0.5)
    assert lr_at(1.0, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(1.0, 100, 2.0, 10) == pytest.approx(0.0, abs=1e-12)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(1.0))
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"].item() == 0.25


def _counting_step(param, values):
    state = {"n": 0}

    def step():
        state["n"] += 1
        with torch.no_grad():
            param.add_(1.0)
        return torch.tensor(values(state["n"]), dtype=torch.float32)

    return step, state


def test_run_loop_stops_at_max_steps_and_logs():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    step, state = _counting_step(p, lambda n: [1.0 / n])
    res = run_loop(step, opt, [p], device=torch.device("cpu"), lr=0.1, warmup_steps=1, max_steps=10, seconds=60,
                   value_names=["loss"], log_every=4)
    assert res.steps == 10 and state["n"] == 10 and res.stopped_by == "max_steps"
    assert [r[0] for r in res.curve] == [4, 8, 10]
    assert res.curve[0][1] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, rel=1e-5)
    assert res.mode == "eager" and res.error is None


def test_run_loop_stops_on_time():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    step, _ = _counting_step(p, lambda n: [1.0])
    res = run_loop(step, opt, [p], device=torch.device("cpu"), lr=0.1, warmup_steps=1, max_steps=10**9,
                   seconds=0.05, value_names=["loss"], log_every=1)
    assert res.stopped_by == "time" and res.steps >= 1


def test_run_loop_restores_weights_on_non_finite_loss():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    step, _ = _counting_step(p, lambda n: [1.0 if n <= 4 else float("nan")])
    res = run_loop(step, opt, [p], device=torch.device("cpu"), lr=0.1, warmup_steps=1, max_steps=100, seconds=60,
                   value_names=["loss"], log_every=2)
    assert res.stopped_by == "non-finite loss" and "restored from step 4" in res.error
    assert p.item() == 4.0  # the weights as they were at step 4, not after the NaN steps
