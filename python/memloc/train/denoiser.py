"""UNet (+ text encoder) training step on pre-encoded latents, graph-safe: the batch is drawn on the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .loop import autocast


@dataclass
class LatentSource:
    """Latents (already multiplied by the VAE's scaling factor) and their caption indices.

    Every step draws ``per_step`` rows uniformly from this source, so a source's share of the
    batch, not its size, sets how often each of its images is seen. With ``rows`` (indices into
    ``latents``, repeats allowed) the draw is uniform over ``rows`` instead: a dataset with
    duplicated images without copying their latents. With ``std`` the latent is sampled from the
    VAE posterior (``latents + std * noise``), as in Stable Diffusion fine-tuning.
    """

    name: str
    latents: torch.Tensor
    captions: torch.Tensor
    per_step: int
    std: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def denoiser_step(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    opt: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    sources: Sequence[LatentSource],
    *,
    caption_ids: torch.Tensor,
    empty_index: int,
    alphas_cumprod: torch.Tensor,
    caption_dropout: float,
    text_mode: str = "table",
    context_table: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    autocast_dtype: torch.dtype | None = None,
) -> Callable[[], torch.Tensor]:
    """Return a step that returns [loss, loss of each source].

    ``caption_ids`` [K, L] holds every caption's token ids (row ``empty_index`` is the empty
    caption, used for the classifier-free-guidance dropout). ``text_mode``: ``table`` runs the
    text encoder on all K captions once per step and gathers (cheapest when K is small, as for
    the embedded model), ``batch`` runs it on the batch's captions, ``frozen`` gathers rows of a
    precomputed ``context_table`` [K, L, D] (text encoder not trained).
    """
    if text_mode not in ("table", "batch", "frozen"):
        raise ValueError(f"text_mode must be 'table', 'batch' or 'frozen', got {text_mode!r}")
    if text_mode == "frozen" and context_table is None:
        raise ValueError("text_mode 'frozen' needs context_table")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    device = caption_ids.device
    n_timesteps = len(alphas_cumprod)
    sources = [s for s in sources if s.per_step > 0]

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        lat, cap = [], []
        for src in sources:
            if src.rows is None:
                idx = torch.randint(len(src.latents), (src.per_step,), device=device)
            else:
                idx = src.rows[torch.randint(len(src.rows), (src.per_step,), device=device)]
            x = src.latents[idx].float()
            if src.std is not None:
                x = x + src.std[idx].float() * torch.randn_like(x)
            lat.append(x)
            cap.append(src.captions[idx])
        x0 = torch.cat(lat)
        cap = torch.cat(cap)
        batch = x0.shape[0]
        drop = torch.rand(batch, device=device) < caption_dropout
        cap = torch.where(drop, torch.full_like(cap, empty_index), cap)
        t = torch.randint(0, n_timesteps, (batch,), device=device)
        noise = torch.randn_like(x0)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise
        target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1.0 - ab).sqrt() * x0
        with autocast(device, autocast_dtype):
            if text_mode == "table":
                context = text_encoder(caption_ids)[0][cap]
            elif text_mode == "batch":
                context = text_encoder(caption_ids[cap])[0]
            else:
                context = context_table[cap]
            pred = unet(xt, t, context).sample
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        values, start = [loss], 0
        for src in sources:
            values.append(per_sample[start : start + src.per_step].mean())
            start += src.per_step
        return torch.stack(values).detach()

    return step


def value_names(sources: Sequence[LatentSource]) -> tuple[str, ...]:
    return ("loss", *(f"loss_{s.name}" for s in sources if s.per_step > 0))
