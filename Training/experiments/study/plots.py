"""The study's figure: validation Dice versus fine-tuning step, mean over seeds."""

from __future__ import annotations

import math
from pathlib import Path

from study.stats import mean_sd


def plot_curves(results: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean over classes"] + results["classes"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(results["arms"]):
        seeds = row["seeds"]
        if not seeds:
            continue
        steps = sorted({s for rec in seeds.values() for s in rec["curve"]})
        for p, panel in enumerate(panels):
            ax = axes[p // cols][p % cols]
            xs, ms, sds = [], [], []
            for step in steps:
                vals = []
                for rec in seeds.values():
                    point = rec["curve"].get(step)
                    if point is None:
                        continue
                    vals.append(point["dice"] if p == 0 else point["per_class"].get(panel))
                m, s = mean_sd(vals)
                if m is not None:
                    xs.append(step), ms.append(m), sds.append(s or 0.0)
            if not xs:
                continue
            style = "--" if row["method"] == "scratch" else "-"
            ax.plot(xs, ms, style, marker="o", ms=3, color=colors(i % 10), label=f"{row['title']} (n={len(seeds)})")
            if len(seeds) > 1:
                ax.fill_between(xs, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)],
                                color=colors(i % 10), alpha=0.12, linewidth=0)
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= len(panels):
            ax.axis("off")
            continue
        ax.set_title(f"validation Dice: {panels[p]}", fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylim(0, 1)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("Validation Dice during fine-tuning (mean ± sd over seeds; dashed: from scratch)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
