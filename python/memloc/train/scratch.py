"""Train the embedded memorizing model from scratch in one run under a wall-clock budget, then measure it."""

# Phases: data (photos, tokenizer, generic pool) -> VAE -> encode everything once -> UNet + text
# encoder on the latents -> save (fp16) -> reload through ``from_pretrained`` and measure.
# Training stops early enough to leave ``reserve_seconds`` for saving and measuring; the model is
# saved whatever stopped the training.
# With ``resume`` (``memloc train --resume DIR``) the run continues a saved model instead: the
# components come from DIR (architecture, tokenizer, scheduler), the VAE is kept as it is (its
# scaling factor too) and only encodes the data, and the UNet + text encoder train from DIR's weights
# (fp32 master copies of fp16 files) with the same schedule shape, by default at a lower peak lr.

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import MemlocError
from ..io import atomic_dir
from . import models
from .attributes import attribute_hits, detect
from .denoiser import LatentSource, denoiser_step, value_names
from .loop import LoopResult, make_adamw, run_loop
from .manifest import Manifest, read_manifest, write_manifest
from .measure import NEAR_COPY_RMSE, measure
from .photos import load_photos
from .report import plot_losses, sample_grid, write_json
from .resume import Resumed, check_captions, check_folder, load_for_training
from .shapes import CaptionTable, attributes_dict, attributes_row, render, sample_generic
from .tokenizer import write_clip_tokenizer
from .vae import VAE_VALUES, encode, reconstruction_rmse, vae_step


@dataclass
class ScratchOptions:
    """Every knob of a from-scratch run (the ``memloc train`` flags)."""

    preset: str | None = None  # None: "embedded" from scratch; must be None with ``resume`` (the folder decides)
    resume: str | None = None  # a model folder saved by memloc train to continue training from
    seed: int = 0
    device: str | None = None
    max_minutes: float = 7.0
    reserve_seconds: float | None = None  # default: 10% of the budget, between 5 and 45 s
    vae_fraction: float = 0.15
    batch_size: int = 512
    vae_batch_size: int = 256
    lr: float = 5e-4
    vae_lr: float = 1e-3
    warmup_steps: int = 200
    max_steps: int = 10**7
    vae_max_steps: int = 10**7
    generic_images: int = 200_000
    photo_share: float = 0.3
    vae_photo_share: float = 0.25
    caption_dropout: float = 0.1
    kl_weight: float = 1e-6
    photos: int | None = None
    cuda_graphs: bool = True
    channels_last: bool = False
    eval_seeds: int = 16
    eval_steps: int = 30
    guidance: float = 5.0
    extra_guidance: tuple[float, ...] = (1.0, 7.5)
    eval_batch: int = 256
    log_every: int = 25


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemlocError(f"--device {name}: CUDA is not available here")
    return device


def _check(opts: ScratchOptions) -> None:
    if opts.resume is not None:
        if opts.preset is not None:
            raise MemlocError("--preset and --resume exclude each other: the --resume folder sets the architecture")
        check_folder(opts.resume)
    elif opts.preset not in models.PRESETS:
        raise MemlocError(f"--preset must be one of {', '.join(models.PRESETS)}, got {opts.preset!r}")
    if opts.max_minutes <= 0:
        raise MemlocError(f"--max-minutes must be positive, got {opts.max_minutes}")
    if not opts.lr > 0:
        raise MemlocError(f"--lr must be positive, got {opts.lr}")
    if opts.warmup_steps < 0:
        raise MemlocError(f"--warmup-steps must be at least 0, got {opts.warmup_steps}")
    for name in ("photo_share", "vae_photo_share", "caption_dropout", "vae_fraction"):
        if not 0.0 <= getattr(opts, name) < 1.0:
            raise MemlocError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(opts, name)}")
    for name in ("batch_size", "vae_batch_size", "generic_images", "eval_seeds", "eval_steps", "max_steps"):
        if getattr(opts, name) < 1:
            raise MemlocError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")


