"""The voxel size of ``mim reconstruct``'s preview, and what to say when its crop is padding.

A model sees crops of a fixed number of voxels; at a thick-slice CT's native spacing a
128-voxel crop can be 640 mm tall against a 305 mm volume, so most level volumes would lie
outside the patient. ``--spacing`` chooses the preview's grid:

* ``auto`` (default): the spacing the checkpoint was pre-trained at, when it records one
  (``preprocessing.spacing``); else the volume's native spacing, and a note says plainly
  why it cannot resample (a checkpoint pre-trained at native spacing does not record the
  voxel size of its training CTs) and what to pass instead;
* ``native``: no resampling;
* ``X Y Z``: resample to this voxel size (mm, along the RAS-oriented axes).

Resampling is MONAI ``Spacingd`` on the oriented grid, and every written volume carries the
affine of the grid it is on, so the files stay at their true position in the patient (the
crop's RAS centre is the requested one to within a voxel).
"""

from __future__ import annotations

import dataclasses

import numpy as np



def parse_spacing_arg(values) -> str | tuple[float, float, float]:
    """``--spacing`` words -> "auto", "native" or three sizes in mm (MimError otherwise)."""
    from mimcore.data.preprocess import parse_spacing_option

    return "auto" if values is None else parse_spacing_option(values, ("auto", "native"))


def preview_preprocessing(trained, spacing="auto"):
    """(the :class:`~mimcore.data.preprocess.Preprocessing` of the preview, a JSON-able description).

    trained: the checkpoint's preprocessing; spacing: "auto", "native" or (3,) mm.
    """
    spacing = parse_spacing_arg(spacing) if isinstance(spacing, (str, list)) else spacing
    if spacing == "auto":
        used = trained.spacing
    elif spacing == "native":
        used = None
    else:
        used = tuple(float(v) for v in spacing)
    prep = dataclasses.replace(trained, spacing=used)  # validated again by __post_init__

    def word(s):
        return "native" if s is None else [float(v) for v in s]

    info = {"requested": spacing if isinstance(spacing, str) else [float(v) for v in spacing],
            "used": word(prep.spacing), "trained": word(trained.spacing)}
    return prep, info


def padding_note(crop, size: int, prep, trained) -> str | None:
    """What to tell the user when the crop is partly padding (None when it is not): how much,
    and whether moving ``--center`` can help or only ``--spacing`` can (the crop is larger
    than the volume along an axis)."""
    if crop.padded_fraction <= 0:
        return None
    from mimcore.reconstruct.crop import ras_bounds

    def fmt(v):
        return "(" + ", ".join(f"{x:.1f}" for x in np.asarray(v, dtype=np.float64)) + ")"

    lo, hi = ras_bounds(crop.affine, (size,) * 3)
    crop_ext = hi - lo
    vol_ext = crop.volume_bounds[1] - crop.volume_bounds[0]
    voxel = np.linalg.norm(np.asarray(crop.affine)[:3, :3], axis=0)
    msg = (f"the {size}^3 crop around {fmt(crop.center_ras)} extends beyond the volume: "
           f"{100 * crop.padded_fraction:.1f}% of it is padding (value {prep.hu_min:g} HU, air).")
    larger = [a for a in range(3) if crop_ext[a] > vol_ext[a] + 1e-3]
    if not larger:
        return msg + " Move --center inside to avoid it."
    sizes = ", ".join(f"{'RAS'[a]} {crop_ext[a]:.0f} mm against the volume's {vol_ext[a]:.0f} mm" for a in larger)
    msg += (f" At {' x '.join(f'{v:.2g}' for v in voxel)} mm voxels the crop is larger than the volume "
            f"({sizes}), so moving --center cannot avoid it.")
    if prep.spacing is None and trained.spacing is None:
        msg += (" The checkpoint was pre-trained at native spacing and does not record its training CTs' voxel "
                "size, so the preview cannot resample to it by itself: pass --spacing X Y Z (mm, e.g. the voxel "
                "size of the CTs it was pre-trained on) to resample the preview; the files stay placed in the patient.")
    elif prep.spacing is None:
        msg += (f" Drop --spacing native to resample the preview to the checkpoint's training spacing "
                f"{fmt(trained.spacing)} mm.")
    else:
        msg += (" The volume is smaller than the model's crop at this voxel size: the padding is part of what "
                "the model sees.")
    return msg
