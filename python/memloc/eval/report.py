"""Tables of the evaluation as CSV, JSON and Markdown: the paper's Table 1 and the methods summary."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io import atomic_path

TABLE1_COLUMNS = ("model", "prompts", "samples_per_prompt", "identified", "actually_memorized")
TABLE1_HEADERS = ("Model", "Prompts", "Samples / prompt", "Identified as memorized", "Actually memorized")


def fmt(value) -> str:
    """A cell: None as n/a, booleans as yes/no, floats with 4 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns``."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> None:
    """Rows (dicts) as CSV; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def table1_rows(results: Mapping[str, Sequence[Mapping]], with_training: bool) -> list[dict]:
    """The paper's Table 1: per model (e.g. before/after pruning), prompts identified and actually memorized.

    ``results`` maps a model label to its per-prompt rows (dicts with ``identified``,
    ``actually_memorized`` and ``samples``).
    """
    rows = []
    for label, prompt_rows in results.items():
        rows.append(
            {
                "model": label,
                "prompts": len(prompt_rows),
                "samples_per_prompt": prompt_rows[0]["samples"] if prompt_rows else 0,
                "identified": sum(bool(r["identified"]) for r in prompt_rows),
                "actually_memorized": sum(bool(r["actually_memorized"]) for r in prompt_rows)
                if with_training
                else None,
            }
        )
    return rows