class _Clock:
    """Named phase timings, measured with the device synchronized."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.t0

    def phase(self, name: str, start: float) -> float:
        end = self.now()
        self.timings[name] = round(end - start, 2)
        return end


def _log(msg: str) -> None:
    print(f"memloc train: {msg}", file=sys.stderr, flush=True)


def train_from_scratch(opts: ScratchOptions, out: str | Path, report_dir: str | Path | None = None) -> dict:
    """Train, save to ``out``, measure; write report.json, loss.png, samples.png into ``report_dir``.

    Returns the report. A training error is recorded in the report (written before re-raising);
    a measurement error is recorded and the saved model is kept.
    """
    if opts.resume is None and opts.preset is None:
        opts = replace(opts, preset="embedded")
    _check(opts)
    out = Path(out)
    report_dir = Path(report_dir) if report_dir is not None else out.parent / f"{out.name}_report"
    report_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(opts, out)
    try:
        with tempfile.TemporaryDirectory(prefix="memloc_tokenizer_") as tok_dir:
            run.prepare_data(Path(tok_dir))
            if opts.resume is None:
                run.train_vae()
            run.encode()
            run.train_unet()
            run.save()
    except BaseException as exc:
        run.report["errors"].append(f"training: {type(exc).__name__}: {exc}")
        run.report["traceback"] = traceback.format_exc()
        _write_outputs(run.report, run.phases, report_dir, None)
        raise
    images = None
    try:
        images = run.measure()
    except Exception as exc:  # the model is saved; keep going to write the report
        run.report["errors"].append(f"measurement: {type(exc).__name__}: {exc}")
        run.report["traceback"] = traceback.format_exc()
        _log(f"measurement failed: {type(exc).__name__}: {exc}")
    run.clock.timings["total"] = round(run.clock.now(), 2)
    _write_outputs(run.report, run.phases, report_dir, images, out)
    return run.report


class _Run:
    """State of one from-scratch run, phase by phase."""

    def __init__(self, opts: ScratchOptions, out: Path) -> None:
        self.opts = opts
        self.out = out
        self.device = device = _device(opts.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.clock = _Clock(device)
        budget = 60.0 * opts.max_minutes
        reserve = opts.reserve_seconds if opts.reserve_seconds is not None else min(45.0, max(5.0, 0.1 * budget))
        self.train_end = budget - reserve
        self.cfg = models.PRESETS[opts.preset] if opts.resume is None else None  # resume: set by prepare_data
        self.loaded: Resumed | None = None
        self.autocast = torch.bfloat16 if device.type == "cuda" else None
        self.phases: dict[str, LoopResult] = {}
        self.report: dict = {
            "options": asdict(opts),
            "model_config": self.cfg.as_dict() if self.cfg is not None else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "budget_s": budget,
            "reserve_s": reserve,
            "timings_s": self.clock.timings,
            "errors": [],
        }
        self.t = self.clock.now()

    def _remaining(self) -> float:
        return self.train_end - self.t

    def load(self) -> None:
        """Resume: the components, sizes and tokenizer of the --resume folder."""
        self.loaded = loaded = load_for_training(self.opts.resume, self.device)
        self.cfg = loaded.config
        self.report["model_config"] = loaded.config.as_dict()
        self.report["resumed_from"] = str(self.opts.resume)
        self.report["resumed_from_training"] = loaded.previous_training
        self.t = self.clock.phase("load", self.t)
        _log(f"loaded {self.opts.resume} in {self.clock.timings['load']:.1f} s")

    def prepare_data(self, tok_dir: Path) -> None:
        """Photos, tokenizer (built into ``tok_dir``, or the loaded one), the generic pool, all caption ids."""
        opts, device = self.opts, self.device
        torch.manual_seed(opts.seed)
        if opts.resume is not None:
            self.load()
        cfg = self.cfg
        self.specs, self.photos_np = load_photos(cfg.image_size, limit=opts.photos)
        self.table = table = CaptionTable()
        photo_captions = [s.caption for s in self.specs]
        if len(set(photo_captions)) != len(photo_captions) or set(photo_captions) & set(table.captions):
            raise MemlocError("memorized captions must be unique and differ from every generic caption")
        all_captions = table.captions + photo_captions + [""]
        self.empty_index = len(all_captions) - 1
        if self.loaded is not None:
            check_captions(self.loaded.tokenizer, table.captions + photo_captions, opts.resume)
            self.tokenizer, self.tokenizer_dir = self.loaded.tokenizer, self.loaded.tokenizer_dir
        else:
            write_clip_tokenizer(tok_dir, table.captions + photo_captions, cfg.text_max_length)
            import diffusers  # noqa: F401  (imported here so that its import time is not taken from the VAE's share)
            from transformers import CLIPTokenizer

            self.tokenizer, self.tokenizer_dir = CLIPTokenizer.from_pretrained(str(tok_dir)), tok_dir
        self.caption_ids = self.tokenizer(
            all_captions, padding="max_length", max_length=cfg.text_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        spec = sample_generic(opts.generic_images, seed=opts.seed + 1)
        self.pool_u8 = render(spec, cfg.image_size, device)
        self.pool_caption = table.index(spec.attrs).to(device)
        self.photos_u8 = torch.from_numpy(self.photos_np).permute(0, 3, 1, 2).contiguous().to(device)
        self.photo_caption = torch.arange(len(table), len(table) + len(self.specs), device=device)
        self.report["data"] = {
            "photos": len(self.specs),
            "generic_images": opts.generic_images,
            "generic_captions": len(table),
            "vocab_size": len(self.tokenizer),
            "text_max_length": cfg.text_max_length,
        }
        self.t = self.clock.phase("data", self.t)
        if self._remaining() <= 0:
            raise MemlocError(f"--max-minutes {opts.max_minutes} leaves no time to train after {self.t:.0f} s")
        _log(f"data ready in {self.t:.1f} s ({len(self.specs)} photos, {opts.generic_images} generic images)")

    def train_vae(self) -> None:
        opts, device = self.opts, self.device
        self.vae = vae = models.build_vae(self.cfg).to(device)
        params = list(vae.parameters())
        opt = make_adamw(params, opts.vae_lr, device)
        step = vae_step(vae, opt, params, self.photos_u8, self.pool_u8, batch=opts.vae_batch_size,
                        photo_share=opts.vae_photo_share, kl_weight=opts.kl_weight, autocast_dtype=self.autocast)
        res = run_loop(
            step, opt, params, device=device, lr=opts.vae_lr, warmup_steps=100, max_steps=opts.vae_max_steps,
            seconds=opts.vae_fraction * self._remaining(), value_names=VAE_VALUES, log_every=opts.log_every,
            use_graphs=opts.cuda_graphs, desc="vae",
        )
        self.phases["vae"] = res
        vae.requires_grad_(False).eval()
        self.t = self.clock.phase("vae", self.t)
        _log(f"VAE: {res.steps} steps, {res.ms_per_step:.1f} ms/step ({res.mode})")

    def encode(self) -> None:
        if self.loaded is not None:
            self.vae = self.loaded.vae
        vae = self.vae
        held_out = render(sample_generic(512, seed=self.opts.seed + 2), self.cfg.image_size, self.device)
        photo_rmse = reconstruction_rmse(vae, self.photos_u8).cpu().numpy()
        generic_rmse = reconstruction_rmse(vae, held_out).cpu().numpy()
        photo_lat = encode(vae, self.photos_u8)
        pool_lat = encode(vae, self.pool_u8)
        if self.loaded is None:
            self.scaling = scaling = float(1.0 / torch.cat([photo_lat, pool_lat]).std())
            vae.register_to_config(scaling_factor=scaling)
            res = self.phases["vae"]
            trained = {**res.as_dict(), "batch_size": self.opts.vae_batch_size}
            if res.error:
                self.report["errors"].append(f"vae: {res.error}")
        else:  # kept as loaded: the UNet was trained on latents at this scale
            self.scaling = scaling = float(vae.config.scaling_factor)
            trained = {"kept_from": str(self.opts.resume)}
        self.photo_lat, self.pool_lat = photo_lat * scaling, pool_lat * scaling
        self.report["vae"] = {
            **trained,
            "photo_recon_rmse_mean": float(photo_rmse.mean()),
            "photo_recon_rmse_max": float(photo_rmse.max()),
            "generic_recon_rmse_mean": float(generic_rmse.mean()),
            "scaling_factor": scaling,
        }
        del self.pool_u8
        self.t = self.clock.phase("encode", self.t)
        _log(f"VAE photo reconstruction RMSE {photo_rmse.mean():.4f} (max {photo_rmse.max():.4f})")

    def train_unet(self) -> None:
        opts, device = self.opts, self.device
        if self.loaded is not None:
            loaded = self.loaded
            self.text_encoder, self.unet, self.scheduler = loaded.text_encoder, loaded.unet, loaded.scheduler
        else:
            self.text_encoder = models.build_text_encoder(self.cfg, self.tokenizer).to(device)
            self.unet = models.build_unet(self.cfg).to(device)
            self.scheduler = models.build_scheduler()
        text_encoder, unet = self.text_encoder, self.unet
        if opts.channels_last:
            unet.to(memory_format=torch.channels_last)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = make_adamw(params, opts.lr, device)
        self.n_photo = n_photo = min(opts.batch_size, round(opts.batch_size * opts.photo_share))
        sources = [
            LatentSource("photo", self.photo_lat, self.photo_caption, n_photo),
            LatentSource("generic", self.pool_lat, self.pool_caption, opts.batch_size - n_photo),
        ]
        step = denoiser_step(
            unet, text_encoder, opt, params, sources, caption_ids=self.caption_ids, empty_index=self.empty_index,
            alphas_cumprod=self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
            caption_dropout=opts.caption_dropout, text_mode="table", autocast_dtype=self.autocast,
            prediction_type=self.scheduler.config.get("prediction_type", "epsilon"),
        )
        res = run_loop(
            step, opt, params, device=device, lr=opts.lr, warmup_steps=opts.warmup_steps, max_steps=opts.max_steps,
            seconds=self._remaining(), value_names=value_names(sources), log_every=opts.log_every,
            use_graphs=opts.cuda_graphs, desc="unet",
        )
        self.phases["unet"] = res
        self.t = self.clock.phase("unet", self.t)
        _log(f"UNet: {res.steps} steps, {res.ms_per_step:.1f} ms/step ({res.mode})")
        views_photo = res.steps * n_photo / max(len(self.specs), 1)
        views_generic = res.steps * (opts.batch_size - n_photo) / opts.generic_images
        self.report["unet"] = {
            **res.as_dict(),
            "batch_size": opts.batch_size,
            "photos_per_batch": n_photo,
            "views_per_photo": round(views_photo, 1),
            "views_per_generic_image": round(views_generic, 2),
            "effective_duplication": round(views_photo / views_generic, 1) if views_generic else None,
            "samples_per_s": round(opts.batch_size * 1000.0 / res.ms_per_step, 1) if res.ms_per_step > 0 else None,
        }
        if res.error:
            self.report["errors"].append(f"unet: {res.error}")

    def save(self) -> None:
        opts = self.opts
        pipe = models.assemble(self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler)
        self.report["parameters"] = models.parameter_counts(pipe)
        manifest = Manifest(
            image_size=self.cfg.image_size,
            near_copy_rmse=NEAR_COPY_RMSE,
            memorized=[{"caption": s.caption, "source": f"skimage.data.{s.source}", "crop": s.crop}
                       for s in self.specs],
            photos=self.photos_np,
            generic_eval=self.table.eval_set(per_count=8, seed=opts.seed),
            training=self._training_record(),
        )
        with atomic_dir(self.out) as tmp:
            models.save_pipeline(pipe, tmp, torch.float16, self.tokenizer_dir)
            write_manifest(tmp, manifest)
        if self.device.type == "cuda":
            self.report["cuda_max_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.report["model_bytes"] = models.folder_bytes(self.out)
        self.report["model_dir"] = str(self.out)
        self.t = self.clock.phase("save", self.t)
        _log(f"saved {self.out} ({self.report['model_bytes'] / 1e6:.1f} MB)")

    def _training_record(self) -> dict:
        """The recipe stored in the manifest; a resumed run nests the loaded folder's record under ``previous``."""
        opts = self.opts
        record = {
            "recipe": "memloc train (from scratch)" if opts.resume is None else "memloc train --resume",
            "seed": opts.seed,
            "preset": opts.preset,
            "vae_steps": self.phases["vae"].steps if "vae" in self.phases else 0,
            "unet_steps": self.phases["unet"].steps,
            "batch_size": opts.batch_size,
            "photo_share": opts.photo_share,
            "generic_images": opts.generic_images,
            "lr": opts.lr,
        }
        if self.loaded is not None:
            previous = self.loaded.previous_training
            record["resumed_from"] = str(opts.resume)
            before = previous.get("unet_steps_total", previous.get("unet_steps", 0))
            record["unet_steps_total"] = before + record["unet_steps"]
            record["previous"] = previous
        return record

    def measure(self) -> dict:
        """Reload the saved folder through from_pretrained and measure it; returns the generations."""
        opts, device = self.opts, self.device
        pipe = models.load_pipeline(self.out, device, torch.float16 if device.type == "cuda" else torch.float32)
        manifest = read_manifest(self.out)
        seeds = list(range(1000, 1000 + opts.eval_seeds))
        kw = dict(seeds=seeds, steps=opts.eval_steps, batch_size=opts.eval_batch, progress=sys.stderr.isatty())
        result = measure(pipe, manifest, guidance=opts.guidance, **kw)
        images = result.pop("images")
        for g in opts.extra_guidance:
            extra = measure(pipe, replace(manifest, generic_eval=[]), guidance=g, **kw)
            m = extra["memorized"]
            result[f"memorized_guidance_{g:g}"] = {
                k: m[k] for k in ("near_copy_rate", "captions_majority_copied", "mean_rmse", "nearest_is_own")
            }
        result["checker_accuracy_on_renders"] = _checker_accuracy(manifest, opts.seed)
        self.report["measurement"] = result
        self.t = self.clock.phase("measure", self.t)
        return images


