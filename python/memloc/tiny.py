"""Tiny Stable-Diffusion-structured pipelines with random weights, for tests and shape benchmarks.

They are built from configs (no downloads): the UNet has SD1.x's block structure (three
cross-attention down blocks, a cross-attention mid block, three cross-attention up blocks, so 16
GEGLU feed-forwards) at small widths, the tokenizer is a byte-level CLIP tokenizer written by
:func:`write_char_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD1_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode character table."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def write_char_tokenizer(path: str | Path, model_max_length: int = 77) -> Path:
    """Write a byte-level CLIPTokenizer (no merges: one token per character) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def build_tiny_pipeline(
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    channels: tuple[int, ...] = (32, 64, 64, 64),
    cross_attention_dim: int = 32,
    sample_size: int = 8,
    layers_per_block: int = 2,
    scheduler: str = "ddim",
    sdxl: bool = False,
):
    """A StableDiffusionPipeline with SD1.x's UNet block structure, tiny widths, random weights.

    ``tokenizer_dir`` holds a CLIP tokenizer (e.g. from :func:`write_char_tokenizer`). The VAE
    downsamples by 2, so images are ``2 * sample_size`` pixels wide.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if sdxl:
        raise NotImplementedError("tiny SDXL pipelines are built by tests from UNet configs only")
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=SD1_DOWN,
        up_block_types=SD1_UP,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if scheduler == "ddim":
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **common)
    elif scheduler == "pndm":
        sched = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **common)
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'pndm', got {scheduler!r}")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
