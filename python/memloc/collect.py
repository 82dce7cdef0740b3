"""Collect: batched CFG denoising for the first tau+1 steps, streaming FFN sums of squares into a stats file.

The loop is the pipeline's own math (``encode_prompt``, ``prepare_latents`` with one generator per
prompt, ``scale_model_input``, the UNet, classifier-free guidance, ``scheduler.step``), stopped after
the ``tau + 1`` UNet evaluations that eq. 7 needs. Both CFG halves run in one batch
``[uncond; cond]`` as in diffusers; the statistics keep one accumulator row per sample, so the
conditional and the unconditional branch of every prompt are summed separately.

GEGLU feed-forwards (SD1.x/2.x/SDXL) get their forward replaced by ``mk.geglu_sumsq(proj(x))``,
which computes the activation and its per-sample sums of squares in one pass; other FFNs get a
forward pre-hook on the second linear layer that calls ``mk.accumulate_sumsq`` on its input.

Authors'-code compatibility (``compat="authors"``) reproduces the statistics of the paper's
released code rather than the paper's equations: every token's activation vector is L2-normalized
before squaring, the null is a separate run of the empty prompt, localize pools both CFG halves,
and every prompt uses the same seed (that code reseeds the global RNG with one seed per prompt).
"""

from __future__ import annotations

import inspect
import math
import os
import queue
import threading
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import memloc_kernels as mk

from . import __version__
from .errors import MemlocError
from .ffn import FFNLayer, find_ffn_layers, identity
from .io import check_apart
from .pipeline import denoiser_of, dtype_name, load_pipeline
from .prompts import read_prompts
from .stats import FORMAT, VERSION, StatsCheckpoint, check_output

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
NULL_MODES = ("uncond", "empty")
COMPAT_MODES = ("authors",)


class Accumulators:
    """Per-layer float32 sums of squares ``[T, n_samples, d_in]`` in one flat buffer; ``step`` picks T."""

    def __init__(self, layers: list[FFNLayer], n_steps: int, device: torch.device) -> None:
        self.widths = [layer.d_in for layer in layers]
        self.n_steps = n_steps
        self.device = device
        self.n_samples = 0
        self.step = 0
        self._views: list[torch.Tensor] = []

    def reset(self, n_samples: int) -> None:
        if n_samples != self.n_samples:
            buffer = torch.zeros(self.n_steps * n_samples * sum(self.widths), dtype=torch.float32, device=self.device)
            self._views, start = [], 0
            for d in self.widths:
                size = self.n_steps * n_samples * d
                self._views.append(buffer[start : start + size].view(self.n_steps, n_samples, d))
                start += size
            self._buffer = buffer
            self.n_samples = n_samples
        else:
            self._buffer.zero_()
        self.step = 0

    def current(self, layer: int) -> torch.Tensor:
        """The contiguous ``[n_samples, d_in]`` accumulator of ``layer`` at the current step."""
        return self._views[layer][self.step]

    def result(self) -> torch.Tensor:
        """``[2, B, T, D]``: branch 0 the unconditional half, branch 1 the conditional half."""
        b = self.n_samples // 2
        return torch.cat([v.view(self.n_steps, 2, b, v.shape[-1]).permute(1, 2, 0, 3) for v in self._views], dim=-1)


@contextmanager
def instrument(layers: list[FFNLayer], accs: Accumulators, backend: str = "auto", normalize: bool = False):
    """Route every FFN's hidden activation through the ops API while the block runs."""
    handles, patched = [], []
    for i, layer in enumerate(layers):
        if layer.kind == "geglu" and not normalize:
            layer.act.forward = _fused_geglu(layer.act, accs, i, backend)
            patched.append(layer.act)
        else:
            handles.append(layer.linear.register_forward_pre_hook(_pre_hook(accs, i, backend, normalize)))
    try:
        yield
    finally:
        for module in patched:
            del module.forward
        for handle in handles:
            handle.remove()


