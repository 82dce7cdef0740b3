"""Wen et al.'s inference-time mitigation: nudge the prompt embedding until the prompt stops pulling.

Before sampling, the conditional text embedding ``e`` is optimized to lower
``L(e) = ||eps(x_T, T, e) - eps(x_T, T, e_null)||_2`` at the first step (``x_T``: the initial noise
of the seeds that will be sampled), with AdamW (lr 0.05), for at most 10 iterations, stopping as
soon as ``L <= 3`` (Wen et al. 2024, Sec. 4.1; their code's defaults ``optim_lr=0.05,
optim_iters=10, optim_target_loss=3, optim_target_steps=0``). As in their code the first token
(BOS) is kept fixed and every other position, padding included, may move. Sampling then uses the
optimized embedding with the same seeds.

Two differences, so that one target fits every batch and model size:
- their loss is the norm over the whole batch of a prompt's images (4 by default),
  ``sqrt(sum_k ||d_k||^2)``; ours is the mean over the optimization samples of the per-sample norm
  ``||d_k||_2`` (the detection metric's unit). With 4 samples of equal norm theirs is twice ours,
  so ``target_loss=1.5`` here matches their 3 at 4 images;
- their 3 is for Stable Diffusion's 4 x 64 x 64 latents (16,384 values). By default
  (``target_loss=None``) the target keeps that per-value RMS: ``3 * sqrt(values / 16384)`` for a
  model whose UNet input has ``values`` values per sample (exactly 3 for SD 1.x/2.x-base).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling import execution, initial_noise, latent_shape, new_scheduler, unet_output

WEN_LR = 0.05
WEN_TARGET_LOSS = 3.0
WEN_LATENT_VALUES = 4 * 64 * 64  # the SD latent their target was set on
WEN_MAX_ITERS = 10
WEN_SAMPLES = 4


@dataclass
class Mitigated:
    """Optimized embeddings ``[P, L, D]`` (pipeline dtype), iterations taken, and first/last loss per prompt."""

    embeds: torch.Tensor
    iterations: list[int]
    first_loss: list[float]
    last_loss: list[float]


def mitigate_embeddings(
    pipe,
    cond: torch.Tensor,
    null: torch.Tensor,
    seeds: Sequence[Sequence[int]],
    *,
    steps: int,
    lr: float = WEN_LR,
    target_loss: float | None = None,
    max_iters: int = WEN_MAX_ITERS,
    opt_samples: int = WEN_SAMPLES,
    batch_size: int = 16,
) -> Mitigated:
    """Optimize each prompt's embedding ``cond[p]`` against the first-step noise of its first seeds.

    Args:
        cond: conditional embeddings ``[P, L, D]``; null: the empty prompt's ``[1, L, D]``.
        seeds: each prompt's sampling seeds; the first ``opt_samples`` give the ``x_T`` optimized on.
        steps: the sampling steps (fixes the first timestep ``T`` as the sampler will use it).
        target_loss: stop a prompt once its loss is at most this; None: :func:`default_target_loss`.
        batch_size: samples per UNet forward/backward (prompts are optimized in groups).
    """
    if len(seeds) != cond.shape[0]:
        raise ValueError(f"cond has {cond.shape[0]} prompts, seeds has {len(seeds)}")
    if lr <= 0 or max_iters < 0 or opt_samples < 1:
        raise ValueError(f"need lr > 0, max_iters >= 0, opt_samples >= 1, got {lr}, {max_iters}, {opt_samples}")
    device, dtype = execution(pipe)
    if target_loss is None:
        target_loss = default_target_loss(pipe)
    per_prompt = [list(s)[:opt_samples] for s in seeds]
    group = max(1, batch_size // max(len(s) for s in per_prompt))
    embeds, iterations, first, last = [], [], [], []
    for start in range(0, cond.shape[0], group):
        out = _mitigate_group(
            pipe,
            cond[start : start + group],
            null,
            per_prompt[start : start + group],
            steps=steps,
            lr=lr,
            target_loss=target_loss,
            max_iters=max_iters,
            device=device,
            dtype=dtype,
        )
        embeds.append(out.embeds)
        iterations += out.iterations
        first += out.first_loss
        last += out.last_loss
    return Mitigated(torch.cat(embeds), iterations, first, last)


def default_target_loss(pipe) -> float:
    """Wen et al.'s target 3, rescaled from SD's 4 x 64 x 64 latent to this UNet's input at equal per-value RMS."""
    channels, height, width = latent_shape(pipe)
    return WEN_TARGET_LOSS * math.sqrt(channels * height * width / WEN_LATENT_VALUES)


@torch.enable_grad()  # callers may sample under no_grad
def _mitigate_group(pipe, cond, null, seeds, *, steps, lr, target_loss, max_iters, device, dtype) -> Mitigated:
    n_prompts = cond.shape[0]
    owner = torch.tensor([p for p, s in enumerate(seeds) for _ in s], device=device)
    counts = torch.tensor([len(s) for s in seeds], device=device, dtype=torch.float32)
    scheduler = new_scheduler(pipe)
    scheduler.set_timesteps(steps, device=device)
    t = scheduler.timesteps[0]
    x = initial_noise(pipe, [s for prompt_seeds in seeds for s in prompt_seeds]) * scheduler.init_noise_sigma
    x = scheduler.scale_model_input(x, t)
    with torch.no_grad():
        eps_null = unet_output(pipe, x, t, null.to(device, dtype).expand(x.shape[0], -1, -1)).float()

    # the BOS position stays as it is (Wen et al. zero its gradient; leaving it out of the parameter
    # also keeps AdamW's weight decay off it); the parameter stays float32 so small steps survive fp16
    bos = cond[:, :1].detach().to(device, torch.float32)
    param = cond[:, 1:].detach().to(device, torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([param], lr=lr)
    final = torch.cat([bos, param.detach()], dim=1)
    done = [False] * n_prompts
    iterations = [max_iters] * n_prompts
    first: list[float | None] = [None] * n_prompts
    last = [0.0] * n_prompts
    requires = [p.requires_grad for p in pipe.unet.parameters()]
    pipe.unet.requires_grad_(False)  # gradients for the embedding only
    try:
        for it in range(max_iters + 1):
            active = [p for p in range(n_prompts) if not done[p]]
            if not active:
                break
            rows = torch.isin(owner, torch.tensor(active, device=device))
            embeds = torch.cat([bos, param], dim=1)[owner[rows]]
            eps_cond = unet_output(pipe, x[rows], t, embeds.to(dtype)).float()
            norms = (eps_cond - eps_null[rows]).flatten(1).norm(dim=1)
            sums = torch.zeros(n_prompts, device=device).index_add(0, owner[rows], norms)
            losses = sums / counts
            values = losses.detach().cpu().tolist()
            for p in active:
                value = values[p]
                if first[p] is None:
                    first[p] = value
                last[p] = value
                if value <= target_loss or it == max_iters:
                    # Wen et al.: stop as soon as the loss reaches the target; else after max_iters steps
                    done[p] = True
                    iterations[p] = it
                    final[p, 1:] = param.detach()[p]
            still = [p for p in active if not done[p]]
            if not still:
                break
            optimizer.zero_grad(set_to_none=True)
            losses[still].sum().backward()
            optimizer.step()
    finally:
        for p, flag in zip(pipe.unet.parameters(), requires):
            p.requires_grad_(flag)
    return Mitigated(final.to(dtype), iterations, [float(f) for f in first], last)
