"""Loading diffusers pipelines (SD1.x, SD2.x, SDXL, ...) from local folders without touching the network."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import MemlocError

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "model"
DENOISERS = ("unet", "transformer")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None means cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MemlocError(f"--device {device!r} is not a torch device (e.g. cuda, cuda:1, cpu)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MemlocError(f"--device {device} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MemlocError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype; None means float16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MemlocError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_model(model: str | os.PathLike | None) -> str:
    """The model argument as given, or the embedded model folder; a clear error if that is absent."""
    if model is None:
        if not (DEFAULT_MODEL / "model_index.json").is_file():
            raise MemlocError(f"the embedded model is not installed (no {DEFAULT_MODEL}); pass --model DIR")
        return str(DEFAULT_MODEL)
    return str(model)


def read_model_index(path: Path) -> dict:
    """The parsed ``model_index.json`` of a pipeline folder, with its components checked."""
    if not path.exists():
        raise MemlocError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise MemlocError(f"model path {path} is not a folder (expected a diffusers pipeline folder)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise MemlocError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemlocError(f"{index_file} is not valid JSON: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise MemlocError(f"{index_file} has no pipeline _class_name")
    denoiser = denoiser_component(index, path)
    folder = path / denoiser
    if not (folder / "config.json").is_file():
        raise MemlocError(f"{path} is malformed: {denoiser}/config.json is missing")
    if not _weight_files(folder):
        raise MemlocError(f"the {denoiser} weights are not in {folder} (no .safetensors or .bin file)")
    return index


def denoiser_component(index: dict, where: Path | str = "") -> str:
    """Name of the pipeline component that denoises: ``unet`` or ``transformer``."""
    for name in DENOISERS:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None:
            return name
    raise MemlocError(f"pipeline {index.get('_class_name')} in {where} has no unet or transformer component")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


def stored_dtype(path: str | os.PathLike, component: str) -> torch.dtype | None:
    """The floating dtype in which a component's safetensors weights are stored (None if unknown)."""
    for file in _weight_files(Path(path) / component):
        if file.suffix != ".safetensors":
            continue
        try:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(min(size, 100_000_000)))
        except (OSError, ValueError, struct.error):
            return None
        for key, entry in header.items():
            if key != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def is_hub_id(model: str) -> bool:
    """Whether ``model`` names a hub repository (``owner/name``) rather than an existing local path."""
    return not Path(model).exists() and bool(_HUB_ID.match(str(model)))


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether huggingface.co answers (never when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers/transformers info logs and progress bars while loading."""
    import diffusers
    import transformers

    d_level = diffusers.logging.get_verbosity()
    t_level = transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # e.g. diffusers 0.42 deprecating torch_dtype, which older releases still need
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        diffusers.logging.set_verbosity(d_level)
        transformers.logging.set_verbosity(t_level)
        diffusers.logging.enable_progress_bar()
        transformers.logging.enable_progress_bar()


def _load_error(where: str, exc: BaseException) -> MemlocError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MemlocError(f"cannot load the model from {where}: {first}")


def _source(model: str | os.PathLike | None) -> tuple[str, dict]:
    """Where to load from and the from_pretrained kwargs that keep it offline when it should be."""
    model = resolve_model(model)
    path = Path(model)
    if not is_hub_id(str(model)):
        read_model_index(path)
        return str(path), {"local_files_only": True}
    # a hub id: the local cache first, the network only when the hub answers
    try:
        from huggingface_hub import snapshot_download

        with quiet_libraries():
            snapshot_download(str(model), local_files_only=True, allow_patterns=["model_index.json"])
        return str(model), {"local_files_only": True}
    except Exception:
        if not hub_reachable():
            raise MemlocError(
                f"model {model!r} is neither a local folder nor in the Hugging Face cache, and the hub is not "
                "reachable: its weights are not on this machine"
            ) from None
        return str(model), {}


def load_pipeline(
    model: str | os.PathLike | None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """A diffusers pipeline from a local folder (or a reachable hub id), on ``device`` in ``dtype``.

    The safety checker is not loaded: memorization research needs the raw generations.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, kwargs = _source(model)
    from diffusers import DiffusionPipeline

    index = _index_of(source, kwargs)
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with quiet_libraries():
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype, **kwargs)
    except MemlocError:
        raise
    except Exception as exc:  # diffusers raises OSError/ValueError/KeyError/... for malformed folders
        raise _load_error(source, exc) from None
    if dev.type == "cpu" and torch_dtype == torch.float16:
        # diffusers warns that fp16 cannot run on the CPU; here it only has to hold the weights
        # (prune keeps a checkpoint's stored dtype), and code that generates asks for float32
        with quiet_libraries():
            pipe.to(dev)
    else:
        pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    pipe.memloc_source = source
    return pipe


def load_denoiser(
    model: str | os.PathLike | None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[torch.nn.Module, str]:
    """Only the UNet/transformer of a pipeline (enough to localize or check a mask); returns it and its source."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, kwargs = _source(model)
    index = _index_of(source, kwargs)
    component = denoiser_component(index, source)
    library, class_name = index[component]
    try:
        import importlib

        cls = getattr(importlib.import_module(library), class_name)
        with quiet_libraries():
            denoiser = cls.from_pretrained(source, subfolder=component, torch_dtype=torch_dtype, **kwargs)
    except MemlocError:
        raise
    except Exception as exc:
        raise _load_error(source, exc) from None
    return denoiser.to(dev).eval(), source


def _index_of(source: str, kwargs: dict) -> dict:
    path = Path(source)
    if path.is_dir():
        return read_model_index(path)
    from huggingface_hub import hf_hub_download

    try:
        with quiet_libraries():
            file = hf_hub_download(source, "model_index.json", local_files_only=kwargs.get("local_files_only", False))
            return json.loads(Path(file).read_text())
    except Exception as exc:
        raise _load_error(source, exc) from None


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's UNet or transformer."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise MemlocError(f"pipeline {type(pipe).__name__} has no unet or transformer")
