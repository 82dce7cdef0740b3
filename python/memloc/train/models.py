"""Model sizes (presets), component builders and saving as a StableDiffusionPipeline folder."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..tiny import SD1_DOWN, SD1_UP
from .tokenizer import TOKENIZER_FILES

# The embedded model must stay under this many bytes of files (issue 5).
SIZE_LIMIT_BYTES = 25_000_000


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the three trained components; the UNet always has SD1.x's block structure."""

    image_size: int = 32
    unet_channels: tuple[int, ...] = (32, 64, 128, 128)
    unet_heads: int = 4  # diffusers' ``attention_head_dim`` for SD1 means the number of heads
    unet_norm_groups: int = 16
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_max_length: int = 32
    vae_channels: tuple[int, ...] = (32, 64)
    vae_layers: int = 2
    vae_norm_groups: int = 16

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # ~10.3 M parameters, ~20.6 MB in fp16: 32x32 images, 4x16x16 latents.
    "embedded": ModelConfig(),
    # For tests on the CPU: 16x16 images, 4x8x8 latents, seconds per hundred steps.
    "tiny": ModelConfig(
        image_size=16,
        unet_channels=(16, 16, 32, 32),
        unet_heads=2,
        unet_norm_groups=8,
        text_width=32,
        text_layers=1,
        text_heads=2,
        vae_channels=(16, 16),
        vae_layers=1,
        vae_norm_groups=8,
    ),
}


def build_vae(cfg: ModelConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers,
        latent_channels=4,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
    )


def build_unet(cfg: ModelConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=SD1_DOWN,
        up_block_types=SD1_UP,
        block_out_channels=cfg.unet_channels,
        layers_per_block=2,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=cfg.unet_norm_groups,
    )


def build_text_encoder(cfg: ModelConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.text_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_scheduler():
    """DDIM with Stable Diffusion's noise schedule (scaled linear betas, 1000 steps, epsilon)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def assemble(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from components (no safety checker, like the checkpoints memloc studies)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def parameter_counts(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "text_encoder", "vae")}


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_pipeline(pipe, folder: Path, dtype: torch.dtype = torch.float16, tokenizer_dir: Path | None = None) -> None:
    """Save ``pipe`` (moved to the CPU and cast to ``dtype``) as safetensors into ``folder``.

    With ``tokenizer_dir``, the tokenizer folder is replaced by that folder's CLIP-format files,
    so the saved model does not depend on how the installed transformers serializes tokenizers.
    """
    pipe.to("cpu")
    for name in ("unet", "text_encoder", "vae"):
        getattr(pipe, name).to(dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    if tokenizer_dir is not None:
        shutil.rmtree(folder / "tokenizer", ignore_errors=True)
        (folder / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, folder / "tokenizer" / name)


def load_pipeline(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a pipeline folder the way a real checkpoint is loaded (local files only)."""
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        # Recent diffusers rename torch_dtype to dtype; torch_dtype works on every version we support.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