def _fused_geglu(act: torch.nn.Module, accs: Accumulators, index: int, backend: str):
    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj_out = act.proj(hidden_states)
        rows = proj_out.numel() // proj_out.shape[-1]
        return mk.geglu_sumsq(proj_out, accs.current(index), group_size=rows // accs.n_samples, backend=backend)

    return forward


def _pre_hook(accs: Accumulators, index: int, backend: str, normalize: bool):
    def hook(module: torch.nn.Module, args: tuple) -> None:
        h = args[0]
        if normalize:  # the authors' code: unit L2 norm per token before the column norms
            h = F.normalize(h.float(), p=2, dim=-1)
        h = h.contiguous()
        rows = h.numel() // h.shape[-1]
        mk.accumulate_sumsq(h, accs.current(index), group_size=rows // accs.n_samples, backend=backend)

    return hook


class Denoiser:
    """The pipeline's text-to-image math for SD1.x/2.x (StableDiffusionPipeline) and SDXL, step by step."""

    def __init__(self, pipe, height: int, width: int, guidance_scale: float, steps: int, n_steps: int) -> None:
        from diffusers import StableDiffusionXLPipeline

        self.check(pipe)
        self.pipe = pipe
        self.sdxl = isinstance(pipe, StableDiffusionXLPipeline)
        self.height, self.width = height, width
        self.guidance_scale = guidance_scale
        self.steps = steps
        self.n_steps = n_steps
        self.device = pipe.unet.device
        self._accepts = set(inspect.signature(pipe.scheduler.step).parameters)

    @staticmethod
    def check(pipe) -> None:
        """Refuse a pipeline whose math this loop does not reproduce."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise MemlocError(
                "collect runs text-to-image UNet pipelines (StableDiffusionPipeline, StableDiffusionXLPipeline); "
                f"{type(pipe).__name__} is not one"
            )
        if not isinstance(pipe.unet, UNet2DConditionModel):
            raise MemlocError(f"{type(pipe).__name__}'s unet is a {type(pipe.unet).__name__}, not UNet2DConditionModel")
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise MemlocError("guidance-distilled UNets (time_cond_proj_dim set, e.g. LCM) have no CFG branches")

    def timesteps(self) -> torch.Tensor:
        self.pipe.scheduler.set_timesteps(self.steps, device=self.device)
        return self.pipe.scheduler.timesteps

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        pipe = self.pipe
        if not self.sdxl:
            cond, uncond = pipe.encode_prompt(prompts, self.device, 1, True, None)
            return torch.cat([uncond, cond]), None
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        if pipe.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = pipe.text_encoder_2.config.projection_dim
        size = (self.height, self.width)
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=projection_dim
        )
        time_ids = torch.cat([time_ids, time_ids]).to(self.device).repeat(len(prompts), 1)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]).to(self.device), "time_ids": time_ids}
        return torch.cat([uncond, cond]).to(self.device), added

    @torch.inference_mode()
    def run(self, prompts: list[str], seeds: list[int], on_step=None) -> None:
        """Denoise ``prompts`` (one seed each) for ``n_steps`` UNet evaluations with CFG.

        ``on_step(i)`` is called before the i-th UNet evaluation.
        """
        pipe = self.pipe
        embeds, added = self._encode(prompts)
        timesteps = self.timesteps()
        if self.sdxl and hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        latents = pipe.prepare_latents(
            len(prompts), pipe.unet.config.in_channels, self.height, self.width, embeds.dtype, self.device, generators
        )
        extra = {}
        if "eta" in self._accepts:
            extra["eta"] = 0.0
        if "generator" in self._accepts:
            extra["generator"] = generators
        for i, t in enumerate(timesteps[: self.n_steps]):
            if on_step is not None:
                on_step(i)
            model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = pipe.unet(
                model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False
            )[0]
            if i == self.n_steps - 1:
                break  # the statistics are complete; the remaining steps are not needed
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)
            latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]


def _denoise_batch(runner: Denoiser, accs: Accumulators, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Statistics ``[2, B, T, D]`` (uncond, cond) of one batch of prompts."""
    accs.reset(2 * len(prompts))
    runner.run(prompts, seeds, on_step=lambda index: setattr(accs, "step", index))
    return accs.result()


class _Writer:
    """Writes finished batches into the checkpoint on a background thread, overlapping the next batch.

    A batch whose statistics hold NaN or inf is not written: the run stops with an error naming the
    prompt and the layer (a broken model, or activations that overflow the model's dtype).
    """

    def __init__(self, checkpoint: StatsCheckpoint, layers: list[FFNLayer], prompts: list[str]) -> None:
        self.checkpoint = checkpoint
        self.layers = layers
        self.prompts = prompts
        self.error: BaseException | None = None
        # one batch queued at most: a crash loses the batch in flight and at most the one being written
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            names, done_flag, indices, rows, copied = item
            if self.error is not None:
                continue
            try:
                if copied is not None:
                    copied.synchronize()  # releases the GIL: the main thread keeps launching the next batch
                self._check_finite(rows, indices, done_flag == "null_done")
                for name, branch in zip(names, (1, 0)):
                    self.checkpoint.write_rows(name, indices, rows[branch])
                self.checkpoint.mark_done(done_flag, indices)
            except BaseException as exc:  # surfaced in the main thread by submit()/close()
                self.error = exc

    def _check_finite(self, rows: torch.Tensor, indices: list[int], null: bool) -> None:
        bad = ~torch.isfinite(rows)
        if not bool(bad.any()):
            return
        branch, sample, step, column = (int(x) for x in bad.nonzero()[0])
        layer = int(np.searchsorted(np.cumsum([x.d_in for x in self.layers]), column, side="right"))
        prompt = "the empty prompt" if null else f"prompt {indices[sample] + 1} ({self.prompts[indices[sample]]!r})"
        raise MemlocError(
            f"the activations entering {self.layers[layer].name} are NaN or inf for {prompt} at timestep index "
            f"{step} ({('unconditional', 'conditional')[branch]} branch): the model's weights are broken or its "
            "activations overflow its dtype (try --dtype float32)"
        )

    def submit(
        self,
        names: tuple[str, str],
        done_flag: str,
        indices: list[int],
        rows: torch.Tensor,
        copied: torch.cuda.Event | None = None,
    ) -> None:
        """Queue ``rows`` (host memory) for writing; ``copied``, if given, marks the end of their copy there."""
        self._raise()
        self._queue.put((names, done_flag, indices, rows, copied))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if isinstance(self.error, MemlocError):
            raise MemlocError(str(self.error))
        if self.error is not None:
            raise MemlocError(f"cannot write {self.checkpoint.path}: {self.error}")


def _scheduler(pipe, name: str | None):
    if name is None:
        return
    import diffusers

    class_name = SCHEDULERS.get(name, name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not class_name.endswith("Scheduler"):
        raise MemlocError(f"--scheduler must be one of {', '.join(SCHEDULERS)} or a diffusers scheduler, got {name!r}")
    try:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    except Exception as exc:
        raise MemlocError(f"cannot build scheduler {class_name}: {exc}") from None


def _resolution(resolution, pipe) -> tuple[int, int]:
    scale = pipe.vae_scale_factor
    if resolution is None:
        size = pipe.unet.config.sample_size * scale
        height, width = size if isinstance(size, (tuple, list)) else (size, size)
    elif isinstance(resolution, int):
        height = width = resolution
    else:
        height, width = resolution
    if height <= 0 or width <= 0 or height % scale or width % scale:
        raise MemlocError(f"--resolution {height}x{width} must be positive multiples of {scale} (the VAE's scale)")
    return int(height), int(width)


def validate_options(
    batch_size: int,
    steps: int | None,
    timesteps: int,
    guidance_scale: float | None,
    null: str | None,
    compat: str | None,
) -> str:
    """Checks the options that need no model; returns the null mode."""
    if batch_size < 1:
        raise MemlocError(f"--batch-size must be >= 1, got {batch_size}")
    if steps is not None and steps < 1:
        raise MemlocError(f"--steps must be >= 1, got {steps}")
    if timesteps < 0:
        raise MemlocError(f"--timesteps (tau) must be >= 0, got {timesteps}")
    if steps is not None and timesteps >= steps + 1:
        raise MemlocError(f"--timesteps {timesteps} is beyond the {steps} denoising steps")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise MemlocError(f"--guidance-scale must be a finite number, got {guidance_scale}")
    if compat is not None and compat not in COMPAT_MODES:
        raise MemlocError(f"--compat must be one of {', '.join(COMPAT_MODES)}, got {compat!r}")
    if null is not None and null not in NULL_MODES:
        raise MemlocError(f"--null must be one of {', '.join(NULL_MODES)}, got {null!r}")
    if compat == "authors":
        if null == "uncond":
            raise MemlocError("--compat authors uses a separate empty-prompt run as the null; drop --null uncond")
        return "empty"
    return null or "uncond"


def _versions() -> dict:
    import diffusers

    return {
        "memloc": __version__,
        "memloc_kernels": mk.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def collect_statistics(
    prompts: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    batch_size: int = 8,
    steps: int | None = None,
    timesteps: int = 10,
    guidance_scale: float | None = None,
    resolution: int | tuple[int, int] | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    null: str | None = None,
    compat: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    restart: bool = False,
    progress: bool = True,
    pipe=None,
) -> Path:
    """Write the statistics file ``out`` for ``prompts`` (a prompt file or a list); returns its path.

    ``timesteps`` is tau: the first ``tau + 1`` of the ``steps`` denoising steps are run. Prompt ``i``
    gets seed ``seed + i`` (the authors'-code mode: ``seed`` for all). ``steps`` and
    ``guidance_scale`` default to 50 and 7.5, the defaults of the SD pipelines; ``resolution`` to the
    model's. ``null="empty"`` adds a run of the empty prompt with each prompt's seed. An existing
    ``<out>.partial`` of the same run is resumed (``restart`` discards it). ``pipe`` reuses an
    already loaded pipeline.
    """
    null = validate_options(batch_size, steps, timesteps, guidance_scale, null, compat)
    steps = 50 if steps is None else steps
    guidance_scale = 7.5 if guidance_scale is None else float(guidance_scale)
    if isinstance(prompts, (str, os.PathLike)):
        prompt_list = read_prompts(prompts)
    else:
        prompt_list = [str(p) for p in prompts]
        if not prompt_list or len(set(prompt_list)) != len(prompt_list):
            raise MemlocError("prompts must be a non-empty list without duplicates")
    out = check_output(out)
    check_apart(out, prompt_file=prompts if isinstance(prompts, (str, os.PathLike)) else None, model=model)
    if pipe is None:
        pipe = load_pipeline(model, device, dtype)
    Denoiser.check(pipe)
    _scheduler(pipe, scheduler)
    denoiser = denoiser_of(pipe)
    layers = find_ffn_layers(denoiser)
    height, width = _resolution(resolution, pipe)
    n_steps = timesteps + 1
    runner = Denoiser(pipe, height, width, guidance_scale, steps, n_steps)
    schedule = runner.timesteps()
    if n_steps > len(schedule):
        raise MemlocError(f"--timesteps {timesteps} is beyond the {len(schedule)} timesteps of {steps} steps")
    seeds = [seed] * len(prompt_list) if compat == "authors" else [seed + i for i in range(len(prompt_list))]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": identity(denoiser, layers, getattr(pipe, "memloc_source", None)),
        "pipeline": type(pipe).__name__,
        "prompts": prompt_list,
        "seeds": seeds,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": _jsonable(dict(pipe.scheduler.config))},
        "steps": steps,
        "tau": timesteps,
        "timesteps": [float(t) for t in schedule[:n_steps].tolist()],
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "dtype": dtype_name(denoiser.dtype),
        "null": null,
        "compat": compat,
        "normalization": "token_l2" if compat == "authors" else "none",
        "pooled_branches": compat == "authors",
        "versions": _versions(),
        "device": str(runner.device),
        "batch_size": batch_size,
        "backend": backend,
    }
    checkpoint, created = StatsCheckpoint.open(out, meta, restart=restart)
    try:
        _fill(checkpoint, runner, layers, meta, batch_size, backend, compat == "authors", progress)
    except BaseException:
        # keep a checkpoint that holds finished prompts (to resume); drop one that holds nothing
        empty = created and not checkpoint.done("done").any()
        checkpoint.close()
        if empty:
            checkpoint.path.unlink(missing_ok=True)
        raise
    return checkpoint.finish(out)


def _fill(checkpoint, runner, layers, meta, batch_size, backend, normalize, progress) -> None:
    from tqdm.auto import tqdm

    prompts, seeds = meta["prompts"], meta["seeds"]
    todo = [int(i) for i in np.flatnonzero(~checkpoint.done("done"))]
    null_todo = [int(i) for i in np.flatnonzero(~checkpoint.done("null_done"))] if meta["null"] == "empty" else []
    accs = Accumulators(layers, runner.n_steps, runner.device)
    writer = _Writer(checkpoint, layers, prompts)
    to_host = _HostCopier(torch.device(runner.device))
    repeated = {s for s, n in Counter(seeds).items() if n > 1}
    null_cache: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(todo) + len(null_todo), desc="collect", unit="prompt", disable=not progress or None)
    try:
        with instrument(layers, accs, backend, normalize):
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                rows = _guarded(runner, accs, [prompts[i] for i in batch], [seeds[i] for i in batch], checkpoint)
                writer.submit(("cond", "uncond"), "done", batch, *to_host(rows))
                bar.update(len(batch))
            # the empty prompt's statistics depend only on the seed: run each seed once
            for start in range(0, len(null_todo), batch_size):
                batch = null_todo[start : start + batch_size]
                run = [i for i in batch if seeds[i] not in null_cache]
                run_seeds = list(dict.fromkeys(seeds[i] for i in run))
                if run_seeds:
                    rows = _guarded(runner, accs, [""] * len(run_seeds), run_seeds, checkpoint)
                    fresh = {s: rows[:, j] for j, s in enumerate(run_seeds)}
                    null_cache.update({s: r for s, r in fresh.items() if s in repeated})
                else:
                    fresh = {}
                rows = torch.stack([fresh.get(seeds[i], null_cache.get(seeds[i])) for i in batch], dim=1)
                writer.submit(("null_cond", "null_uncond"), "null_done", batch, *to_host(rows))
                bar.update(len(batch))
    finally:
        bar.close()
        writer.close()


class _HostCopier:
    """Copies a batch's statistics to pinned host memory on a side stream, without waiting for them.

    A blocking ``.cpu()`` would stall the host until the GPU has drained the batch, then copy
    through pageable memory while the GPU idles; here the host goes on to the next batch at once
    and the writer thread waits on the copy's event. Pinned blocks come from torch's caching host
    allocator, which does not reuse a block before the copies recorded on it have finished.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if self.stream is None:
            return rows.cpu(), None
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(rows.device))
        with torch.cuda.stream(self.stream):
            host.copy_(rows, non_blocking=True)
            rows.record_stream(self.stream)  # the allocator must not hand out rows' memory before the copy
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return host, copied


def _guarded(runner, accs, prompts, seeds, checkpoint) -> torch.Tensor:
    try:
        return _denoise_batch(runner, accs, prompts, seeds)
    except torch.OutOfMemoryError:
        raise MemlocError(
            f"out of GPU memory at a batch of {len(prompts)} prompts; rerun with a smaller --batch-size "
            f"(prompts already finished stay in {checkpoint.path} and resume)"
        ) from None


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

