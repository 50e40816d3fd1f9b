"""The PNG of a fine-tuning run's curves: training loss and validation Dice per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def plot_curves(metrics_path: Path, val_path: Path, png: Path) -> Path:
    """Left: DiceCE loss per step (and a running mean); right: mean and per-class validation Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(metrics_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    vals = [json.loads(ln) for ln in Path(val_path).read_text(encoding="utf-8").splitlines() if ln.strip()] \
        if Path(val_path).exists() else []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    ax1.plot(steps, losses, lw=1, alpha=0.5, label="loss")
    window = max(1, len(rows) // 10)
    if len(rows) >= window:
        ax1.plot(steps[window - 1:], np.convolve(losses, np.ones(window) / window, mode="valid"), "k", lw=2,
                 label=f"mean of {window}")
    ax1.set(title="training loss (DiceCE)", xlabel="step")
    if vals:
        vs = [v["step"] for v in vals]
        ax2.plot(vs, [v["dice"] for v in vals], "k-o", lw=2, label="mean")
        for name in vals[-1]["per_class"]:
            ys = [np.nan if v["per_class"].get(name) is None else v["per_class"][name] for v in vals]
            ax2.plot(vs, ys, lw=1, alpha=0.7, label=name)
    ax2.set(title="validation Dice", xlabel="step", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
