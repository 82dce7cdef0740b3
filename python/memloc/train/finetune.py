"""Fine-tune an existing pipeline on an image folder with chosen images duplicated (the paper's Section 5.4 recipe)."""

# The paper fine-tunes Stable Diffusion on Imagenette with 100 images duplicated 50 times, so that
# those images become memorized. Here: every image of the folder once, the chosen ones ``duplicate``
# times, drawn uniformly; the VAE (and by default the text encoder) frozen; latents and caption
# embeddings computed once. Captions come from ``metadata.jsonl`` (``file_name``, ``text``), else
# from a ``.txt`` file beside each image, else from the file name.

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import MemlocError
from ..io import atomic_dir
from . import models
from .denoiser import LatentSource, denoiser_step, value_names
from .loop import make_adamw, run_loop
from .manifest import Manifest, read_manifest, write_manifest
from .measure import NEAR_COPY_RMSE, generate, memorized_stats
from .report import plot_losses, sample_grid, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class FinetuneOptions:
    """Every knob of a fine-tuning run (the ``memloc train --finetune`` flags)."""

    model: str
    images: str
    duplicate: int = 50
    duplicate_images: int = 100
    duplicate_list: str | None = None
    seed: int = 0
    device: str | None = None
    max_minutes: float = 30.0
    max_steps: int = 10**7
    batch_size: int = 16
    lr: float = 1e-5
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    train_text_encoder: bool = False
    resolution: int | None = None
    cuda_graphs: bool = True
    eval_seeds: int = 10
    eval_captions: int = 20
    eval_steps: int = 30
    guidance: float = 7.5
    eval_batch: int = 16
    measure_size: int = 64
    log_every: int = 25


