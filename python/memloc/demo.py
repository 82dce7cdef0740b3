"""The main job on a memorizing model: localize on half of its memorized captions, prune, judge on the other half."""

# What ``run_demo`` does, in order (docs/DEMO.md explains the choices):
# 1. load the model through ``load_pipeline`` (the embedded model by default: the same
#    ``from_pretrained`` path as any checkpoint) and read its ``memorization.json``;
# 2. split the memorized captions by source photograph into a localization half and a held-out
#    half (seeded, ``SPLIT_SEED``), so that no crop of a held-out photo helps to localize it;
# 3. collect statistics on the localization half (conditional vs unconditional CFG branch, the
#    driver's default null), localize at (sparsity, tau), and draw density/IoU plots of subsets of
#    the localization half with the driver's ``analyze``;
# 4. generate with the same seeds from the original model, the pruned model and (control) the model
#    with as many random FFN weights pruned in each layer; measure near copies of the training
#    photos on the held-out and the localization half, attribute accuracy and diversity on the
#    generic captions, and Carlini et al.'s extraction attack on the held-out generations;
# 5. write table.md, demo.json, comparison and generic grids, and the plots, atomically under out.
# Nothing is chosen by looking at the held-out half.

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import memloc_kernels as mk

from .errors import MemlocError
from .io import atomic_dir

#: Seed of the split into localization and held-out captions.
SPLIT_SEED = 0
#: The statistics always follow this DDIM schedule (whatever ``steps`` the measurements sample with),
#: so that ``--quick`` localizes exactly as the full demo does.
LOCALIZATION_STEPS = 20
#: tau = 10: the union over the first 11 of the 20 steps (t = 951 down to 451), the driver's default.
#: On the localization half it removed more near copies per pruned weight than tau = 0 (the pilot's
#: choice); docs/DEMO.md has the comparison.
DEFAULT_TAU = 10
#: s: the smallest of SPARSITY_CANDIDATES whose pruning brought the near-copy rate on the
#: localization half (DEFAULT_SEEDS seeds) to at most REMOVED_FRACTION of the original's: 1.000 ->
#: 0.115 at s = 0.07, where s = 0.05 left 0.344 (the embedded model after continued training,
#: measured once on the CPU on 2026-11-29, docs/DEMO.md; ``--sparsity auto`` reruns this rule).
#: The held-out half played no part.
DEFAULT_SPARSITY = 0.07
#: 0.03 and 0.07 were added before the sweep on the continued model ran, without any of its results.
SPARSITY_CANDIDATES = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)
#: DDIM steps for the measurements: 20 reproduce the photos as often as the training report's 30
#: at two thirds of the CPU time; guidance 5 is the scale the model's memorization was measured at.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
#: Seeds per memorized caption (both halves, so that their rates compare: the seed alone decides much
#: of whether a generation is an exact copy, alike for all captions); the attack uses the held-out
#: generations as its samples per prompt.
DEFAULT_SEEDS = 12
#: Seeds per generic caption (attribute accuracy and diversity need fewer).
DEFAULT_GENERIC_SEEDS = 4
#: Statistics are collected for at least the first ANALYSIS_TAU + 1 steps (a few UNet calls) so
#: that the density/IoU plots show how the masks change over timesteps; localization uses tau.
ANALYSIS_TAU = 10
ANALYSIS_SUBSETS = 8
#: Each analysis subset holds this fraction of the localization half.
ANALYSIS_SUBSET_FRACTION = 0.5
#: Generations compared side by side per held-out caption in the grid.
GRID_SEEDS = 4
BATCH_SIZE = 64
FIRST_SEED = 0
#: The verdict: memorization is removed when the held-out near-copy rate and the number of held-out
#: prompts the attack finds actually memorized both fall to at most this fraction of their value
#: before pruning.
REMOVED_FRACTION = 0.25
#: Generic all-attribute accuracy may drop by at most this much (absolute) for quality to count as kept.
QUALITY_MARGIN = 0.15
QUICK = {"steps": 10, "seeds": 6, "generic_seeds": 2}


