"""Slices of a 3D volume laid out as 3D Slicer shows them, with R/L/A/P/S/I edge letters.

One convention for every picture the project draws (the ``mim segment --png`` overlay,
``mim reconstruct``'s ``levels.png``): Slicer's default slice views, read from
``vtkMRMLSliceNode::Get{Axial,Coronal,Sagittal}SliceToRASMatrix`` with
``patientRightIsScreenLeft = true`` (the default), i.e. radiological:

============  =====================  ==============  ===================
view          screen right           screen up       edge letters L|R, T|B
============  =====================  ==============  ===================
axial (red)   patient Left (-x)      Anterior (+y)   R | L, A | P
coronal       patient Left (-x)      Superior (+z)   R | L, S | I
sagittal      Posterior (-y)         Superior (+z)   A | P, S | I
============  =====================  ==============  ===================

So patient right is on the screen's left in axial and coronal views, and anterior is on
the left in sagittal views. The array is first brought to RAS axis order and sense from
its affine (:func:`as_ras`), so the layout is right for any direction matrix; an oblique
volume is shown along its nearest RAS axes (as Slicer's "snap to volume axes"), and the
letters name those axes.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np

#: plane -> (normal RAS axis, horizontal RAS axis, sign of screen right, vertical RAS axis, sign of screen up)
PLANES: dict[str, tuple[int, int, int, int, int]] = {
    "axial": (2, 0, -1, 1, +1),
    "coronal": (1, 0, -1, 2, +1),
    "sagittal": (0, 1, -1, 2, +1),
}
_LETTERS = {(0, 1): "R", (0, -1): "L", (1, 1): "A", (1, -1): "P", (2, 1): "S", (2, -1): "I"}


def _ras_layout(affine: np.ndarray) -> tuple[tuple[int, int, int], list[bool], np.ndarray]:
    """(perm, flipped, spacing): ``perm[r]`` is the voxel axis closest to RAS axis r (the
    permutation with the largest total |cosine|), ``flipped[r]`` whether it points away from
    R/A/S, ``spacing`` (3,) the voxel sizes along i, j, k in mm."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / np.where(spacing > 0, spacing, 1.0)
    perm = max(permutations(range(3)), key=lambda p: sum(abs(direction[r, p[r]]) for r in range(3)))
    return perm, [bool(direction[r, perm[r]] < 0) for r in range(3)], spacing


def as_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z) on the grid of the (4, 4) voxel->RAS ``affine``, permuted and flipped
    so that index ``[r, a, s]`` increases towards patient Right, Anterior and Superior.

    Returns (that array, a view; its (3,) voxel size in mm along R, A, S).
    """
    perm, flipped, spacing = _ras_layout(affine)
    out = np.transpose(array, perm)
    for r in range(3):
        if flipped[r]:
            out = np.flip(out, r)
    return out, spacing[list(perm)]


def plane_image(ras_array: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2D slice ``index`` (along the plane's normal) of an :func:`as_ras` array, laid out as on
    screen: row 0 at the top, column 0 at the left (draw it with ``imshow(origin="upper")``)."""
    normal, h, right, v, up = PLANES[plane]
    sl = np.take(ras_array, int(index), axis=normal)  # remaining axes in increasing RAS order
    rest = [a for a in range(3) if a != normal]
    img = sl if rest.index(v) == 0 else sl.T  # rows = vertical axis, columns = horizontal axis
    if up > 0:
        img = img[::-1, :]  # top row = the largest index along the "up" direction
    if right < 0:
        img = img[:, ::-1]
    return img


def plane_aspect(spacing_ras: np.ndarray, plane: str) -> float:
    """Pixel height / width for ``imshow(aspect=...)`` so millimetres are square on screen."""
    _, h, _, v, _ = PLANES[plane]
    return float(spacing_ras[v] / spacing_ras[h])


def edge_letters(plane: str) -> dict[str, str]:
    """The patient direction at each screen edge: ``{"left", "right", "top", "bottom"}`` -> letter."""
    _, h, right, v, up = PLANES[plane]
    return {"left": _LETTERS[(h, -right)], "right": _LETTERS[(h, right)],
            "top": _LETTERS[(v, up)], "bottom": _LETTERS[(v, -up)]}


def draw_edge_letters(ax, plane: str, color: str = "#ffd400", fontsize: int = 11) -> None:
    """Write the four orientation letters inside the panel's edges (as Slicer does)."""
    letters = edge_letters(plane)
    style = dict(transform=ax.transAxes, color=color, fontsize=fontsize, fontweight="bold")
    ax.text(0.02, 0.5, letters["left"], ha="left", va="center", **style)
    ax.text(0.98, 0.5, letters["right"], ha="right", va="center", **style)
    ax.text(0.5, 0.98, letters["top"], ha="center", va="top", **style)
    ax.text(0.5, 0.02, letters["bottom"], ha="center", va="bottom", **style)
