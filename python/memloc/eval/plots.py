"""Figures like the paper's 3 and 4: quality against memorization, and seconds per image, as PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def quality_vs_memorization(
    path: str | Path,
    rows: Sequence[Mapping],
    *,
    x: str,
    y: str,
    xlabel: str,
    ylabel: str,
    label: str = "method",
    title: str | None = None,
) -> None:
    """One labelled point per row at ``(row[x], row[y])`` (rows lacking either value are left out)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=150)
    points = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    for i, r in enumerate(points):
        ax.scatter([r[x]], [r[y]], s=60, color=f"C{i}", label=str(r[label]), zorder=3)
        # staggered labels stay readable when methods land on one point
        ax.annotate(str(r[label]), (r[x], r[y]), textcoords="offset points", xytext=(6, 4 + 10 * i), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if points:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def seconds_bars(
    path: str | Path,
    rows: Sequence[Mapping],
    *,
    key: str = "seconds_per_image",
    label: str = "method",
    ylabel: str = "seconds per image",
    title: str | None = None,
) -> None:
    """A bar per row of ``row[key]`` with its value written on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=150)
    names = [str(r[label]) for r in rows]
    values = [float(r[key]) for r in rows]
    bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(rows))])
    for bar, value in zip(bars, values):
        ax.annotate(
            f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
