"""Prompt files: ``.txt`` (one prompt per line), ``.jsonl`` (a ``caption`` field), ``.csv`` (a caption column)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .errors import MemlocError

# CSV columns that hold the prompt, in order of preference (case-insensitive).
CSV_COLUMNS = ("caption", "prompt", "text")


def read_prompts(path: str | os.PathLike, allow_duplicates: bool = False) -> list[str]:
    """The prompts of a prompt file, in file order; blank lines are skipped.

    Raises MemlocError for a missing, unreadable, empty or malformed file and, unless
    ``allow_duplicates``, for a prompt that appears twice (a subset would count it twice).
    """
    path = Path(path)
    if not path.is_file():
        raise MemlocError(f"prompt file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MemlocError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise MemlocError(f"cannot read prompt file {path}: {exc.strerror}") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        entries = _jsonl(path, text)
    elif suffix == ".csv":
        entries = _csv(path, text)
    elif suffix in (".txt", ""):
        entries = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        raise MemlocError(f"prompt file {path} has an unknown type {suffix!r} (use .txt, .jsonl or .csv)")
    if not entries:
        raise MemlocError(f"prompt file {path} holds no prompts")
    if not allow_duplicates:
        seen: dict[str, int] = {}
        for line, prompt in entries:
            if prompt in seen:
                raise MemlocError(
                    f"prompt file {path}: line {line} repeats the prompt of line {seen[prompt]}: {prompt[:60]!r}"
                )
            seen[prompt] = line
    return [prompt for _, prompt in entries]


def _jsonl(path: Path, text: str) -> list[tuple[int, str]]:
    entries = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemlocError(f"prompt file {path}: line {i} is not JSON ({exc.msg})") from None
        caption = record.get("caption") if isinstance(record, dict) else None
        if not isinstance(caption, str):
            raise MemlocError(f"prompt file {path}: line {i} has no string \"caption\" field")
        if not caption.strip():
            raise MemlocError(f"prompt file {path}: line {i} has an empty caption")
        entries.append((i, caption.strip()))
    return entries


def _csv(path: Path, text: str) -> list[tuple[int, str]]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        fields = {name.strip().lower(): name for name in (reader.fieldnames or []) if name}
        column = next((fields[c] for c in CSV_COLUMNS if c in fields), None)
        if column is None:
            raise MemlocError(
                f"prompt file {path} has no caption column (looked for {', '.join(CSV_COLUMNS)}; "
                f"found {', '.join(reader.fieldnames or []) or 'no header'})"
            )
        entries = []
        for row in reader:
            value = row.get(column)
            if value is None or not value.strip():
                raise MemlocError(f"prompt file {path}: line {reader.line_num} has an empty {column!r} value")
            entries.append((reader.line_num, value.strip()))
        return entries
    except csv.Error as exc:
        raise MemlocError(f"prompt file {path} is not valid CSV: {exc}") from None
