"""PNG charts of a report (matplotlib, headless). Each function writes one file and returns its name."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> str:
    """One bar per label, its value written above it; a log axis when the values span > 100x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 3.6))
    bars = ax.bar(labels, values, color="#4878a8")
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 100 * min(positive):
        ax.set_yscale("log")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def stacked_breakdown(path: Path, parts: dict[str, float], title: str) -> str:
    """One horizontal bar split into the step's parts (milliseconds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.0))
    left = 0.0
    colors = plt.get_cmap("tab10")
    for i, (name, ms) in enumerate(parts.items()):
        ax.barh([0], [ms], left=left, color=colors(i), label=f"{name} {ms:.1f} ms")
        left += ms
    ax.set_yticks([])
    ax.set_xlabel("milliseconds per step")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, frameon=False)
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.42)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def line_chart(path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
               title: str, labels: dict[str, list[str]] | None = None, integer_x: bool = False) -> str:
    """One line per named (x, y) series.

    `labels` writes a text beside each point of the named series (a chart of two or three
    k-NN figures says more with the numbers on it); `integer_x` keeps ticks on whole numbers
    (epochs).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, (xs, ys) in series.items():
        few = len(xs) < 30
        ax.plot(xs, ys, marker="o" if few else None, markersize=5 if name in (labels or {}) else 3, label=name)
        for x, y, text in zip(xs, ys, (labels or {}).get(name, [])):
            # the texts of the end points run inwards, away from the axes
            ha = "center" if len(xs) == 1 else "left" if x == min(xs) else "right" if x == max(xs) else "center"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 7), ha=ha, fontsize=8)
    if labels:
        ax.margins(x=0.08, y=0.15)  # room for the texts of the first, last and highest points
    xs_all = sorted({x for xs, _ in series.values() for x in xs})
    if integer_x and len(xs_all) <= 12:
        ax.set_xticks(xs_all)  # a tick at each measured epoch (also when there is a single one)
    elif integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
