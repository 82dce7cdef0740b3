"""The statistics file: per prompt, per timestep, per layer sums of squares of FFN activations.

One safetensors file. Tensors (float32 unless noted), with P prompts, T = tau + 1 timesteps and
D = the sum of the FFN layers' ``d_in`` (layer ``l`` owns columns ``offset_l .. offset_l + d_l``):

* ``cond`` ``[P, T, D]``: the conditional CFG branch (the prompt);
* ``uncond`` ``[P, T, D]``: the unconditional branch at the same latents;
* ``null_cond``, ``null_uncond`` ``[P, T, D]`` (optional): a separate run of the empty prompt with
  the prompt's seed (``collect --null empty`` and the authors'-code mode);
* ``done`` (uint8 ``[P]``), ``null_done`` (optional): 1 where a prompt's rows are written.

The JSON metadata (``__metadata__["memloc"]``) records the model identity (layer names, shapes,
weight fingerprint), the prompts and seeds, scheduler, steps, timesteps, guidance, resolution,
dtype and library versions.

While ``collect`` runs, the file is ``<out>.partial``: created at full size up front, each batch's
rows written in place and only then its ``done`` flags, so an interrupted run loses at most the
batch in flight; the finished file is renamed onto ``<out>``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import MemlocError
from .io import check_output_folder, check_writable

FORMAT = "memloc-stats"
VERSION = 1
METADATA_KEY = "memloc"
BRANCHES = ("cond", "uncond")
NULL_BRANCHES = ("null_cond", "null_uncond")
# Fields of the metadata that may differ between an interrupted run and its resumption.
RESUME_FREE = ("device", "batch_size", "backend")


def _check_ancestors(path: Path) -> None:
    """The nearest existing folder above ``path`` must be a writable folder."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MemlocError(f"cannot write {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise MemlocError(f"cannot write {path}: folder {parent} is not writable")
            return


def check_output(path: str | os.PathLike) -> Path:
    """``io.check_writable`` plus a check that the output's folder is a folder (io.py lets a file through)."""
    path = Path(path)
    _check_ancestors(path)
    return check_writable(path)


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail early, before long work, if the output folder ``path`` cannot be written."""
    path = check_output_folder(path)
    _check_ancestors(path)
    return path


def partial_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def layer_offsets(layers: list[dict]) -> list[int]:
    """Column offset of each layer in the ``D`` axis."""
    offsets, total = [], 0
    for layer in layers:
        offsets.append(total)
        total += int(layer["d_in"])
    return offsets


def _layout(n_prompts: int, n_steps: int, width: int, null: bool) -> list[tuple[str, str, list[int]]]:
    names = BRANCHES + (NULL_BRANCHES if null else ())
    layout = [(name, "F32", [n_prompts, n_steps, width]) for name in names]
    layout.append(("done", "U8", [n_prompts]))
    if null:
        layout.append(("null_done", "U8", [n_prompts]))
    return layout


_ITEMSIZE = {"F32": 4, "U8": 1}


def _header(layout, metadata: dict) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The safetensors header (length prefix included) and each tensor's byte range in the data."""
    entries, offsets, pos = {}, {}, 0
    for name, dtype, shape in layout:
        size = int(np.prod(shape)) * _ITEMSIZE[dtype]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        offsets[name] = (pos, pos + size)
        pos += size
    entries["__metadata__"] = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob, offsets


def _read_header(path: Path) -> tuple[dict, int]:
    """The raw header dict of a safetensors file and where its data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (size,) = struct.unpack("<Q", raw)
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MemlocError(f"{path} is not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise MemlocError(f"{path} is not a safetensors file")
    return header, 8 + size


class StatsCheckpoint:
    """A statistics file being filled in place (see the module docstring)."""

    def __init__(self, path: Path, metadata: dict, offsets: dict[str, tuple[int, int]], data_start: int) -> None:
        self.path = path
        self.metadata = metadata
        self._offsets = offsets
        self._data_start = data_start
        self.n_prompts = len(metadata["prompts"])
        self.width = sum(layer["d_in"] for layer in metadata["model"]["layers"])
        self.n_steps = len(metadata["timesteps"])
        self._fd = os.open(path, os.O_RDWR)

    @classmethod
    def open(cls, out: str | os.PathLike, metadata: dict, restart: bool = False) -> tuple[StatsCheckpoint, bool]:
        """Resume ``<out>.partial`` if it belongs to the same run, else create it; returns (checkpoint, created)."""
        path = partial_path(out)
        null = metadata["null"] == "empty"
        width = sum(int(layer["d_in"]) for layer in metadata["model"]["layers"])
        layout = _layout(len(metadata["prompts"]), len(metadata["timesteps"]), width, null)
        header, offsets = _header(layout, metadata)
        if path.exists() and not restart:
            recorded, data_start = _read_header(path)
            old = json.loads(recorded.get("__metadata__", {}).get(METADATA_KEY, "{}"))
            if _resume_key(old) != _resume_key(metadata):
                raise MemlocError(
                    f"{path} is an interrupted collection with other settings or prompts; "
                    "rerun with the same arguments to resume it, or pass --restart to discard it"
                )
            return cls(path, old, offsets, data_start), False
        total = len(header) + max(end for _, end in offsets.values())
        try:
            with open(path, "wb") as f:
                f.write(header)
                f.truncate(total)  # sparse zeros: rows not yet collected
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise MemlocError(f"cannot write {path}: {exc.strerror}") from None
        return cls(path, metadata, offsets, len(header)), True

    def done(self, which: str = "done") -> np.ndarray:
        """Bool ``[P]``: which prompts' rows of ``which`` (``done`` or ``null_done``) are written."""
        start, end = self._offsets[which]
        raw = os.pread(self._fd, end - start, self._data_start + start)
        return np.frombuffer(raw, dtype=np.uint8).astype(bool)

    def write_rows(self, name: str, prompts: list[int], rows: torch.Tensor) -> None:
        """Write ``rows`` ``[len(prompts), T, D]`` (float32, CPU) as the rows of tensor ``name``."""
        rows = rows.contiguous().numpy()
        row_bytes = self.n_steps * self.width * 4
        if rows.shape != (len(prompts), self.n_steps, self.width) or rows.dtype != np.float32:
            raise ValueError(f"rows must be float32 [{len(prompts)}, {self.n_steps}, {self.width}], got {rows.shape}")
        start = self._data_start + self._offsets[name][0]
        for i, p in enumerate(prompts):
            os.pwrite(self._fd, memoryview(rows[i]).cast("B"), start + p * row_bytes)

    def mark_done(self, which: str, prompts: list[int]) -> None:
        start = self._data_start + self._offsets[which][0]
        for p in prompts:
            os.pwrite(self._fd, b"\x01", start + p)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def finish(self, out: str | os.PathLike) -> Path:
        """Rename the completed file onto ``out``."""
        self.close()
        os.replace(self.path, out)
        return Path(out)


def _resume_key(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items() if k not in RESUME_FREE}


@dataclass
class Stats:
    """A loaded statistics file."""

    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return self.meta["prompts"]

    @property
    def layers(self) -> list[dict]:
        return self.meta["model"]["layers"]

    @property
    def n_steps(self) -> int:
        return len(self.meta["timesteps"])

    @property
    def tau(self) -> int:
        return self.n_steps - 1

    @property
    def has_null_run(self) -> bool:
        return "null_cond" in self.tensors

    def layer_columns(self) -> list[slice]:
        return [slice(o, o + int(layer["d_in"])) for o, layer in zip(layer_offsets(self.layers), self.layers)]


def read_stats_metadata(path: str | os.PathLike) -> dict:
    """Check that ``path`` is a complete memloc statistics file (without reading its data); its metadata."""
    path = Path(path)
    if not path.is_file():
        raise MemlocError(f"statistics file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    header, _ = _read_header(path)
    raw = header.get("__metadata__", {}).get(METADATA_KEY) if isinstance(header.get("__metadata__"), dict) else None
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MemlocError(f"{path} is not a memloc statistics file")
    if meta.get("version") != VERSION:
        raise MemlocError(f"{path} has statistics format version {meta.get('version')}, this memloc reads {VERSION}")
    try:
        n_prompts, n_steps = len(meta["prompts"]), len(meta["timesteps"])
        width = sum(int(layer["d_in"]) for layer in meta["model"]["layers"])
        null = meta["null"] == "empty"
    except (KeyError, TypeError):
        raise MemlocError(f"{path} is malformed: its metadata lacks prompts, timesteps or layers") from None
    for name, dtype, shape in _layout(n_prompts, n_steps, width, null):
        entry = header.get(name)
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
            got = None if not isinstance(entry, dict) else (entry.get("dtype"), entry.get("shape"))
            raise MemlocError(f"{path} is malformed: tensor {name} should be {dtype} {shape}, got {got}")
    return meta


_TORCH_DTYPES = {"F32": torch.float32, "U8": torch.uint8}
_READ_PIECE = 16 << 20  # bytes per read: a pinned staging buffer's size
_READ_THREADS = 4  # reads from the page cache are memcpy-bound per thread; os.preadv releases the GIL


def _pread_into(fd: int, buffer: np.ndarray, offset: int) -> None:
    """Fill the uint8 ``buffer`` from ``fd`` at ``offset``; a short file raises EOFError."""
    view, done = memoryview(buffer), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"the file ends {len(view) - done} bytes early")
        done += got


def _read_tensors(path: Path, entries: dict[str, dict], data_start: int, device: torch.device) -> dict:
    """The named tensors of a safetensors file, read straight into ``device`` memory.

    safetensors' ``get_tensor`` copies out of a memory map and ``.to(cuda)`` then copies again
    through pageable memory, one thread; here pieces are read by several threads (into the
    destination on the CPU, into reused pinned buffers on a GPU, whose asynchronous uploads
    overlap the next reads).
    """
    from concurrent.futures import ThreadPoolExecutor

    out, jobs = {}, []  # jobs: (destination bytes, file offset, size)
    for name, entry in entries.items():
        begin, end = (int(x) for x in entry["data_offsets"])
        dtype = _TORCH_DTYPES[entry["dtype"]]
        tensor = torch.empty(entry["shape"], dtype=dtype, device=device)
        if tensor.numel() * tensor.element_size() != end - begin:
            raise MemlocError(f"{path} is malformed: tensor {name} holds {end - begin} bytes, expected "
                              f"{tensor.numel() * tensor.element_size()}")
        out[name] = tensor
        flat = tensor.view(-1).view(torch.uint8)
        for a in range(0, end - begin, _READ_PIECE):
            jobs.append((flat, a, data_start + begin + a, min(_READ_PIECE, end - begin - a)))
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            host_jobs = [j for j in jobs if not j[0].is_cuda]
            list(pool.map(lambda j: _pread_into(fd, j[0][j[1] : j[1] + j[3]].numpy(), j[2]), host_jobs))
            gpu_jobs = [j for j in jobs if j[0].is_cuda]
            if gpu_jobs:
                _upload(fd, gpu_jobs, pool, device)
    finally:
        os.close(fd)
    return out


def _upload(fd: int, jobs: list, pool, device: torch.device) -> None:
    """Read ``jobs`` into a ring of pinned buffers and copy each to its device destination asynchronously."""
    slots = 2 * _READ_THREADS
    staging = [torch.empty(_READ_PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
    uploaded: list[torch.cuda.Event | None] = [None] * slots
    stream = torch.cuda.Stream(device)
    pending = {}

    def start(i: int) -> None:
        slot = i % slots
        if uploaded[slot] is not None:
            uploaded[slot].synchronize()  # the slot's previous piece has left for the GPU
        size = jobs[i][3]
        pending[i] = pool.submit(_pread_into, fd, staging[slot][:size].numpy(), jobs[i][2])

    for i in range(min(slots, len(jobs))):
        start(i)
    with torch.cuda.stream(stream):
        for i, (flat, at, _, size) in enumerate(jobs):
            pending.pop(i).result()
            slot = i % slots
            flat[at : at + size].copy_(staging[slot][:size], non_blocking=True)
            uploaded[slot] = torch.cuda.Event()
            uploaded[slot].record(stream)
            if i + slots < len(jobs):
                start(i + slots)
    # later work on the current stream must see the uploaded data
    torch.cuda.current_stream(device).wait_stream(stream)
    for flat in {id(j[0]): j[0] for j in jobs}.values():
        flat.record_stream(stream)


def load_stats(
    path: str | os.PathLike, device: str | torch.device = "cpu", names: tuple[str, ...] | None = None
) -> Stats:
    """Read and validate a statistics file; refuses an incomplete one.

    ``names`` limits the statistics tensors read (``done`` flags are always read), e.g. to the
    ones a localization needs.
    """
    meta = read_stats_metadata(path)
    header, data_start = _read_header(Path(path))
    wanted = [n for n in BRANCHES + NULL_BRANCHES if n in header and (names is None or n in names)]
    flags = [n for n in ("done", "null_done") if n in header]
    tensors = {}
    for group, dev in ((flags, torch.device("cpu")), (wanted, torch.device(device))):
        try:
            tensors.update(_read_tensors(Path(path), {n: header[n] for n in group}, data_start, dev))
        except (OSError, EOFError, KeyError, TypeError, ValueError) as exc:
            raise MemlocError(f"cannot read statistics file {path}: {exc}") from None
        for which in set(group) & {"done", "null_done"}:  # before reading the statistics themselves
            if not bool(tensors[which].bool().all()):
                count = int(tensors[which].bool().sum())
                run = " of the empty-prompt run" if which == "null_done" else ""
                raise MemlocError(f"{path} is incomplete ({count} of {len(tensors[which])} prompts{run})")
    return Stats(Path(path), meta, tensors)