def log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def split_captions(memorized: Sequence[dict], seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Localization and held-out caption indices: whole source photos to each half, balanced.

    Captions of one source photo (e.g. ``skimage.data.astronaut`` and its crops) stay together, so
    that no crop of a held-out photo helps to localize it. Sources are shuffled with ``seed``, then
    taken largest first (stable), each to the half with fewer captions so far (ties: localization).
    """
    groups: dict[str, list[int]] = {}
    for i, entry in enumerate(memorized):
        groups.setdefault(str(entry.get("source") or entry["caption"]), []).append(i)
    names = sorted(groups)
    shuffled = [names[g] for g in np.random.default_rng(seed).permutation(len(names))]
    localization: list[int] = []
    held_out: list[int] = []
    for name in sorted(shuffled, key=lambda n: -len(groups[n])):
        target = localization if len(localization) <= len(held_out) else held_out
        target.extend(groups[name])
    if not localization or not held_out:
        raise MemlocError(f"cannot split {len(memorized)} memorized captions into two halves")
    return sorted(localization), sorted(held_out)


def random_masks_like(counts: Sequence[int], shapes: Sequence[tuple[int, int]], seed: int) -> list[mk.PackedMask]:
    """Per layer, a packed mask with ``counts[l]`` weights chosen uniformly at random (the control)."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for count, (d_out, d_in) in zip(counts, shapes):
        flat = torch.zeros(d_out * d_in, dtype=torch.bool)
        flat[torch.randperm(d_out * d_in, generator=generator)[:count]] = True
        masks.append(mk.pack_mask(flat.view(d_out, d_in)))
    return masks


def memorization_reduced(before: dict, after: dict, *, min_rate_drop: float, min_rmse_rise: float) -> bool:
    """Whether ``after`` (memorized-caption stats) copies measurably less than ``before``.

    True when the near-copy rate fell by at least ``min_rate_drop`` or the mean distance to the
    training photo rose by at least ``min_rmse_rise``.
    """
    return (
        before["near_copy_rate"] - after["near_copy_rate"] >= min_rate_drop
        or after["mean_rmse"] - before["mean_rmse"] >= min_rmse_rise
    )


def verdict(results: dict) -> dict:
    """The demo's conclusion from its measurements, with a one-line message."""
    before, after = results["original"], results["pruned"]
    rate_before = before["held_out"]["near_copy_rate"]
    rate_after = after["held_out"]["near_copy_rate"]
    attack_before = before["attack"]["actually_memorized"]
    attack_after = after["attack"]["actually_memorized"]
    acc_before = before["generic"]["attribute_accuracy"]["all"]
    acc_after = after["generic"]["attribute_accuracy"]["all"]
    quality_kept = acc_before - acc_after <= QUALITY_MARGIN
    if rate_before == 0 and attack_before == 0:
        removed = None
        message = (
            "nothing to judge: the original model made no near copies on the held-out captions and the attack "
            "found none memorized"
        )
    else:
        removed = rate_after <= REMOVED_FRACTION * rate_before and attack_after <= REMOVED_FRACTION * attack_before
        numbers = (
            f"near-copy rate {rate_before:.3f} -> {rate_after:.3f}, attack: actually memorized "
            f"{attack_before} -> {attack_after} of {before['attack']['prompts']} prompts"
        )
        if removed:
            message = f"pruning removed memorization on held-out captions: {numbers}"
        else:
            message = f"pruning did NOT remove memorization on held-out captions: {numbers}"
    quality = (
        f"generic all-attribute accuracy {acc_before:.3f} -> {acc_after:.3f} "
        f"({'within' if quality_kept else 'NOT within'} {QUALITY_MARGIN} of the original)"
    )
    return {
        "removed": removed,
        "quality_kept": quality_kept,
        "removed_fraction": REMOVED_FRACTION,
        "quality_margin": QUALITY_MARGIN,
        "message": message,
        "quality": quality,
    }


class _Generator:
    """Generations for (captions, seeds) sets, batched, advancing one progress bar per model."""

    def __init__(self, pipe, steps: int, guidance: float, batch_size: int) -> None:
        self.pipe, self.steps, self.guidance, self.batch_size = pipe, steps, guidance, batch_size

    def run(self, sets: dict[str, tuple[list[str], list[int]]], desc: str, progress: bool) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        from .train.measure import generate

        total = sum(len(c) * len(s) for c, s in sets.values())
        out = {}
        with tqdm(total=total, desc=desc, unit="img", disable=not progress or None) as bar:
            for name, (captions, seeds) in sets.items():
                per_call = max(1, self.batch_size // len(seeds))
                parts = []
                for start in range(0, len(captions), per_call):
                    chunk = captions[start : start + per_call]
                    parts.append(
                        generate(
                            self.pipe,
                            chunk,
                            seeds,
                            steps=self.steps,
                            guidance=self.guidance,
                            batch_size=self.batch_size,
                            progress=False,
                        )
                    )
                    bar.update(len(chunk) * len(seeds))
                out[name] = np.concatenate(parts)
        return out


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _nearest_photo_rmse(generations: np.ndarray, photos: np.ndarray) -> float:
    """Mean over generations [C, S, H, W, 3] of the RMSE to the closest memorized photo."""
    from .train.measure import as_float, resize_images, rmse

    size = photos.shape[1]
    flat = resize_images(generations.reshape(-1, *generations.shape[2:]), size)
    d = np.stack([rmse(flat, p) for p in as_float(photos)], axis=1)
    return float(d.min(axis=1).mean())


class _Measurer:
    """Everything measured on one model's generations."""

    def __init__(self, manifest, held_out, localization, generic, attack_config, training) -> None:
        self.manifest = manifest
        self.held_out, self.localization, self.generic = held_out, localization, generic
        self.attack_config, self.training = attack_config, training

    def memorized(self, generations: np.ndarray, indices: list[int]) -> dict:
        from .train.measure import diversity, memorized_stats, resize_images

        m = self.manifest
        stats = memorized_stats(generations, m.photos[indices], m.near_copy_rmse, m.photos, indices)
        for entry, i, gens in zip(stats["per_caption"], indices, generations):
            entry.update(index=i, caption=m.memorized[i]["caption"])
            entry["diversity_rmse"] = diversity(resize_images(gens, m.image_size))
        # low for a memorizing model: every seed gives (nearly) the same photo
        stats["diversity_rmse"] = float(np.mean([e["diversity_rmse"] for e in stats["per_caption"]]))
        return stats

    def generic_stats(self, generations: np.ndarray) -> dict:
        from .train.measure import generic_stats

        m = self.manifest
        entries = [m.generic_eval[i] for i in self.generic]
        stats = generic_stats(generations, [e["attributes"] for e in entries], m.photos, m.image_size)
        for entry, e in zip(stats["per_caption"], entries):
            entry["caption"] = e["caption"]
        stats["mean_rmse_to_nearest_photo"] = _nearest_photo_rmse(generations, m.photos)
        return stats

    def attack(self, generations: np.ndarray, label: str) -> dict:
        from .eval.attack import analyze_prompt

        c = self.attack_config
        rows = []
        for i, images in zip(self.held_out, generations):
            row = analyze_prompt(
                _to_uint8(images),
                threshold=c["threshold"],
                min_clique=c["min_clique"],
                grid=c["grid"],
                training=self.training,
            )
            rows.append({"model": label, "prompt_index": i, "prompt": self.manifest.memorized[i]["caption"], **row})
        return {
            "prompts": len(rows),
            "samples_per_prompt": int(generations.shape[1]),
            "identified": sum(bool(r["identified"]) for r in rows),
            "actually_memorized": sum(bool(r["actually_memorized"]) for r in rows),
            "per_prompt": rows,
        }

    def all(self, images: dict[str, np.ndarray], label: str) -> dict:
        result = {}
        if "held_out" in images:
            result["held_out"] = self.memorized(images["held_out"], self.held_out)
            result["attack"] = self.attack(images["held_out"], label)
        if "localization" in images:
            result["localization"] = self.memorized(images["localization"], self.localization)
        if "generic" in images:
            result["generic"] = self.generic_stats(images["generic"])
        return result


def choose_sparsity(
    pipe,
    mask_for,
    sets: dict,
    measurer: _Measurer,
    generator: _Generator,
    target: float,
    candidates: Sequence[float] = SPARSITY_CANDIDATES,
    backend: str = "auto",
    progress: bool = True,
) -> tuple[float, list[dict]]:
    """The smallest candidate s whose pruning leaves a near-copy rate <= ``target`` on the localization half.

    ``mask_for(s)`` returns a loaded mask file; only the localization half is generated. If no
    candidate reaches the target, the one with the lowest rate is chosen (the sweep is returned).
    """
    from .pipeline import denoiser_of
    from .prune import apply_masks

    sweep = []
    for s in candidates:
        pruning = apply_masks(denoiser_of(pipe), mask_for(s), None, backend, getattr(pipe, "memloc_source", None))
        try:
            images = generator.run({"localization": sets["localization"]}, f"auto s={s:g}", progress)
        finally:
            count, total = pruning.count, pruning.total
            pruning.undo()
        stats = measurer.memorized(images["localization"], measurer.localization)
        sweep.append(
            {
                "sparsity": s,
                "near_copy_rate": stats["near_copy_rate"],
                "mean_rmse": stats["mean_rmse"],
                "pruned_weights": count,
                "pruned_fraction": count / total,
            }
        )
        log(f"  s = {s:g}: localization-half near-copy rate {stats['near_copy_rate']:.3f}", progress)
        if stats["near_copy_rate"] <= target:
            return s, sweep
    best = min(sweep, key=lambda r: (r["near_copy_rate"], r["sparsity"]))
    return best["sparsity"], sweep


def run_demo(
    out: str | os.PathLike = "memloc-demo",
    *,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    seeds: int = DEFAULT_SEEDS,
    generic_seeds: int = DEFAULT_GENERIC_SEEDS,
    sparsity: float | str = DEFAULT_SPARSITY,
    timesteps: int = DEFAULT_TAU,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    split_seed: int = SPLIT_SEED,
    random_control: bool = True,
    analysis: bool = True,
    max_captions: int | None = None,
    max_generic: int | None = None,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """Run the demo and write its outputs under ``out``; returns every number (as written to demo.json).

    ``seeds``: generations per memorized caption (the attack's samples per held-out prompt);
    ``generic_seeds``: per generic caption; ``steps``: DDIM steps of these generations. ``sparsity``
    is s (or ``"auto"``: the rule that chose the default, rerun on the localization half);
    ``timesteps`` is tau, counted on the 20-step schedule of the statistics.
    ``max_captions`` measures only the first captions of each half, ``max_generic`` only that many
    evenly spaced generic captions (statistics always use the whole localization half);
    ``random_control`` adds the random-pruning control, ``analysis`` the density/IoU plots.
    """
    from .analyze import analyze
    from .collect import collect_statistics
    from .eval.loading import ImageFolder
    from .eval.tiled_l2 import DEFAULT_GRID, PAPER_THRESHOLD
    from .localize import check_sparsity, localize, read_mask_file
    from .pipeline import denoiser_of, load_pipeline, resolve_model
    from .prune import apply_masks
    from .train.manifest import read_manifest

    auto = sparsity == "auto"
    if not auto:
        sparsity = check_sparsity(sparsity)
    if seeds < 3:
        raise MemlocError(f"--seeds must be >= 3 (the attack looks for cliques of 3 generations), got {seeds}")
    if generic_seeds < 2:
        raise MemlocError(f"--generic-seeds must be >= 2 (diversity compares seeds), got {generic_seeds}")
    if steps < 1:
        raise MemlocError(f"--steps must be >= 1, got {steps}")
    if not 0 <= timesteps < LOCALIZATION_STEPS:
        raise MemlocError(
            f"--timesteps (tau) must be in 0..{LOCALIZATION_STEPS - 1} (steps of the {LOCALIZATION_STEPS}-step "
            f"schedule of the statistics), got {timesteps}"
        )
    if not math.isfinite(guidance):
        raise MemlocError(f"--guidance must be a finite number, got {guidance}")
    for name, value in (("max_captions", max_captions), ("max_generic", max_generic)):
        if value is not None and value < 1:
            raise MemlocError(f"{name} must be >= 1, got {value}")

    started = time.perf_counter()
    timings: dict[str, float] = {}
    model_path = Path(resolve_model(model))
    manifest = read_manifest(model_path)
    if not manifest.memorized or not manifest.generic_eval:
        raise MemlocError(f"{model_path}/memorization.json lists no memorized or no generic captions")
    localization, held_out = split_captions(manifest.memorized, split_seed)
    measured_loc = localization[:max_captions]
    measured_held = held_out[:max_captions]
    generic = list(range(len(manifest.generic_eval)))
    if max_generic is not None and max_generic < len(generic):
        # evenly spaced, so that a reduced run still has captions with one, two and three objects
        generic = sorted({int(round(x)) for x in np.linspace(0, len(generic) - 1, max_generic)})
    held_seeds = list(range(FIRST_SEED, FIRST_SEED + seeds))
    other_seeds = list(range(FIRST_SEED, FIRST_SEED + generic_seeds))
    captions = manifest.captions
    sets = {
        "held_out": ([captions[i] for i in measured_held], held_seeds),
        "localization": ([captions[i] for i in measured_loc], held_seeds),
        "generic": ([manifest.generic_eval[i]["caption"] for i in generic], other_seeds),
    }
    training = ImageFolder.from_arrays(
        list(manifest.photos), [f"{i}: {m.get('source', m['caption'])}" for i, m in enumerate(manifest.memorized)]
    )
    attack_config = {"threshold": PAPER_THRESHOLD, "min_clique": 3, "grid": DEFAULT_GRID, "samples": seeds}
    measurer = _Measurer(manifest, measured_held, measured_loc, generic, attack_config, training)
    stats_tau = max(timesteps, ANALYSIS_TAU) if analysis else timesteps

    with atomic_dir(out) as tmp:
        log(f"[1/7] loading {model_path}", progress)
        t0 = time.perf_counter()
        pipe = load_pipeline(model_path, device, dtype)
        denoiser = denoiser_of(pipe)
        source = getattr(pipe, "memloc_source", None)
        generator = _Generator(pipe, steps, guidance, batch_size)
        timings["load"] = time.perf_counter() - t0

        log(f"[2/7] statistics of the {len(localization)} localization captions (held out: {len(held_out)})", progress)
        t0 = time.perf_counter()
        stats_path = collect_statistics(
            [captions[i] for i in localization],
            tmp / "stats.safetensors",
            pipe=pipe,
            steps=LOCALIZATION_STEPS,
            timesteps=stats_tau,
            guidance_scale=guidance,
            seed=FIRST_SEED,
            backend=backend,
            progress=progress,
        )
        timings["collect"] = time.perf_counter() - t0

        results: dict[str, dict] = {}
        images: dict[str, dict[str, np.ndarray]] = {}
        log("[3/7] original model", progress)
        t0 = time.perf_counter()
        images["original"] = generator.run(sets, "original", progress)
        results["original"] = measurer.all(images["original"], "original")
        results["original"]["pruned_weights"] = 0
        timings["original"] = time.perf_counter() - t0

        masks_dir = tmp / "masks"

        def mask_for(s: float):
            path = masks_dir / f"mask_s{s:g}.safetensors"
            if not path.exists():
                masks_dir.mkdir(exist_ok=True)
                localize(
                    stats_path,
                    path,
                    sparsity=s,
                    timesteps=timesteps,
                    denoiser=denoiser,
                    backend=backend,
                    progress=False,
                )
            return read_mask_file(path, device=next(denoiser.parameters()).device)

        t0 = time.perf_counter()
        sweep = None
        if auto:
            target = REMOVED_FRACTION * results["original"]["localization"]["near_copy_rate"]
            log(
                f"[4/7] choosing s: the smallest that brings the localization half's near-copy rate to <= {target:.3f}",
                progress,
            )
            sparsity, sweep = choose_sparsity(
                pipe, mask_for, sets, measurer, generator, target, backend=backend, progress=progress
            )
            log(f"  chose s = {sparsity:g}", progress)
        else:
            log(f"[4/7] localizing at s = {sparsity:g}, tau = {timesteps}", progress)
        mask = mask_for(sparsity)
        os.replace(masks_dir / f"mask_s{sparsity:g}.safetensors", tmp / "mask.safetensors")
        for leftover in masks_dir.glob("*"):
            leftover.unlink()
        masks_dir.rmdir()
        analysis_info = None
        subset_size = min(len(localization), max(2, round(ANALYSIS_SUBSET_FRACTION * len(localization))))
        if analysis and len(localization) >= 3:
            # the paper's Fig. 1-2: do the masks of different subsets of memorized prompts agree?
            analyze(
                stats_path,
                tmp / "analysis",
                sparsity=sparsity,
                timesteps=stats_tau,
                n_subsets=ANALYSIS_SUBSETS,
                subset_size=subset_size,
                seed=split_seed,
                denoiser=denoiser,
                backend=backend,
                progress=progress,
            )
            analysis_info = {
                "subsets": ANALYSIS_SUBSETS,
                "subset_size": subset_size,
                "tau": stats_tau,
                "folder": "analysis",
            }
        timings["localize"] = time.perf_counter() - t0

        log("[5/7] pruned model", progress)
        t0 = time.perf_counter()
        pruning = apply_masks(denoiser, mask, None, backend, source)
        counts = [record.count for record in pruning.records]
        shapes = [(layer.d_out, layer.d_in) for layer in pruning.layers]
        total = pruning.total
        try:
            images["pruned"] = generator.run(sets, "pruned", progress)
        finally:
            pruning.undo()
        results["pruned"] = measurer.all(images["pruned"], "pruned")
        results["pruned"]["pruned_weights"] = sum(counts)
        timings["pruned"] = time.perf_counter() - t0

        if random_control:
            log("[6/7] control: as many random FFN-2 weights pruned in each layer", progress)
            t0 = time.perf_counter()
            weights = [layer.linear.weight.data for layer in pruning.layers]
            random_masks = random_masks_like(counts, shapes, seed=split_seed)
            with torch.no_grad():
                records = [mk.apply_mask(w, m.to(w.device), backend=backend) for w, m in zip(weights, random_masks)]
            try:
                control_sets = {k: v for k, v in sets.items() if k != "localization"}
                images["random"] = generator.run(control_sets, "random control", progress)
            finally:
                with torch.no_grad():
                    for w, r in zip(weights, records):
                        mk.restore(w, r, backend=backend)
            results["random"] = measurer.all(images["random"], "random")
            results["random"]["pruned_weights"] = sum(r.count for r in records)
            timings["random"] = time.perf_counter() - t0

        log("[7/7] writing tables, grids and plots", progress)
        conclusion = verdict(results)
        record = {
            "model": str(model_path),
            "device": str(denoiser.device),
            "dtype": str(denoiser.dtype).removeprefix("torch."),
            "config": {
                "split_seed": split_seed,
                "sparsity": sparsity,
                "sparsity_rule": "auto" if auto else "given",
                "tau": timesteps,
                "localization_steps": LOCALIZATION_STEPS,
                "statistics_tau": stats_tau,
                "null": "uncond",
                "steps": steps,
                "guidance": guidance,
                "scheduler": type(pipe.scheduler).__name__,
                "seeds": held_seeds,
                "generic_seeds": other_seeds,
                "near_copy_rmse": manifest.near_copy_rmse,
                "attack": attack_config,
                "backend": backend,
                "max_captions": max_captions,
                "max_generic": max_generic,
            },
            "split": {
                "localization": [{"index": i, "caption": captions[i]} for i in localization],
                "held_out": [{"index": i, "caption": captions[i]} for i in held_out],
                "measured_localization": measured_loc,
                "measured_held_out": measured_held,
            },
            "pruned_weights": sum(counts),
            "ffn_weights": total,
            "pruned_fraction": sum(counts) / total,
            "pruned_per_layer": [
                {"layer": layer.name, "pruned": c, "weights": layer.d_in * layer.d_out}
                for layer, c in zip(pruning.layers, counts)
            ],
            "sparsity_sweep": sweep,
            "analysis": analysis_info,
            "results": results,
            "verdict": conclusion,
        }
        table = summary_table(record)
        _write_outputs(tmp, record, table, images, manifest, measured_held, generic)
        timings["total"] = time.perf_counter() - started
        record["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
        _write_json(tmp / "demo.json", record)
    record["table"] = table
    record["out"] = str(out)
    return record


def _write_json(path: Path, record: dict) -> None:
    from .eval.report import write_json

    write_json(path, record)


def _fraction(count: int, total: int) -> str:
    return f"{count}/{total}"


def summary_table(record: dict) -> str:
    """The before/after table (Markdown) and the paper's Table 1 layout for the attack."""
    from .eval.report import TABLE1_COLUMNS, TABLE1_HEADERS, markdown_table

    results = record["results"]
    models = [m for m in ("original", "pruned", "random") if m in results]
    headers = {"original": "original", "pruned": "pruned (memloc)", "random": "random pruning (control)"}

    def cell(model: str, *keys: str) -> str:
        value = results[model]
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return "–"
            value = value[key]
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    def attack(model: str, key: str) -> str:
        a = results[model].get("attack")
        return _fraction(a[key], a["prompts"]) if a else "–"

    cfg = record["config"]
    held = results["original"]["held_out"]
    loc = results["original"].get("localization")
    gen = results["original"]["generic"]
    rows = [
        (
            f"held-out memorized ({held['captions']} captions × {held['seeds']} seeds): near copies (RMSE < "
            f"{cfg['near_copy_rmse']:g})",
            lambda m: cell(m, "held_out", "near_copy_rate"),
        ),
        ("held-out memorized: mean RMSE to the training photo", lambda m: cell(m, "held_out", "mean_rmse")),
        (
            "held-out memorized: nearest training photo is the caption's own",
            lambda m: cell(m, "held_out", "nearest_is_own"),
        ),
        ("held-out: attack identifies as memorized (prompts)", lambda m: attack(m, "identified")),
        ("held-out: attack finds actually memorized (prompts)", lambda m: attack(m, "actually_memorized")),
    ]
    if loc:
        rows += [
            (
                f"localization half ({loc['captions']} captions × {loc['seeds']} seeds): near copies",
                lambda m: cell(m, "localization", "near_copy_rate"),
            ),
            ("localization half: mean RMSE to the training photo", lambda m: cell(m, "localization", "mean_rmse")),
        ]
    rows += [
        (
            f"generic ({gen['captions']} captions × {gen['seeds']} seeds): all attributes right",
            lambda m: cell(m, "generic", "attribute_accuracy", "all"),
        ),
        ("generic: diversity (mean pairwise RMSE across seeds)", lambda m: cell(m, "generic", "diversity_rmse")),
        ("generic: near copies of any memorized photo", lambda m: cell(m, "generic", "photo_copy_rate")),
        (
            "generic: mean RMSE to the nearest memorized photo",
            lambda m: cell(m, "generic", "mean_rmse_to_nearest_photo"),
        ),
        (
            "FFN-2 weights pruned",
            lambda m: (
                f"{results[m]['pruned_weights']:,} ({100 * results[m]['pruned_weights'] / record['ffn_weights']:.2f}%)"
            ),
        ),
    ]
    lines = ["| measurement | " + " | ".join(headers[m] for m in models) + " |", "| --- |" + " --- |" * len(models)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(m) for m in models) + " |")
    attack_rows = [
        {
            "model": headers[m],
            "prompts": results[m]["attack"]["prompts"],
            "samples_per_prompt": results[m]["attack"]["samples_per_prompt"],
            "identified": results[m]["attack"]["identified"],
            "actually_memorized": results[m]["attack"]["actually_memorized"],
        }
        for m in models
    ]
    a = cfg["attack"]
    settings = (
        f"s = {cfg['sparsity']:g}, tau = {cfg['tau']}, null = {cfg['null']} branch; {cfg['scheduler']} "
        f"{cfg['steps']} steps, guidance {cfg['guidance']:g}; seeds {cfg['seeds'][0]}..{cfg['seeds'][-1]} "
        f"(memorized), {cfg['generic_seeds'][0]}..{cfg['generic_seeds'][-1]} (generic); {record['device']}, "
        f"{record['dtype']}."
    )
    attack_note = (
        f"Extraction attack (Carlini et al.) on the held-out generations: tiled L2 on a {a['grid']}x{a['grid']} grid, "
        f"threshold {a['threshold']:g} (8-bit RMS levels), clique >= {a['min_clique']} of {a['samples']} samples."
    )
    return (
        "\n".join(lines)
        + "\n\n"
        + settings
        + "\n\n"
        + markdown_table(attack_rows, TABLE1_COLUMNS, TABLE1_HEADERS)
        + "\n"
        + attack_note
        + "\n\n"
        + record["verdict"]["quality"]
        + "\n"
        + record["verdict"]["message"]
        + "\n"
    )


def _write_outputs(
    folder: Path, record: dict, table: str, images: dict, manifest, held: list[int], generic: list[int]
) -> None:
    from .eval.attack import PROMPT_COLUMNS, csv_row
    from .eval.report import write_csv, write_text

    (folder / "table.md").write_text(table, encoding="utf-8")
    rows = [csv_row(r) for m in record["results"].values() for r in m["attack"]["per_prompt"]]
    write_csv(folder / "attack_per_prompt.csv", rows, [c for c in PROMPT_COLUMNS if c != "detection"])
    threshold = manifest.near_copy_rmse
    k = min(GRID_SEEDS, images["original"]["held_out"].shape[1])
    save_comparison_grid(
        folder / "grid.png",
        [manifest.memorized[i]["caption"] for i in held],
        manifest.photos[held],
        {"original": images["original"]["held_out"][:, :k], "pruned": images["pruned"]["held_out"][:, :k]},
        threshold,
    )
    k = min(GRID_SEEDS, images["original"]["generic"].shape[1])
    save_comparison_grid(
        folder / "grid_generic.png",
        [manifest.generic_eval[i]["caption"] for i in generic],
        None,
        {"original": images["original"]["generic"][:, :k], "pruned": images["pruned"]["generic"][:, :k]},
        threshold,
    )
    write_text(folder / "README.txt", OUTPUT_README)


OUTPUT_README = """\
memloc demo outputs
  table.md                 the before/after table (also printed)
  demo.json                every number: configuration, split, per-caption results, attack rows, verdict, timings
  grid.png                 held-out memorized captions: training photo | original | pruned (same seeds);
                           red frame = near copy of the training photo, green frame = the training photo
  grid_generic.png         generic captions: original | pruned (same seeds)
  attack_per_prompt.csv    the extraction attack's verdict per held-out prompt and model
  analysis/                density and pairwise IoU of masks of subsets of the localization half
  stats.safetensors        FFN statistics of the localization half (memloc collect format)
  mask.safetensors         the pruning mask (memloc localize format; `memloc prune --mask` applies it)
"""

PHOTO_FRAME = (30, 160, 30)
COPY_FRAME = (210, 30, 30)
PLAIN_FRAME = (255, 255, 255)


def save_comparison_grid(
    path: Path,
    captions: Sequence[str],
    photos: np.ndarray | None,
    columns: dict[str, np.ndarray],
    threshold: float,
    scale: int = 3,
) -> None:
    """One row per caption: its caption, the training photo (if any), then each model's generations.

    Generations within ``threshold`` pixel RMSE of the training photo get a red frame.
    """
    from PIL import Image, ImageDraw, ImageFont

    from .io import atomic_path
    from .train.measure import as_float, resize_images, rmse

    first = next(iter(columns.values()))
    size = first.shape[2] * scale
    pad, gap, label_h = 3, 10, 14
    cell = size + 2 * pad
    n_cols = first.shape[1]
    groups = ([("training photo", None)] if photos is not None else []) + [(name, None) for name in columns]
    width = sum((1 if name == "training photo" else n_cols) * cell + gap for name, _ in groups)
    height = label_h + len(captions) * (cell + label_h)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def tile(image: np.ndarray, frame, x: int, y: int) -> None:
        canvas.paste(Image.new("RGB", (cell, cell), frame), (x, y))
        thumb = Image.fromarray(_to_uint8(image)).resize((size, size), Image.NEAREST)
        canvas.paste(thumb, (x + pad, y + pad))

    x = 0
    for name, _ in groups:
        draw.text((x + 2, 1), name, fill=(0, 0, 0), font=font)
        x += (1 if name == "training photo" else n_cols) * cell + gap
    for r, caption in enumerate(captions):
        y = label_h + r * (cell + label_h)
        draw.text((2, y), caption, fill=(60, 60, 60), font=font)
        y += label_h
        x = 0
        photo = None
        if photos is not None:
            photo = as_float(photos[r])
            tile(photo, PHOTO_FRAME, x, y)
            x += cell + gap
        for gens in columns.values():
            row = gens[r]
            near = np.zeros(len(row), dtype=bool)
            if photo is not None:
                near = rmse(resize_images(row, photo.shape[0]), photo) < threshold
            for j, image in enumerate(row):
                tile(image, COPY_FRAME if near[j] else PLAIN_FRAME, x + j * cell, y)
            x += n_cols * cell + gap
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
