"""bench_segment's inputs: the two test volumes and the preprocessing every model gets."""

from __future__ import annotations

import math

N_CLASSES = 14
PREP = {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "hu_min": -175, "hu_max": 250}  # --spacing sets it
BIG_SHAPE = (512, 512, 400)
BIG_SPACING = (0.8, 0.8, 1.0)
QUICK_SHAPE = (160, 160, 128)  # --quick: the same CT, fewer voxels of the same size
ROI = {"base": 96, "small": 64, "swin": 96}


def big_shape(quick: bool = False) -> tuple[int, int, int]:
    return QUICK_SHAPE if quick else BIG_SHAPE


def big_volume(shape: tuple[int, int, int] = BIG_SHAPE):
    """The synthetic 512 x 512 x 400 CT (float32 HU, 0.8 x 0.8 x 1 mm, LPS-stored), slice by slice;
    ``shape``: fewer voxels (``--quick``), the body scaled with the field of view."""
    import numpy as np

    from mimcore.data.volume_io import Volume

    nx, ny, nz = shape
    scale = nx / BIG_SHAPE[0]
    sx, sy, sz = BIG_SPACING
    arr = np.empty(shape, dtype=np.float32)
    rng = np.random.default_rng(0)
    x = ((np.arange(nx, dtype=np.float32) - nx / 2) * sx)[:, None]  # mm from the centre
    y = ((np.arange(ny, dtype=np.float32) - ny / 2) * sy)[None, :]
    x, y = x / scale, y / scale  # --quick: the same anatomy in a smaller field of view
    body = (x / 170) ** 2 + (y / 120) ** 2 <= 1
    spine = (x / 18) ** 2 + ((y - 75) / 18) ** 2 <= 1
    for k in range(nz):
        z = k * sz * BIG_SHAPE[2] / nz  # mm from the bottom slice; lungs in the upper half, liver below them
        s = np.full((nx, ny), -1000.0, dtype=np.float32)
        s[body] = 40.0
        for cx in (-75.0, 75.0):
            f = 1 - ((z - 430) / 150) ** 2
            if f > 0:
                s[((x - cx) / (60 * math.sqrt(f))) ** 2 + ((y + 5) / (80 * math.sqrt(f))) ** 2 <= 1] = -850.0
        f = 1 - ((z - 230) / 90) ** 2
        if f > 0:
            s[((x + 60) / (95 * math.sqrt(f))) ** 2 + ((y + 10) / (75 * math.sqrt(f))) ** 2 <= 1] = 60.0
        s[spine] = 700.0
        s += rng.standard_normal((nx, ny), dtype=np.float32) * 20.0
        arr[:, :, k] = s
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [nx / 2 * sx, ny / 2 * sy, -300.0]
    return Volume(arr, affine, source=f"synthetic {'x'.join(map(str, shape))} CT")


def write_big(path: str, quick: bool = False) -> str:
    """The synthetic CT written as a CT scanner's file would be (int16 HU, .nrrd): the input of
    the end-to-end (read -> write .seg.nrrd) measurements."""
    import numpy as np

    from mimcore.data.volume_io import save_volume

    vol = big_volume(big_shape(quick))
    save_volume(path, np.round(vol.array), vol.affine, dtype=np.int16)
    return path


def load_case(case: str, sample_path: str | None, big_path: str | None = None, quick: bool = False):
    from mimcore.data.volume_io import load_volume

    if case == "big":
        return load_volume(big_path) if big_path else big_volume(big_shape(quick))
    return load_volume(sample_path)


def ras_shape(vol):
    """The shape ``vol`` has after the benchmark's preprocessing (RAS, 1.5 mm)."""
    import numpy as np

    from mimcore.inference.segment import ras_order

    shape, spacing = ras_order(vol, vol.shape), ras_order(vol, vol.spacing)
    return np.array([max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, PREP["spacing"])])
