"""PNG charts of a report (matplotlib, headless). Each function writes one file and returns its name."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
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
               title: str) -> str:
    """One line per named (x, y) series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
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
