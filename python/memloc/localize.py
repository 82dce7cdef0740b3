"""Localize (eq. 5-7): the memorized FFN weights of prompt subsets, from stored statistics; the mask file.

A subset's statistics are the sums of its prompts' statistics (sums of squares add), so any number
of subsets needs no new forward pass: per layer, one ``[S, P] @ [P, T * d_in]`` product in float64
(exact for these sums, so the float32 result does not depend on the summation order) gives the
``[S, T, d_in]`` statistics of S subsets, and one ``mk.memorized_masks`` call turns them into S
packed masks per layer (the union over the first tau + 1 timesteps, eq. 7).

Null statistics (``null``): ``uncond`` (default) is the unconditional CFG branch at the same latents,
summed over the same prompts; ``empty`` is the separate empty-prompt run with the same seeds. In
the authors'-code mode both CFG halves are pooled, for the prompts and for the empty-prompt run.

The mask file is one safetensors file: per layer (by name) the packed words ``[S, d_out,
ceil(d_in / 32)]`` (int32, bit ``j % 32`` of word ``j // 32`` is column ``j``), and JSON metadata
under ``memloc``: layer names and shapes, model identity, sparsity, tau, timesteps, null, subsets.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import memloc_kernels as mk

from . import __version__
from .errors import MemlocError
from .ffn import FFNLayer, check_identity, find_ffn_layers, identity
from .io import atomic_path, check_apart
from .pipeline import is_hub_id, load_denoiser, resolve_device
from .prompts import read_prompts
from .stats import Stats, check_output, load_stats, read_stats_metadata

MASK_FORMAT = "memloc-mask"
MASK_VERSION = 1
MASK_KEY = "memloc"


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise MemlocError(f"--sparsity must be a number in (0, 1], got {sparsity!r}")
    if not 0 < sparsity <= 1:
        raise MemlocError(f"--sparsity must be in (0, 1], got {sparsity}")
    return float(sparsity)


def check_tau(tau: int | None, meta: dict) -> int:
    collected = len(meta["timesteps"]) - 1
    if tau is None:
        return collected
    if tau < 0:
        raise MemlocError(f"--timesteps (tau) must be >= 0, got {tau}")
    if tau > collected:
        raise MemlocError(f"--timesteps {tau} is beyond the statistics, which hold tau = {collected} (rerun collect)")
    return tau


def null_mode(null: str | None, meta: dict) -> str:
    """The null statistics to use, checked against what the file holds."""
    if null is None:
        null = "empty" if meta.get("compat") == "authors" else "uncond"
    if null not in ("uncond", "empty"):
        raise MemlocError(f"--null must be uncond or empty, got {null!r}")
    if null == "empty" and meta.get("null") != "empty":
        raise MemlocError("--null empty needs statistics collected with --null empty (no empty-prompt run stored)")
    if null == "uncond" and meta.get("pooled_branches"):
        raise MemlocError("authors'-mode statistics pool both CFG halves; their null is the empty-prompt run")
    return null


def resolve_subsets(
    prompts: list[str],
    *,
    subsets: list[list[int]] | None = None,
    subset_files: list[str | os.PathLike] | None = None,
    n_subsets: int | None = None,
    subset_size: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Subsets as lists of prompt indices: listed, read from prompt files, sampled, or all prompts."""
    given = [x is not None for x in (subsets, subset_files, n_subsets)]
    if sum(given) > 1:
        raise MemlocError("give subsets one way: --subset FILE, or --subsets N --subset-size M")
    count = len(prompts)
    if subset_files is not None:
        index = {p: i for i, p in enumerate(prompts)}
        subsets = []
        for file in subset_files:
            chosen = []
            for p in read_prompts(file):
                if p not in index:
                    raise MemlocError(f"subset file {file}: prompt {p[:60]!r} is not in the statistics file")
                chosen.append(index[p])
            subsets.append(chosen)
    elif n_subsets is not None:
        if n_subsets < 1:
            raise MemlocError(f"--subsets must be >= 1, got {n_subsets}")
        if subset_size is None or not 1 <= subset_size <= count:
            raise MemlocError(f"--subset-size must be in 1..{count} (the prompts in the statistics), got {subset_size}")
        distinct = math.comb(count, subset_size)
        if n_subsets > distinct:
            raise MemlocError(
                f"--subsets {n_subsets}: only {distinct} distinct subsets of {subset_size} of the {count} prompts exist"
            )
        # distinct subsets (a repeat would inflate the mean IoU): a repeat is drawn again, so a seed
        # whose draws never repeat gives the same subsets as plain draws
        generator = torch.Generator().manual_seed(seed)
        subsets, seen = [], set()
        while len(subsets) < n_subsets:
            subset = sorted(torch.randperm(count, generator=generator)[:subset_size].tolist())
            if tuple(subset) not in seen:
                seen.add(tuple(subset))
                subsets.append(subset)
    elif subsets is None:
        if subset_size is not None:
            raise MemlocError("--subset-size needs --subsets N")
        subsets = [list(range(count))]
    for s, subset in enumerate(subsets):
        if not subset:
            raise MemlocError(f"subset {s} is empty")
        if len(set(subset)) != len(subset):
            raise MemlocError(f"subset {s} lists a prompt twice")
        if min(subset) < 0 or max(subset) >= count:
            raise MemlocError(f"subset {s} has a prompt index outside 0..{count - 1}")
    return [list(map(int, s)) for s in subsets]


