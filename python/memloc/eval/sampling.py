"""Batched classifier-free-guidance sampling that measures Wen et al.'s detection metric on the way.

Our own small loop instead of ``pipe(...)``: one batch may mix prompts, each sample has its own
seed, the conditional and unconditional noise predictions of every step are at hand (the
detection metric costs one norm), and pixel-space pipelines (no VAE) work the same way. It follows
StableDiffusionPipeline: scaled initial noise, ``[uncond, cond]`` in one UNet batch,
``eps = eps_u + w (eps_c - eps_u)``, the scheduler's step, VAE decode, ``x / 2 + 0.5`` clamped.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MemlocError


@dataclass
class SampleBatch:
    """One batch of samples: uint8 images ``[B, H, W, 3]`` (None when not decoded) and detection ``[B]``."""

    images: np.ndarray | None
    detection: np.ndarray


def check_pipeline(pipe) -> None:
    """Raise a MemlocError unless ``pipe`` is a one-text-encoder text-to-image pipeline (SD 1.x/2.x style)."""
    for name in ("unet", "scheduler", "tokenizer", "text_encoder"):
        if getattr(pipe, name, None) is None:
            raise MemlocError(
                f"the pipeline ({type(pipe).__name__}) has no {name}; evaluation needs a Stable-Diffusion-style "
                "text-to-image pipeline"
            )
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise MemlocError(f"{type(pipe).__name__} has two text encoders (SDXL); the evaluation supports one")


def execution(pipe) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype of the pipeline (those of its UNet)."""
    return pipe.unet.device, pipe.unet.dtype


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], chunk: int = 64) -> torch.Tensor:
    """Text-encoder hidden states ``[P, L, D]`` of the prompts, padded to the tokenizer's max length."""
    device, dtype = execution(pipe)
    tok = pipe.tokenizer
    use_mask = bool(getattr(pipe.text_encoder.config, "use_attention_mask", False))
    out = []
    for start in range(0, len(prompts), chunk):
        batch = tok(
            list(prompts[start : start + chunk]),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = batch.attention_mask.to(device) if use_mask else None
        out.append(pipe.text_encoder(batch.input_ids.to(device), attention_mask=mask)[0].to(dtype))
    return torch.cat(out)


def latent_shape(pipe) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the UNet's input."""
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return pipe.unet.config.in_channels, height, width


def check_tile_grid(pipe, grid: int) -> None:
    """Refuse, before any sampling, a tile grid finer than the pipeline's images have pixels."""
    _, height, width = latent_shape(pipe)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    side = min(height, width) * scale
    if not 1 <= grid <= side:
        raise MemlocError(f"--tile-grid must be in 1..{side} for {height * scale}x{width * scale} images, got {grid}")


def initial_noise(pipe, seeds: Sequence[int]) -> torch.Tensor:
    """Standard normal noise, one CPU generator per seed, so a seed gives the same noise on any device."""
    device, dtype = execution(pipe)
    shape = latent_shape(pipe)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device, dtype)


def new_scheduler(pipe):
    """A fresh copy of the pipeline's scheduler (schedulers keep per-run state)."""
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


def unet_output(pipe, latents: torch.Tensor, t, embeds: torch.Tensor) -> torch.Tensor:
    return pipe.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """Final latents (or pixels, without a VAE) as uint8 images ``[B, H, W, 3]``.

    The VAE decodes ``chunk`` samples at a time: at 512 x 512 its activations dwarf the UNet's.
    """
    vae = getattr(pipe, "vae", None)
    out = []
    for start in range(0, latents.shape[0], chunk):
        z = latents[start : start + chunk]
        if vae is not None:
            z = z / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift:
                z = z + shift
            z = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        x = (z.float() / 2 + 0.5).clamp(0, 1)
        # rounded as diffusers' numpy_to_pil rounds, so distances are those of the saved PNGs
        out.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def sample(
    pipe,
    cond: torch.Tensor,
    null: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    decode_images: bool = True,
    max_steps: int | None = None,
) -> SampleBatch:
    """Sample one image per seed with classifier-free guidance.

    Args:
        cond: conditional embeddings ``[B, L, D]`` (one row per seed).
        null: the empty prompt's embedding ``[1, L, D]`` (or ``[B, L, D]``).
        steps: scheduler steps; guidance: the CFG scale ``w``.
        max_steps: stop after this many steps (detection only; no images).
    Returns:
        images (uint8, when decoded) and, per sample, Wen et al.'s detection metric: the mean over
        the steps run of ``||eps(z_t, t, p) - eps(z_t, t, null)||_2`` along this trajectory.
    """
    batch = len(seeds)
    if cond.shape[0] != batch:
        raise ValueError(f"cond has {cond.shape[0]} rows for {batch} seeds")
    device, dtype = execution(pipe)
    scheduler = new_scheduler(pipe)
    scheduler.set_timesteps(steps, device=device)
    latents = initial_noise(pipe, seeds) * scheduler.init_noise_sigma
    embeds = torch.cat([null.to(device, dtype).expand(batch, -1, -1), cond.to(device, dtype)])
    extra = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        # stochastic schedulers draw step noise from per-sample generators too
        extra["generator"] = [torch.Generator("cpu").manual_seed(int(s) + 1) for s in seeds]
    detection = torch.zeros(batch, dtype=torch.float32, device=device)
    done = 0
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        if max_steps is not None and i >= max_steps:
            break
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = unet_output(pipe, model_in, t, embeds).chunk(2)
        diff = eps_c - eps_u
        detection += diff.float().flatten(1).norm(dim=1)
        latents = scheduler.step(eps_u + guidance * diff, t, latents, **extra, return_dict=False)[0]
        done += 1
    images = decode(pipe, latents) if decode_images and done == len(timesteps) else None
    return SampleBatch(images, (detection / max(done, 1)).double().cpu().numpy())


def seeds_for(prompt_index: int, samples: int, base_seed: int = 0) -> list[int]:
    """The seeds of a prompt's samples: distinct across prompts, equal across models and methods."""
    return [base_seed + prompt_index * samples + j for j in range(samples)]


def generate(
    pipe,
    cond: torch.Tensor,
    null: torch.Tensor,
    seeds: Sequence[Sequence[int]],
    *,
    steps: int,
    guidance: float,
    batch_size: int,
    decode_images: bool = True,
    max_steps: int | None = None,
    progress=None,
) -> list[SampleBatch]:
    """Samples for several prompts, batched across prompts: ``cond[p]`` with each seed of ``seeds[p]``.

    Returns one :class:`SampleBatch` per prompt. ``progress`` (a tqdm bar) is advanced per sample.
    """
    if cond.shape[0] != len(seeds):
        raise ValueError(f"cond has {cond.shape[0]} prompts, seeds has {len(seeds)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    jobs = [(p, s) for p, prompt_seeds in enumerate(seeds) for s in prompt_seeds]
    images: list[list[np.ndarray]] = [[] for _ in seeds]
    detection: list[list[float]] = [[] for _ in seeds]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        rows = torch.tensor([p for p, _ in chunk], device=cond.device)
        out = sample(
            pipe,
            cond[rows],
            null,
            [s for _, s in chunk],
            steps=steps,
            guidance=guidance,
            decode_images=decode_images,
            max_steps=max_steps,
        )
        for k, (p, _) in enumerate(chunk):
            detection[p].append(float(out.detection[k]))
            if out.images is not None:
                images[p].append(out.images[k])
        if progress is not None:
            progress.update(len(chunk))
    return [
        SampleBatch(np.stack(imgs) if imgs else None, np.asarray(det, dtype=np.float64))
        for imgs, det in zip(images, detection)
    ]
