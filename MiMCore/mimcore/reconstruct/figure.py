"""``levels.png`` of ``mim reconstruct``: one row per level, columns original / hidden input /
reconstruction, drawn so that the picture says what the viewer sees.

* Every panel is the middle axial slice of its volume, laid out as 3D Slicer shows it
  (radiological, R/L/A/P letters; :mod:`mimcore.inference.ras_views`).
* One grey window per row, shared by its three panels and written next to it
  (:func:`display_window`): the level's originals' 1st-99th HU percentile inside the
  model's HU window, at least a quarter of that window wide, so air noise stays flat
  instead of being stretched into texture.
* Hidden regions are tinted orange in the hidden input, regions outside the volume (padding)
  blue in every panel; each row says its loss, the loss of predicting the mean, and its
  padding fraction.
* The heading says the checkpoint's step, the crop's padding, and, when the reconstruction
  loss is no better than predicting the mean (:func:`learning_warning`), that the model has
  not learned yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

HIDDEN_RGBA = (1.0, 0.55, 0.0, 0.35)
PADDING_RGBA = (0.15, 0.45, 1.0, 0.45)
#: a loss at least this fraction of the mean-prediction baseline counts as "not learned yet"
NOT_LEARNED_RATIO = 0.9


@dataclass
class SheetRow:
    """One row of the sheet. Arrays are one level volume's (S, S, S) on the grid of ``affine``.

    arrays: {"original", "hidden", "reconstruction"} -> HU; hidden: bool, True where hidden
    from the model; padding: bool, True outside the source volume; window: (low, high) HU of
    the grey scale, shared by the row's three panels.
    """

    title: str
    arrays: dict[str, np.ndarray]
    affine: np.ndarray
    hidden: np.ndarray
    padding: np.ndarray
    window: tuple[float, float]
    loss: float
    baseline: float


def display_window(originals: np.ndarray, padding: np.ndarray | None, hu_window: tuple[float, float],
                   min_fraction: float = 0.25) -> tuple[float, float]:
    """(low, high) HU of one level's grey scale.

    originals: (N, S, S, S) HU of the level's volumes; padding: same shape bool or None (padding
    is ignored); hu_window: the model's (hu_min, hu_max). The 1st-99th percentile of the voxels
    inside the volume, clipped to ``hu_window`` and widened (within it) to at least
    ``min_fraction`` of its width.
    """
    lo_w, hi_w = float(hu_window[0]), float(hu_window[1])
    values = originals[~padding] if padding is not None else originals.reshape(-1)
    if values.size == 0:
        return lo_w, hi_w
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    lo, hi = max(lo, lo_w), min(hi, hi_w)
    need = min_fraction * (hi_w - lo_w)
    if hi - lo < need:
        mid = min(max((lo + hi) / 2, lo_w + need / 2), hi_w - need / 2)
        lo, hi = mid - need / 2, mid + need / 2
    return lo, hi


def learning_warning(losses: list[float], baselines: list[float], step, is_mim: bool) -> tuple[float, str | None]:
    """(mean loss / baseline ratio over the levels, a plain warning or None).

    The baseline of a level is the loss of predicting every hidden token's mean (MiM's
    norm-pix target: 0 everywhere, about 1.0) or every hidden voxel as the mean of the visible
    ones (MAE, SimMIM, GMIM). A ratio of :data:`NOT_LEARNED_RATIO` or more means the
    reconstructions show (almost) nothing the mean does not.
    """
    pairs = [(l, b) for l, b in zip(losses, baselines) if np.isfinite(l) and np.isfinite(b) and b > 0]
    if not pairs:
        return float("nan"), None
    ratio = float(np.mean([l / b for l, b in pairs]))
    if ratio < NOT_LEARNED_RATIO:
        return ratio, None
    at = f" at step {step}" if step is not None else ""
    what = "each hidden token's mean" if is_mim else "the mean of the visible voxels for every hidden voxel"
    levels = "; ".join(f"level {i} {l:.3f} vs {b:.3f}" for i, (l, b) in enumerate(pairs, start=1))
    seen = (" The flat blocks in the reconstructions are those means, not anatomy it learned." if is_mim else "")
    return ratio, (f"the model has not learned yet{at}: its reconstruction loss is {100 * ratio:.0f}% of the loss "
                   f"of predicting {what} ({levels}).{seen} Pre-train longer before reading anything into it.")


def _axial(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from mimcore.inference.ras_views import as_ras, plane_image

    ras, _ = as_ras(array, affine)
    return plane_image(ras, "axial", ras.shape[2] // 2)


def write_sheet(path: Path, rows: list[SheetRow], heading: str, lines: list[str] = (),
                warning: str | None = None) -> Path:
    """Draw ``rows`` (see :class:`SheetRow`) under ``heading``, the explanation ``lines`` and,
    in red, ``warning``; write the PNG atomically. Returns ``path``."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from mimcore.files import atomic_write
    from mimcore.inference.ras_views import as_ras, draw_edge_letters, plane_aspect

    cols = (("original", "original"), ("hidden", "hidden input (orange: hidden)"),
            ("reconstruction", "reconstruction"))
    text = [heading, *lines]
    warn = textwrap.fill("WARNING: " + warning, 110) if warning else ""
    head_in = 0.18 * (sum(len(textwrap.wrap(t, 110)) or 1 for t in text) + (warn.count("\n") + 1 if warn else 0)) + 0.3
    fig_h = 3.0 * len(rows) + head_in + 0.4
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, fig_h), squeeze=False)
    for r, row in enumerate(rows):
        _, spacing = as_ras(row.arrays["original"], row.affine)
        aspect = plane_aspect(spacing, "axial")
        pad = _axial(row.padding, row.affine)
        hid = _axial(row.hidden, row.affine)
        for c, (role, label) in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(_axial(row.arrays[role], row.affine), cmap="gray", vmin=row.window[0], vmax=row.window[1],
                      origin="upper", aspect=aspect, interpolation="nearest")
            tint = np.zeros(pad.shape + (4,))
            if role == "hidden":
                tint[hid] = HIDDEN_RGBA
            tint[pad] = PADDING_RGBA
            ax.imshow(tint, origin="upper", aspect=aspect, interpolation="nearest")
            draw_edge_letters(ax, "axial", fontsize=8)
            if r == 0:
                ax.set_title(label, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{row.title}\nloss {row.loss:.3f} (mean: {row.baseline:.3f})\n"
                              f"{100 * float(row.padding.mean()):.0f}% padding\n"
                              f"grey {row.window[0]:.0f}..{row.window[1]:.0f} HU", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=HIDDEN_RGBA, label="hidden from the model"),
               Patch(color=PADDING_RGBA, label="outside the volume (padding, air)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8)
    top = 1 - head_in / fig_h
    y = 1 - 0.15 / fig_h
    for t in text:
        wrapped = textwrap.fill(t, 110)
        fig.text(0.5, y, wrapped, ha="center", va="top", fontsize=9 if t is heading else 8)
        y -= 0.18 * (wrapped.count("\n") + 1) / fig_h
    if warn:
        fig.text(0.5, y, warn, ha="center", va="top", fontsize=9, color="#c00000", fontweight="bold")
    fig.tight_layout(rect=(0, 0.4 / fig_h, 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path
