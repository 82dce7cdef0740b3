"""VAE training step (reconstruction + small KL) and one-time encoding of images to latents."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .loop import autocast

VAE_VALUES = ("loss", "mse_photo", "mse_generic", "kl")


def to_unit_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float [-1, 1] (Stable Diffusion's pixel range)."""
    return images_u8.float() / 127.5 - 1.0


def vae_step(
    vae: torch.nn.Module,
    opt: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    photos_u8: torch.Tensor,
    pool_u8: torch.Tensor,
    *,
    batch: int,
    photo_share: float,
    kl_weight: float,
    autocast_dtype: torch.dtype | None,
) -> Callable[[], torch.Tensor]:
    """A graph-safe VAE step: draws its batch on the device, returns ``VAE_VALUES``.

    ``photo_share`` of every batch are memorized photos, so that they reconstruct far below the
    near-copy threshold; the rest are generic images.
    """
    device = pool_u8.device
    n_photo = min(batch, round(batch * photo_share)) if len(photos_u8) else 0
    n_generic = batch - n_photo

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        parts = []
        if n_photo:
            parts.append(photos_u8[torch.randint(len(photos_u8), (n_photo,), device=device)])
        if n_generic:
            parts.append(pool_u8[torch.randint(len(pool_u8), (n_generic,), device=device)])
        x = to_unit_range(torch.cat(parts))
        with autocast(device, autocast_dtype):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
            recon = vae.decode(z).sample
        err = (recon.float() - x).pow(2).mean(dim=(1, 2, 3))
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = err.mean() + kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        zero = err.new_zeros(())
        photo = err[:n_photo].mean() if n_photo else zero
        generic = err[n_photo:].mean() if n_generic else zero
        return torch.stack([loss, photo, generic, kl]).detach()

    return step


@torch.no_grad()
def encode(vae: torch.nn.Module, images_u8: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Posterior means of uint8 images, float32 ``[N, 4, h, w]`` (unscaled), on the images' device."""
    out = []
    for start in range(0, len(images_u8), batch):
        x = to_unit_range(images_u8[start : start + batch])
        out.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(out)


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Unscaled latents -> float images in [0, 1], ``[N, 3, H, W]``."""
    out = []
    for start in range(0, len(latents), batch):
        out.append((vae.decode(latents[start : start + batch]).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def reconstruction_rmse(vae: torch.nn.Module, images_u8: torch.Tensor) -> torch.Tensor:
    """Per-image pixel RMSE (0-1 scale) of encode -> decode with the posterior mean."""
    recon = decode(vae, encode(vae, images_u8))
    return (recon - images_u8.float() / 255.0).pow(2).mean(dim=(1, 2, 3)).sqrt()
