"""A PNG of a segmentation over three orthogonal slices of its CT (for reports and the demo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mimcore.data.volume_io import Volume


def write_overlay_png(vol: Volume, labels: np.ndarray, segments: list, path: str | Path,
                      window: tuple[float, float] = (-175.0, 250.0), title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the labelled region's centre, labels in their colours.

    vol: the CT, array (X, Y, Z) in its own grid; labels: (X, Y, Z) on the same grid;
    segments: :class:`~mimcore.data.labels.Label` objects (value, name, color). The slices
    are laid out as 3D Slicer shows them, for any direction matrix (worked out from
    ``vol.affine``): radiological, patient right on the screen's left in the axial and
    coronal views, anterior on the left in the sagittal view, anterior/superior up; each
    panel carries R/L/A/P/S/I letters on its edges (:mod:`mimcore.inference.ras_views`).
    Millimetres are square on screen. Written atomically (``mimcore.files.atomic_write``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from mimcore.files import atomic_write
    from mimcore.inference.ras_views import as_ras, draw_edge_letters, plane_aspect, plane_image

    if labels.shape != vol.shape:
        raise ValueError(f"labels {labels.shape} and volume {vol.shape} must share a grid")
    # bring both arrays to RAS axis order and sense, so every view follows one convention
    ct, spacing = as_ras(vol.array, vol.affine)
    lab, _ = as_ras(labels, vol.affine)
    centre = np.argwhere(lab > 0).mean(0).round().astype(int) if lab.any() else np.array(ct.shape) // 2
    lut = np.zeros((int(labels.max(initial=0)) + 1, 4))
    for seg in segments:
        if seg.value < len(lut):
            lut[seg.value] = [*(np.asarray(seg.color) / 255.0), 0.45]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (plane, normal) in zip(axes, (("axial", 2), ("coronal", 1), ("sagittal", 0))):
        shown_ct = plane_image(ct, plane, centre[normal])
        shown_lab = plane_image(lab, plane, centre[normal])
        aspect = plane_aspect(spacing, plane)
        ax.imshow(np.clip(shown_ct, *window), cmap="gray", vmin=window[0], vmax=window[1], origin="upper",
                  aspect=aspect, interpolation="nearest")
        ax.imshow(lut[shown_lab.astype(int)], origin="upper", aspect=aspect, interpolation="nearest")
        draw_edge_letters(ax, plane)
        ax.set_title(plane)
        ax.axis("off")
    present = {int(v) for v in np.unique(labels)} - {0}
    handles = [Patch(color=np.asarray(s.color) / 255.0, label=s.name) for s in segments if s.value in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)
    return path
