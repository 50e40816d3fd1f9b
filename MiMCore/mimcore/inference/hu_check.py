"""Does an input look like CT in Hounsfield units? A warning before a CT model segments it.

A CT-trained model windows intensities to its HU range (e.g. -175..250 HU); an MRI, an
8-bit image or a CT stored without its rescale intercept passes through the same window
and is segmented without a word. CT of a body almost always contains air or lung
(about -1000 HU) somewhere in the field of view, so a volume whose lowest values lie well
above that is unlikely to be HU. The check is a heuristic: it warns, it never refuses.
"""

from __future__ import annotations

import numpy as np

#: a CT in HU normally has voxels below this (air, lung, the scanner's outside-FOV value)
AIR_HU = -500.0


def intensity_range(array: np.ndarray, max_samples: int = 2_000_000) -> tuple[float, float]:
    """The (min, max) of ``array``, from a strided subsample for big volumes (cheap)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // max_samples)
    sample = flat[::step]
    return float(sample.min()), float(sample.max())


def hu_warning(array: np.ndarray, preprocessing: dict, model: str, source: str = "the input") -> str | None:
    """A warning when ``array`` does not look like CT in HU for a model trained with
    ``preprocessing`` (the bundle's: ``hu_min``/``hu_max`` window, optional ``modality``);
    None when it does, or when the model was not trained on CT."""
    modality = str(preprocessing.get("modality", "CT")).upper()
    if modality != "CT" or array.size == 0:
        return None
    lo, hi = intensity_range(array)
    if lo <= AIR_HU:
        return None
    if lo >= 0 and hi <= 255:
        kind = "an 8-bit image (values 0..255)"
    elif lo >= 0:
        kind = "non-negative values (MRI, or CT stored without its rescale intercept)"
    else:
        kind = f"no voxel below {AIR_HU:g} (no air, which a CT of the body has)"
    window = f"{preprocessing.get('hu_min', '?')}..{preprocessing.get('hu_max', '?')} HU"
    return (f"{source}: intensities {lo:g}..{hi:g} do not look like CT in Hounsfield units: {kind}. "
            f"The model {model} was trained on CT, windowed to {window}; on other images its labels "
            "are likely wrong. Convert the image to HU (apply the DICOM rescale slope/intercept) or use "
            "a model trained on this kind of image.")
