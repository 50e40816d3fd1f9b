"""A PNG of a segmentation over three orthogonal slices of its CT (for reports and the demo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mimcore.data.volume_io import Volume


def write_overlay_png(vol: Volume, labels: np.ndarray, segments: list, path: str | Path,
                      window: tuple[float, float] = (-175.0, 250.0), title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the labelled region's centre, labels in their colours.

    vol: the CT, array (X, Y, Z) in its own grid; labels: (X, Y, Z) on the same grid;
    segments: :class:`~mimcore.data.labels.Label` objects (value, name, color). Slices are
    shown in the RAS sense (anterior up on axial, superior up on coronal and sagittal),
    with the voxel spacing as aspect ratio.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if labels.shape != vol.shape:
        raise ValueError(f"labels {labels.shape} and volume {vol.shape} must share a grid")
    # bring the array to RAS axis order/sense so views are oriented as a radiologist expects
    order = np.abs(vol.direction_ras).argmax(axis=0)
    perm = np.argsort(order)
    ct, lab = np.transpose(vol.array, perm), np.transpose(labels, perm)
    spacing = vol.spacing[perm]
    for axis in range(3):
        if vol.direction_ras[axis, perm[axis]] < 0:
            ct, lab = np.flip(ct, axis), np.flip(lab, axis)
    centre = np.argwhere(lab > 0).mean(0).round().astype(int) if lab.any() else np.array(ct.shape) // 2
    lut = np.zeros((int(labels.max(initial=0)) + 1, 4))
    for seg in segments:
        if seg.value < len(lut):
            lut[seg.value] = [*(np.asarray(seg.color) / 255.0), 0.45]
    views = [("axial", ct[:, :, centre[2]], lab[:, :, centre[2]], spacing[1] / spacing[0]),
             ("coronal", ct[:, centre[1], :], lab[:, centre[1], :], spacing[2] / spacing[0]),
             ("sagittal", ct[centre[0], :, :], lab[centre[0], :, :], spacing[2] / spacing[1])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, img, seg, aspect) in zip(axes, views):
        # transpose so the second array axis runs up the screen; for axial flip L-R (radiological view)
        shown_ct, shown_lab = img.T, seg.T
        if name == "axial":
            shown_ct, shown_lab = shown_ct[:, ::-1], shown_lab[:, ::-1]
        ax.imshow(np.clip(shown_ct, *window), cmap="gray", origin="lower", aspect=aspect, interpolation="nearest")
        ax.imshow(lut[shown_lab.astype(int)], origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    present = {int(v) for v in np.unique(labels)} - {0}
    handles = [Patch(color=np.asarray(s.color) / 255.0, label=s.name) for s in segments if s.value in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
