"""The overlay PNG (``mim segment --png``) shows every panel in one convention, 3D Slicer's
(radiological: patient right on the screen's left in axial and coronal views, anterior on the
left in sagittal views), whatever the volume's direction matrix.

Three slabs are labelled by their *world* (RAS) position, so the label map's layout in the
array depends on the direction matrix while the picture must not: a red slab at the patient's
right, a green one anterior, a blue one superior. The rendered PNG is read back; in each panel
(found as the grey CT rectangles) the centroid of each colour must lie on the side that the
panel's edge letters (:func:`edge_letters`, the letters drawn) name.
"""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from mimcore.data.labels import Label
from mimcore.data.volume_io import Volume
from mimcore.inference.overlay import write_overlay_png
from mimcore.inference.ras_views import as_ras, edge_letters, plane_image

SHAPE = (40, 34, 28)
SPACING = np.array([1.0, 1.2, 1.5])
SEGMENTS = [Label(1, "right", (255, 0, 0)), Label(2, "anterior", (0, 255, 0)), Label(3, "superior", (0, 0, 255))]
COLOUR_OF = {"R": 0, "A": 1, "S": 2}  # marker letter -> RGB channel of its colour

# direction matrices (RAS columns of the i, j, k axes)
DIRECTIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    # i -> inferior, j -> left, k -> anterior: permuted, two axes flipped
    "permuted_flipped": np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]),
    # LPS with the slice axis flipped too (k -> inferior), tilted 10 degrees about S
    "LPI_tilted": np.array([[np.cos(0.17), -np.sin(0.17), 0.0], [np.sin(0.17), np.cos(0.17), 0.0], [0, 0, 1]])
    @ np.diag([-1.0, -1.0, -1.0]),
}


def _volume(direction: np.ndarray) -> tuple[Volume, np.ndarray]:
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(SPACING)
    affine[:3, 3] = [12.0, -30.0, 85.0]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(float)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    rel = (world - world.reshape(-1, 3).min(0)) / np.ptp(world.reshape(-1, 3), axis=0)  # 0..1 along R, A, S
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[rel[..., 0] > 0.85] = 1  # patient right: largest RAS x
    labels[rel[..., 1] > 0.85] = 2  # anterior
    labels[rel[..., 2] > 0.85] = 3  # superior
    ct = np.zeros(SHAPE, dtype=np.float32)  # 0 HU: one grey everywhere
    return Volume(ct, affine, "synthetic"), labels


def _runs(on: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of True in a 1D bool array."""
    edges = np.diff(np.concatenate([[0], on.astype(int), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def _panels(img: np.ndarray) -> list[tuple[slice, slice]]:
    """Row and column ranges of the three image panels (the large non-white rectangles), left to right."""
    ink = img[..., :3].min(-1) < 0.9
    out = []
    for c0, c1 in _runs(ink.sum(0) > 100):  # titles and letters are far less than 100 px tall
        if c1 - c0 < 50:
            continue
        r0, r1 = max(_runs(ink[:, c0:c1].sum(1) > 0.5 * (c1 - c0)), key=lambda r: r[1] - r[0])
        out.append((slice(r0, r1), slice(c0, c1)))
    return out


def _centroid(panel: np.ndarray, channel: int) -> np.ndarray:
    """(row, col) centroid, as fractions of the panel, of pixels tinted by a pure-colour label."""
    rgb = panel[..., :3]
    others = [c for c in range(3) if c != channel]
    mask = (rgb[..., channel] - rgb[..., others].max(-1)) > 0.3
    assert mask.sum() > 20, f"colour channel {channel} not found in the panel"
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean() / panel.shape[0], cols.mean() / panel.shape[1]])


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_markers_land_where_the_letters_say(name, tmp_path):
    vol, labels = _volume(DIRECTIONS[name])
    path = write_overlay_png(vol, labels, SEGMENTS, tmp_path / "overlay.png", title=name)
    img = matplotlib.image.imread(path)
    panels = _panels(img)
    assert len(panels) == 3, f"expected 3 CT panels, found {len(panels)}"
    # which markers each panel cuts through (the slices pass through the labels' centre)
    shown = {"axial": ("R", "A"), "coronal": ("R", "S"), "sagittal": ("A", "S")}
    for (rows, cols), plane in zip(panels, ("axial", "coronal", "sagittal")):
        letters = edge_letters(plane)
        for marker in shown[plane]:
            r, c = _centroid(img[rows, cols], COLOUR_OF[marker])
            side = ("left" if c < 0.5 else "right") if marker in (letters["left"], letters["right"]) \
                else ("top" if r < 0.5 else "bottom")
            assert letters[side] == marker, f"{name} {plane}: the {marker} marker is on the {side} ({letters})"


def test_one_convention_as_slicer_shows_it():
    """Radiological axial and coronal, anterior on the left in sagittal, A/S up."""
    assert edge_letters("axial") == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert edge_letters("coronal") == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert edge_letters("sagittal") == {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def test_plane_image_layout():
    """plane_image puts the voxel at patient right/anterior at the screen's top left of an axial slice."""
    arr = np.zeros((4, 3, 2))
    arr[3, 2, 1] = 1.0  # most right, most anterior, most superior (identity affine: RAS)
    ras, spacing = as_ras(arr, np.diag([1.0, 2.0, 3.0, 1.0]))
    np.testing.assert_array_equal(spacing, [1, 2, 3])
    assert plane_image(ras, "axial", 1)[0, 0] == 1.0
    assert plane_image(ras, "coronal", 2)[0, 0] == 1.0
    assert plane_image(ras, "sagittal", 3)[0, 0] == 1.0
