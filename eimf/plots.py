"""Plots logged as run artifacts (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple


def learning_curve(points: Sequence[Tuple[int, float]], path: str | Path, ylabel: str) -> None:
    import matplotlib  # the Agg backend must be chosen before pyplot loads; and only when a plot is made

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, values = zip(*points)
    ax.plot(steps, values, marker="o", markersize=3)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
