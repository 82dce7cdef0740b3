"""Pack a model folder into a tar split into parts of at most N MB (to fit per-file transfer limits), and back."""

# ``python -m memloc.train.pack MODEL_DIR OUT_DIR [--part-mb 15]`` writes OUT_DIR/model.tar.00, .01, ...;
# unpack with ``cat OUT_DIR/model.tar.* | tar -x -C DEST`` or :func:`unpack`.

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

from ..errors import MemlocError


def pack(folder: str | Path, out_dir: str | Path, part_mb: float = 15.0, name: str = "model.tar") -> list[Path]:
    """Tar ``folder`` (entries under its own name) and split into ``out_dir/name.00``, ``.01``, ..."""
    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise MemlocError(f"cannot pack {folder}: not a folder")
    part_bytes = int(part_mb * 1_000_000)
    if part_bytes < 1:
        raise MemlocError(f"--part-mb must be positive, got {part_mb}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(Path(folder.name) / path.relative_to(folder)), recursive=False)
    data = buf.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{name}.[0-9][0-9]"):
        old.unlink()
    parts = []
    for i, start in enumerate(range(0, len(data), part_bytes)):
        part = out_dir / f"{name}.{i:02d}"
        part.write_bytes(data[start : start + part_bytes])
        parts.append(part)
    return parts


def unpack(parts: list[str | Path], dest: str | Path) -> None:
    """Join the parts (in name order) and extract into ``dest``."""
    data = b"".join(Path(p).read_bytes() for p in sorted(parts, key=lambda p: str(p)))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse links and paths outside dest
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memloc.train.pack", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="model folder to pack")
    parser.add_argument("out_dir", help="folder for the parts")
    parser.add_argument("--part-mb", type=float, default=15.0, help="largest part, in MB of 10^6 bytes (default 15)")
    args = parser.parse_args(argv)
    parts = pack(args.folder, args.out_dir, args.part_mb)
    for p in parts:
        print(f"{p} {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
