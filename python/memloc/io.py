"""File helpers: outputs appear whole or not at all (write to a temp file, then rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import MemlocError

#: Written into every output folder memloc makes: only such a folder (or an empty one) is replaced.
MARKER = ".memloc-output"


def check_output_folder(path: str | os.PathLike) -> Path:
    """An output folder may be new, empty, or one that memloc wrote (it is then replaced whole)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MemlocError(f"output path {path} is a file, expected a folder")
    resolved, here = path.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise MemlocError(f"output folder {path} is the current folder or holds it; name a new folder")
    if path.is_dir() and not (path / MARKER).exists() and any(path.iterdir()):
        raise MemlocError(
            f"output folder {path} exists and holds files memloc did not write; name another folder or remove it"
        )
    return path


def check_apart(out: str | os.PathLike, **inputs: str | os.PathLike | None) -> None:
    """Refuse an output that would overwrite an input: the same path, or one inside the other.

    ``inputs`` maps a name for the message (e.g. ``stats``) to a path (None: not given).
    """
    target = Path(out).resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise MemlocError(f"output {out} would overwrite the {name.replace('_', ' ')} {path}")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before long work, if ``path``'s folder cannot take a new file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise MemlocError(f"output folder {parent} is a file")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MemlocError(f"cannot create output folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise MemlocError(f"output folder {parent} is not writable")
    if path.is_dir():
        raise MemlocError(f"output path {path} is a folder, expected a file")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, else it is removed.

    The folder gets the :data:`MARKER` file, so that a later run may replace it (check_output_folder).
    """
    path = check_output_folder(path)
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise MemlocError(f"output folder {parent} is a file")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MemlocError(f"cannot create output folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise MemlocError(f"output folder {parent} is not writable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / MARKER).write_text("written by memloc, which replaces this folder when asked to write it again\n")
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