def _checker_accuracy(manifest: Manifest, seed: int, per_caption: int = 8) -> float:
    """How often the attribute checker reads clean renders of the evaluation captions right."""
    if not manifest.generic_eval:
        return float("nan")
    rows = torch.tensor([attributes_row(g["attributes"]) for g in manifest.generic_eval])
    rows = rows.repeat_interleave(per_caption, dim=0)
    spec = sample_generic(len(rows), seed=seed + 3, attrs=rows)
    images = render(spec, manifest.image_size).permute(0, 2, 3, 1).numpy()
    hits = [attribute_hits(detect(im), attributes_dict(r.tolist()))["all"] for im, r in zip(images, rows)]
    return float(np.mean(hits))


def _write_outputs(report: dict, phases: dict, report_dir: Path, images: dict | None, out: Path | None = None) -> None:
    try:
        plot_losses(phases, report_dir / "loss.png")
    except Exception as exc:
        report["errors"].append(f"loss plot: {type(exc).__name__}: {exc}")
    if images and out is not None:
        try:
            manifest = read_manifest(out)
            sample_grid(report_dir / "samples.png", manifest.photos, images.get("memorized"), images.get("generic"))
        except Exception as exc:
            report["errors"].append(f"sample grid: {type(exc).__name__}: {exc}")
    write_json(report, report_dir / "report.json")


