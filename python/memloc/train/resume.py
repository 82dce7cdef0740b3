"""Load a memloc-trained pipeline folder to continue its training: fp32 components, its sizes, compatibility checks."""

# ``memloc train --resume DIR`` continues the UNet + text encoder training of a model that
# ``memloc train`` produced. The architecture, the VAE (with its scaling factor), the tokenizer and
# the scheduler all come from DIR. The tokenizer is reused as it is (its files are copied to the
# output), never rebuilt: a rebuilt one would renumber the tokens the text encoder has learned.
# Instead every training caption must tokenize into one whole-word token per word, which is how
# our tokenizer encodes the captions it was built from; a caption that falls back to pieces would
# meet untrained or differently trained embeddings.

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MemlocError
from .manifest import MANIFEST_NAME, read_manifest
from .models import ModelConfig, load_pipeline
from .tokenizer import check_caption


@dataclass
class Resumed:
    """The components of a loaded folder (fp32, on the device) and what is known about its training."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler: object
    config: ModelConfig
    tokenizer_dir: Path
    previous_training: dict = field(default_factory=dict)


def check_folder(folder: str | Path) -> Path:
    """Raise a one-line MemlocError unless ``folder`` looks like a pipeline folder with a CLIP BPE tokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MemlocError(f"--resume {folder}: not a folder")
    if not (folder / "model_index.json").is_file():
        raise MemlocError(f"--resume {folder}: no model_index.json (expected a diffusers pipeline folder)")
    for name in ("vocab.json", "merges.txt"):
        if not (folder / "tokenizer" / name).is_file():
            raise MemlocError(f"--resume {folder}: no tokenizer/{name} (expected a CLIP BPE tokenizer)")
    return folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _config_of(folder: Path, vae, text_encoder, tokenizer, unet) -> ModelConfig:
    """The ``ModelConfig`` that describes the loaded components, after checking that they fit together."""
    vc, uc, tc = vae.config, unet.config, text_encoder.config
    image_size = vc.sample_size
    if not isinstance(image_size, int):
        raise MemlocError(f"--resume {folder}: vae sample_size must be one integer, got {image_size!r}")
    latent_size = image_size // 2 ** (len(vc.block_out_channels) - 1)
    problems = []
    if not vc.latent_channels == uc.in_channels == uc.out_channels:
        problems.append(f"vae latent_channels {vc.latent_channels} vs unet in/out {uc.in_channels}/{uc.out_channels}")
    if uc.sample_size != latent_size:
        problems.append(f"unet sample_size {uc.sample_size} vs vae latent size {latent_size}")
    if uc.cross_attention_dim != tc.hidden_size:
        problems.append(f"unet cross_attention_dim {uc.cross_attention_dim} vs text hidden_size {tc.hidden_size}")
    if len(tokenizer) != tc.vocab_size:
        problems.append(f"tokenizer has {len(tokenizer)} tokens, text encoder vocab_size {tc.vocab_size}")
    if tokenizer.model_max_length > tc.max_position_embeddings:
        problems.append(f"tokenizer model_max_length {tokenizer.model_max_length} exceeds the text encoder's "
                        f"{tc.max_position_embeddings} positions")
    if problems:
        raise MemlocError(f"--resume {folder}: incompatible components: {'; '.join(problems)}")
    heads = uc.attention_head_dim
    return ModelConfig(
        image_size=image_size,
        unet_channels=tuple(uc.block_out_channels),
        unet_heads=heads if isinstance(heads, int) else tuple(heads),
        unet_norm_groups=uc.norm_num_groups,
        text_width=tc.hidden_size,
        text_layers=tc.num_hidden_layers,
        text_heads=tc.num_attention_heads,
        text_max_length=tokenizer.model_max_length,
        vae_channels=tuple(vc.block_out_channels),
        vae_layers=vc.layers_per_block,
        vae_norm_groups=vc.norm_num_groups,
    )


def check_captions(tokenizer, captions: list[str], folder: str | Path) -> None:
    """Raise unless every caption fits and tokenizes into exactly one whole-word token per word."""
    for caption in captions:
        try:
            check_caption(caption, tokenizer.model_max_length)
        except MemlocError as exc:
            raise MemlocError(f"--resume {folder}: {exc}") from None
    ids = tokenizer(captions, add_special_tokens=False).input_ids
    words = [[w + "</w>" for w in c.split()] for c in captions]
    bad = [c for c, row, w in zip(captions, ids, words) if tokenizer.convert_ids_to_tokens(row) != w]
    if bad:
        raise MemlocError(f"--resume {folder}: its tokenizer splits {len(bad)} of the {len(captions)} training "
                          f"captions into pieces, e.g. {bad[0]!r} (it was built from other captions)")


@contextlib.contextmanager
def _quiet():
    """Silence diffusers' and transformers' loading bars and notes, so that a failed load reads as one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def load_for_training(folder: str | Path, device: torch.device) -> Resumed:
    """Load ``folder`` in fp32 on ``device``: UNet and text encoder trainable, VAE frozen."""
    folder = check_folder(folder)
    try:
        with _quiet():
            pipe = load_pipeline(folder, "cpu", torch.float32)
    except Exception as exc:
        raise MemlocError(f"--resume {folder}: cannot load the pipeline ({_first_line(exc)})") from None
    missing = [n for n in ("vae", "text_encoder", "tokenizer", "unet", "scheduler") if getattr(pipe, n, None) is None]
    if missing:
        raise MemlocError(f"--resume {folder}: the pipeline has no {', '.join(missing)}")
    if not hasattr(pipe.scheduler, "alphas_cumprod"):
        raise MemlocError(f"--resume {folder}: scheduler {type(pipe.scheduler).__name__} has no alphas_cumprod")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise MemlocError(f"--resume {folder}: prediction_type {prediction!r} is not epsilon or v_prediction")
    config = _config_of(folder, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet)
    previous = read_manifest(folder).training if (folder / MANIFEST_NAME).exists() else {}
    vae = pipe.vae.to(device).requires_grad_(False).eval()
    unet = pipe.unet.to(device).requires_grad_(True).train()
    text_encoder = pipe.text_encoder.to(device).requires_grad_(True).train()
    return Resumed(vae, text_encoder, pipe.tokenizer, unet, pipe.scheduler, config, folder / "tokenizer", previous)