def read_image_folder(folder: str | Path) -> tuple[list[Path], list[str]]:
    """Image files (sorted by name) and their captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MemlocError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MemlocError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} files")
    meta = {}
    if (folder / "metadata.jsonl").exists():
        for n, line in enumerate((folder / "metadata.jsonl").read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    meta[row["file_name"]] = row["text"]
                except (json.JSONDecodeError, KeyError):
                    raise MemlocError(f"{folder / 'metadata.jsonl'} line {n}: expected file_name and text") from None
    captions = []
    for f in files:
        if f.name in meta:
            captions.append(str(meta[f.name]))
        elif f.with_suffix(".txt").exists():
            captions.append(f.with_suffix(".txt").read_text().strip())
        else:
            captions.append(f.stem.replace("_", " ").replace("-", " "))
    return files, captions


def load_square(path: Path, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop: uint8 [size, size, 3]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))


def choose_duplicated(files: list[Path], opts: FinetuneOptions) -> list[int]:
    if opts.duplicate_list:
        names = [n.strip() for n in Path(opts.duplicate_list).read_text().splitlines() if n.strip()]
        index = {f.name: i for i, f in enumerate(files)}
        missing = [n for n in names if n not in index]
        if missing:
            raise MemlocError(f"--duplicate-list names {len(missing)} files not in --images, e.g. {missing[0]!r}")
        return sorted({index[n] for n in names})
    if opts.duplicate_images > len(files):
        raise MemlocError(f"--duplicate-images {opts.duplicate_images} exceeds the {len(files)} images in --images")
    gen = torch.Generator().manual_seed(opts.seed)
    return sorted(torch.randperm(len(files), generator=gen)[: opts.duplicate_images].tolist())


def _resize_u8(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])


def finetune(opts: FinetuneOptions, out: str | Path, report_dir: str | Path | None = None) -> dict:
    """Fine-tune ``opts.model`` on ``opts.images``; save to ``out``; measure; write the report."""
    if opts.duplicate < 1:
        raise MemlocError(f"--duplicate must be at least 1, got {opts.duplicate}")
    out = Path(out)
    report_dir = Path(report_dir) if report_dir is not None else out.parent / f"{out.name}_report"
    report_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    report: dict = {"options": asdict(opts), "timings_s": {}, "errors": []}
    phases = {}
    try:
        files, captions = read_image_folder(opts.images)
        dup = choose_duplicated(files, opts)
        model_dir = Path(opts.model)
        if not (model_dir / "model_index.json").exists():
            raise MemlocError(f"--model {model_dir}: no model_index.json (expected a local diffusers pipeline folder)")
        pipe = models.load_pipeline(model_dir, device, torch.float32)
        res = opts.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        autocast = torch.bfloat16 if device.type == "cuda" else None

        # Encode every image once (posterior mean and std, scaled like the pipeline expects).
        means, stds, small = [], [], []
        scale = pipe.vae.config.scaling_factor
        with torch.no_grad():
            for start in range(0, len(files), 32):
                batch = np.stack([load_square(f, res) for f in files[start : start + 32]])
                small.append(_resize_u8(batch, opts.measure_size))
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1.0
                post = pipe.vae.encode(x).latent_dist
                means.append(post.mean * scale)
                stds.append(post.std * scale)
        small = np.concatenate(small)
        unique = sorted(set(captions))
        cap_index = torch.tensor([unique.index(c) for c in captions], device=device)
        all_caps = unique + [""]
        tok = pipe.tokenizer
        ids = tok(all_caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        context_table = None
        if not opts.train_text_encoder:
            with torch.no_grad():
                context_table = torch.cat([pipe.text_encoder(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])
        dup_set = set(dup)
        rows = [i for i in range(len(files)) for _ in range(opts.duplicate if i in dup_set else 1)]
        source = LatentSource("data", torch.cat(means), cap_index, opts.batch_size, std=torch.cat(stds),
                              rows=torch.tensor(rows, device=device))
        report["data"] = {"images": len(files), "duplicated": len(dup), "duplicate": opts.duplicate,
                          "dataset_rows": len(rows), "resolution": res}
        report["timings_s"]["data"] = round(time.perf_counter() - t0, 2)

        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(opts.train_text_encoder)
        params = list(pipe.unet.parameters()) + (list(pipe.text_encoder.parameters()) if opts.train_text_encoder
                                                 else [])
        opt = make_adamw(params, opts.lr, device)
        step = denoiser_step(
            pipe.unet, pipe.text_encoder, opt, params, [source], caption_ids=ids, empty_index=len(all_caps) - 1,
            alphas_cumprod=pipe.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
            caption_dropout=opts.caption_dropout, text_mode="batch" if opts.train_text_encoder else "frozen",
            context_table=context_table, prediction_type=pipe.scheduler.config.prediction_type,
            autocast_dtype=autocast,
        )
        seconds = 60.0 * opts.max_minutes - (time.perf_counter() - t0)
        phases["unet"] = result = run_loop(
            step, opt, params, device=device, lr=opts.lr, warmup_steps=opts.warmup_steps, max_steps=opts.max_steps,
            seconds=seconds, value_names=value_names([source]), log_every=opts.log_every,
            use_graphs=opts.cuda_graphs, desc="finetune",
        )
        del opt, step
        report["unet"] = {**result.as_dict(), "batch_size": opts.batch_size,
                          "views_per_duplicated_image": round(result.steps * opts.batch_size * opts.duplicate
                                                              / len(rows), 1)}
        manifest = Manifest(
            image_size=opts.measure_size,
            near_copy_rmse=NEAR_COPY_RMSE,
            memorized=[{"caption": captions[i], "file": files[i].name} for i in dup],
            photos=small[dup],
            training={"recipe": "memloc train --finetune", "base_model": str(model_dir), "seed": opts.seed,
                      "duplicate": opts.duplicate, "steps": result.steps, "lr": opts.lr},
        )
        tokenizer_dir = model_dir / "tokenizer"
        with atomic_dir(out) as tmp:
            models.save_pipeline(pipe, tmp, torch.float16, tokenizer_dir if tokenizer_dir.is_dir() else None)
            write_manifest(tmp, manifest)
        report["model_dir"] = str(out)
        report["timings_s"]["train_and_save"] = round(time.perf_counter() - t0, 2)
    except BaseException as exc:
        report["errors"].append(f"training: {type(exc).__name__}: {exc}")
        report["traceback"] = traceback.format_exc()
        write_json(report, report_dir / "report.json")
        raise
    images = None
    try:
        images = _measure(opts, device, out, report, files, captions, small, dup)
    except Exception as exc:
        report["errors"].append(f"measurement: {type(exc).__name__}: {exc}")
        report["traceback"] = traceback.format_exc()
    report["timings_s"]["total"] = round(time.perf_counter() - t0, 2)
    try:
        plot_losses(phases, report_dir / "loss.png")
        if images is not None:
            sample_grid(report_dir / "samples.png", small[dup], images, None)
    except Exception as exc:
        report["errors"].append(f"plots: {type(exc).__name__}: {exc}")
    write_json(report, report_dir / "report.json")
    return report


def _measure(opts, device, out, report, files, captions, small, dup) -> np.ndarray:
    """Near-copy rates of duplicated captions, and of as many non-duplicated captions as controls."""
    pipe = models.load_pipeline(out, device, torch.float16 if device.type == "cuda" else torch.float32)
    manifest = read_manifest(out)
    seeds = list(range(1000, 1000 + opts.eval_seeds))
    kw = dict(steps=opts.eval_steps, guidance=opts.guidance, batch_size=opts.eval_batch, progress=sys.stderr.isatty())
    n = min(opts.eval_captions, len(dup))
    gens = generate(pipe, manifest.captions[:n], seeds, **kw)
    result = {"seeds": seeds, "steps": opts.eval_steps, "guidance": opts.guidance,
              "duplicated": memorized_stats(gens, manifest.photos[:n], NEAR_COPY_RMSE)}
    dup_set = set(dup)
    controls = [i for i in range(len(files)) if i not in dup_set][:n]
    if controls:
        cgens = generate(pipe, [captions[i] for i in controls], seeds, **kw)
        result["not_duplicated"] = memorized_stats(cgens, small[controls], NEAR_COPY_RMSE)
    report["measurement"] = result
    return gens