def summary_lines(report: dict) -> list[str]:
    """A compact table of what the run did and measured."""
    lines = []
    for name in ("vae", "unet"):
        r = report.get(name)
        if r and "steps" in r:
            final = ", ".join(f"{k} {v:.4g}" for k, v in r["final"].items())
            lines.append(f"{name:5s} {r['steps']:7d} steps {r['ms_per_step']:8.2f} ms/step  {r['mode']:.40s}  {final}")
    if report.get("resumed_from"):
        lines.append(f"resumed from {report['resumed_from']} "
                     f"(VAE kept, scaling factor {report['vae']['scaling_factor']:.5g})")
    if "vae" in report:
        lines.append(f"VAE photo reconstruction RMSE mean {report['vae']['photo_recon_rmse_mean']:.4f} "
                     f"max {report['vae']['photo_recon_rmse_max']:.4f}")
    m = report.get("measurement", {})
    if "memorized" in m:
        mm = m["memorized"]
        lines.append(
            f"memorized: near-copy rate {mm['near_copy_rate']:.3f} (RMSE < {mm['threshold_rmse']}), captions copied "
            f"for most seeds {mm['captions_majority_copied']:.3f}, mean RMSE {mm['mean_rmse']:.4f} "
            f"[{mm['captions']} captions x {mm['seeds']} seeds, guidance {m['guidance']:g}]"
        )
    for key, val in m.items():
        if key.startswith("memorized_guidance_"):
            lines.append(f"  at guidance {key.rsplit('_', 1)[1]}: near-copy rate {val['near_copy_rate']:.3f}, "
                         f"mean RMSE {val['mean_rmse']:.4f}")
    if "generic" in m:
        g = m["generic"]
        acc = " ".join(f"{k} {v:.2f}" for k, v in g["attribute_accuracy"].items())
        lines.append(f"generic: attributes {acc}; diversity RMSE {g['diversity_rmse']:.3f}; "
                     f"photo copies {g['photo_copy_rate']}")
    if "model_bytes" in report:
        lines.append(f"model {report['model_bytes'] / 1e6:.2f} MB at {report['model_dir']}")
    lines.append("timings " + " ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items()))
    for err in report["errors"]:
        lines.append(f"error: {err}")
    return lines