def needed_tensors(meta: dict, null: str) -> tuple[str, ...]:
    """The statistics tensors that :class:`SubsetStatistics` reads for this ``null``: only those are loaded."""
    if meta.get("pooled_branches"):
        return ("cond", "uncond", "null_cond", "null_uncond")
    return ("cond", "uncond" if null == "uncond" else "null_cond")


class SubsetStatistics:
    """Per-layer prompt statistics ``[P, T * d_in]`` on the device, summed over subsets on demand.

    Kept in float32 (float64 where both CFG halves are pooled, so that pooling does not round);
    the sums are taken in float64.
    """

    def __init__(self, stats: Stats, tau: int, null: str, device: torch.device | str) -> None:
        n_steps = tau + 1
        pooled = bool(stats.meta.get("pooled_branches"))
        t = stats.tensors

        def take(name: str, cols: slice) -> torch.Tensor:
            x = t[name][:, :n_steps, cols].to(device)  # slice where the data is, move only what is used
            x = x.to(torch.float64) if pooled else x
            return x.reshape(x.shape[0], -1)

        self.n_prompts = t["cond"].shape[0]
        self.n_steps = n_steps
        self.widths, self.signal, self.null = [], [], []
        for cols in stats.layer_columns():
            self.widths.append(cols.stop - cols.start)
            if pooled:
                self.signal.append(take("cond", cols) + take("uncond", cols))
                self.null.append(take("null_cond", cols) + take("null_uncond", cols))
            else:
                self.signal.append(take("cond", cols))
                self.null.append(take("uncond" if null == "uncond" else "null_cond", cols))
        self.device = torch.device(device)

    def selection(self, subsets: list[list[int]]) -> torch.Tensor:
        """``[S, P]`` float64, 1 where subset ``s`` holds prompt ``p`` (one indexed write, not one per subset)."""
        rows = [s for s, subset in enumerate(subsets) for _ in subset]
        cols = [p for subset in subsets for p in subset]
        sel = torch.zeros(len(subsets), self.n_prompts, dtype=torch.float64)
        sel[rows, cols] = 1.0
        return sel.to(self.device)

    def sums(self, subsets: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the subsets' statistics and null statistics ``[S, T, d_in]`` (float32)."""
        sel = self.selection(subsets)
        shape = lambda d: (len(subsets), self.n_steps, d)
        # float64 sums of float32 terms are exact here, so the result does not depend on the order
        total = lambda x, d: (sel @ x.to(torch.float64)).to(torch.float32).view(shape(d))
        signal = [total(x, d) for x, d in zip(self.signal, self.widths)]
        null = [total(x, d) for x, d in zip(self.null, self.widths)]
        return signal, null


def subset_masks(
    weights: list[torch.Tensor],
    subset_stats: SubsetStatistics,
    subsets: list[list[int]],
    sparsity: float,
    *,
    backend: str = "auto",
    chunk: int | None = None,
    progress: bool = False,
) -> list[mk.PackedMask]:
    """Eq. 5-7 for every subset: per layer a PackedMask ``[S, d_out, d_in]``, the union over the timesteps.

    Subsets go to ``mk.memorized_masks`` in chunks of ``chunk`` (default: as many as a memory budget
    allows: 4 GiB of statistics on a GPU; on the CPU also the reference backend's working set, which
    scores every (subset, timestep) at once). On a GPU a chunk that runs out of memory is halved.
    """
    from tqdm.auto import tqdm

    if chunk is None:
        per_subset = 8 * subset_stats.n_steps * sum(subset_stats.widths)  # float32 signal + null
        if subset_stats.device.type == "cuda":
            chunk = max(1, (4 << 30) // per_subset)
        else:
            largest = max(w.numel() for w in weights)
            chunk = max(1, (1 << 30) // (per_subset + 12 * subset_stats.n_steps * largest))
    # the result is allocated once and each chunk ORs into its rows: no concatenation (a copy of every
    # mask) at the end; a retried chunk ORs the same bits again, which leaves them unchanged
    words = [
        torch.zeros(len(subsets), w.shape[0], mk.n_words(w.shape[1]), dtype=torch.int32, device=w.device)
        for w in weights
    ]
    bar = tqdm(total=len(subsets), desc="localize", unit="subset", disable=not progress or None)
    start = 0
    while start < len(subsets):
        batch = subsets[start : start + chunk]
        outs = [mk.PackedMask(wd[start : start + len(batch)], w.shape[1]) for wd, w in zip(words, weights)]
        try:
            signal, null = subset_stats.sums(batch)
            # one device sync for the whole chunk instead of the ops' two per tensor
            if not _all_finite_nonnegative(signal + null):
                bad = next(i for i, pair in enumerate(zip(signal, null)) if not _all_finite_nonnegative(list(pair)))
                raise MemlocError(
                    f"the statistics of FFN layer {bad} hold NaN, inf or negative values; collect them again"
                )
            mk.memorized_masks(weights, signal, null, sparsity, outs=outs, check_finite=False, backend=backend)
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            signal = null = None  # free this chunk's sums before the smaller retry
            chunk = max(1, chunk // 2)
            torch.cuda.empty_cache()
            continue
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    return [mk.PackedMask(wd, w.shape[1]) for wd, w in zip(words, weights)]


def _all_finite_nonnegative(tensors: list[torch.Tensor]) -> bool:
    """Whether every value is finite and >= 0, with one host sync for all tensors.

    min/max propagate NaN, so a NaN fails ``min >= 0``; -inf fails it too and +inf fails
    ``max < inf``.
    """
    bounds = torch.stack([torch.stack(torch.aminmax(t.float())) for t in tensors]).cpu()
    return bool((bounds[:, 0] >= 0).all()) and bool((bounds[:, 1] < math.inf).all())


@dataclass
class MaskFile:
    """A loaded mask file: metadata and one PackedMask ``[S, d_out, d_in]`` per layer (in layer order)."""

    path: Path
    meta: dict
    masks: list[mk.PackedMask]

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.meta["model"]["layers"]]

    @property
    def n_subsets(self) -> int:
        return self.masks[0].words.shape[0]


def write_mask_file(out: str | os.PathLike, masks: list[mk.PackedMask], meta: dict) -> Path:
    """Write packed masks (layer order of ``meta["model"]["layers"]``) and metadata, atomically."""
    from safetensors.torch import save_file

    tensors = {
        layer["name"]: m.words.to("cpu").contiguous() for layer, m in zip(meta["model"]["layers"], masks)
    }
    meta = {"format": MASK_FORMAT, "version": MASK_VERSION, **meta}
    out = check_output(out)
    try:
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={MASK_KEY: json.dumps(meta, sort_keys=True)})
    except OSError as exc:
        raise MemlocError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def read_mask_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> MaskFile:
    """Read and validate a mask file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MemlocError(f"mask file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(MASK_KEY)
            meta = json.loads(raw) if raw else None
            if not isinstance(meta, dict) or meta.get("format") != MASK_FORMAT:
                raise MemlocError(f"{path} is not a memloc mask file")
            if meta.get("version") != MASK_VERSION:
                raise MemlocError(f"{path} has mask format version {meta.get('version')}, memloc reads {MASK_VERSION}")
            masks, n_subsets = [], None
            for layer in meta["model"]["layers"]:
                name, d_out, d_in = layer["name"], int(layer["d_out"]), int(layer["d_in"])
                if name not in f.keys():  # noqa: SIM118
                    raise MemlocError(f"{path} is malformed: layer {name} is missing")
                words = f.get_tensor(name)
                n_subsets = words.shape[0] if n_subsets is None else n_subsets
                if words.dtype != torch.int32 or tuple(words.shape) != (n_subsets, d_out, mk.n_words(d_in)):
                    raise MemlocError(
                        f"{path} is malformed: layer {name} holds {words.dtype} {tuple(words.shape)}, "
                        f"expected int32 [S, {d_out}, {mk.n_words(d_in)}]"
                    )
                packed = mk.PackedMask(words, d_in)
                try:
                    packed.check_padding(f"layer {name}")
                except ValueError as exc:
                    raise MemlocError(f"{path} is malformed: {exc}") from None
                masks.append(packed.to(device))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise MemlocError(f"{path} is not a readable memloc mask file ({exc})") from None
    if not masks:
        raise MemlocError(f"{path} holds no layers")
    return MaskFile(path, meta, masks)


def read_options(
    stats: str | os.PathLike, sparsity, timesteps: int | None, null: str | None
) -> tuple[float, dict, int, str]:
    """The checked sparsity, the statistics file's metadata, tau and the null mode."""
    sparsity = check_sparsity(sparsity)
    meta = read_stats_metadata(stats)
    return sparsity, meta, check_tau(timesteps, meta), null_mode(null, meta)


def load_checked_denoiser(
    stats: str | os.PathLike,
    meta: dict,
    model: str | os.PathLike | None,
    device: str | None,
    dtype: str | None,
    denoiser: torch.nn.Module | None,
) -> tuple[torch.device, list[FFNLayer], dict]:
    """Device, FFN layers and identity of ``denoiser`` (default: loaded from ``model``), checked against ``meta``."""
    if denoiser is None:
        dev = resolve_device(device)
        denoiser, source = load_denoiser(model_for_stats(model, meta), dev, dtype or meta.get("dtype"))
    else:
        dev, source = next(denoiser.parameters()).device, meta["model"].get("source")
    layers = find_ffn_layers(denoiser)
    model_id = identity(denoiser, layers, source)
    check_identity(meta["model"], model_id, f"statistics file {stats}")
    finite = torch.stack([torch.isfinite(layer.weight.detach()).all() for layer in layers]).tolist()
    if not all(finite):
        raise MemlocError(f"the weight of {layers[finite.index(False)].name} holds NaN or inf: the model is broken")
    return dev, layers, model_id


def model_for_stats(model, meta: dict) -> str | None:
    """The model to localize with: the given one, else the one the statistics were collected on."""
    if model is not None:
        return str(model)
    source = meta["model"].get("source")
    if not source:
        return None  # collected from an in-memory pipeline: the embedded model, or --model
    if not (Path(source).is_dir() or is_hub_id(source)):
        raise MemlocError(f"the statistics were collected on {source}, which is not here; pass --model DIR")
    return source


def localize(
    stats: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sparsity: float,
    timesteps: int | None = None,
    subsets: list[list[int]] | None = None,
    subset_files: list[str | os.PathLike] | None = None,
    n_subsets: int | None = None,
    subset_size: int | None = None,
    seed: int = 0,
    null: str | None = None,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    progress: bool = True,
    denoiser: torch.nn.Module | None = None,
) -> Path:
    """Compute the masks of eq. 5-7 for one or more prompt subsets and write the mask file ``out``.

    ``timesteps`` is tau (default: all collected steps). The weights come from ``model`` (default:
    the model the statistics were collected on), which must be that model; ``denoiser`` passes an
    already loaded UNet/transformer instead.
    """
    sparsity, meta, tau, null = read_options(stats, sparsity, timesteps, null)
    out = check_output(out)
    check_apart(out, statistics_file=stats, model=model)
    chosen = resolve_subsets(
        meta["prompts"],
        subsets=subsets,
        subset_files=subset_files,
        n_subsets=n_subsets,
        subset_size=subset_size,
        seed=seed,
    )
    dev, layers, model_id = load_checked_denoiser(stats, meta, model, device, dtype, denoiser)
    loaded = load_stats(stats, device=dev, names=needed_tensors(meta, null))
    subset_stats = SubsetStatistics(loaded, tau, null, dev)
    del loaded
    with torch.no_grad():
        masks = subset_masks([layer.weight.detach() for layer in layers], subset_stats, chosen, sparsity,
                             backend=backend, progress=progress)
    record = {
        "model": model_id,
        "sparsity": sparsity,
        "tau": tau,
        "timesteps": meta["timesteps"][: tau + 1],
        "null": null,
        "compat": meta.get("compat"),
        "subsets": chosen,
        "subset_seed": seed if n_subsets is not None else None,
        "prompts": meta["prompts"],
        "stats": str(Path(stats).resolve()),
        "versions": {"memloc": __version__, "memloc_kernels": mk.__version__},
    }
    return write_mask_file(out, masks, record)
