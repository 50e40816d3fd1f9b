"""``mim reconstruct`` outputs -> volume nodes, one subject-hierarchy folder per level.

``mim reconstruct --output DIR`` writes ``DIR/summary.json`` and, per level ``l`` and
volume ``v`` of that level (level 1: 1 volume, level 2: 4, level 3: 16),
``DIR/level<l>/vol<vv>_{hidden,reconstruction,original}.nii.gz`` in HU, each file
placed where its region is in the patient (world RAS: the CT was written with its
parent transform hardened). ``summary.json`` lists them with their IJK-to-RAS
(``levels[i].volumes[j].affine``) and the HU window the network saw
(``preprocessing.hu_min/hu_max``).

:func:`load_reconstruction` loads every file as a scalar volume node (not under any
transform: the files are in world coordinates), in folders::

    MiM preview - <volume>            (subject-hierarchy folder)
      Level 1 / Level 2 / Level 3     (one folder per level)
        L2.01 hidden input, L2.01 reconstruction, L2.01 original, ...

with the window/level of the network's HU window (the same for the three roles, so
they compare), and returns ``{level: {"input", "reconstruction", "original": node of
the level's volume nearest the crop centre, "volumes": [{"index", "input",
"reconstruction", "original", "loss"}, ...] (all of them), "loss", "folder": item ID,
"summary": the level's entry of summary.json (file names, affines, octants) plus its "crop"}}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import slicer

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.scenes import node_ids, remove_nodes_added_since
from MiMSlicerLib.volumes import ijk_to_ras, load_volume

ROLES = {"hidden": "input", "reconstruction": "reconstruction", "original": "original"}  # file role -> key
ROLE_TITLES = {"hidden": "hidden input", "reconstruction": "reconstruction", "original": "original"}
DEFAULT_WINDOW = (-1000.0, 1000.0)  # HU, the published pre-training window


def read_summary(output_dir: str | os.PathLike) -> dict:
    """``summary.json`` of a ``mim reconstruct`` output folder."""
    path = Path(output_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MiMSlicerError(f"The reconstruction did not leave a readable {path} ({e}).") from None
    if not isinstance(summary.get("levels"), list) or not summary["levels"]:
        raise MiMSlicerError(f"{path} lists no levels; the reconstruction output is incomplete.")
    return summary


def region_center(volume_node) -> np.ndarray:
    """``(3,)`` world RAS of the centre of a volume node's voxel grid."""
    dims = np.array(volume_node.GetImageData().GetDimensions(), dtype=np.float64)
    return (ijk_to_ras(volume_node) @ np.append((dims - 1) / 2.0, 1.0))[:3]


def _set_window(node, hu_min: float, hu_max: float) -> None:
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(hu_max - hu_min, (hu_max + hu_min) / 2.0)


def _sh_item(sh, node, parent: int) -> int:
    """``node``'s subject-hierarchy item, created if the scene has none for it (outside
    Slicer no plugin logic creates items), moved under ``parent``."""
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)
    return item


def load_reconstruction(output_dir: str | os.PathLike, scene, title: str,
                        center_ras=None) -> dict[int, dict]:
    """Load a ``mim reconstruct`` output folder into ``scene`` (see the module doc).

    title:      shown in the root folder's name (e.g. the CT's name).
    center_ras: the requested crop centre; each level's ``input/reconstruction/original``
                are those of its volume whose centre is nearest to it (default: the crop
                centre from summary.json).
    On failure nothing is left in the scene.
    """
    output_dir = Path(output_dir)
    summary = read_summary(output_dir)
    prep = summary.get("preprocessing") or {}
    hu_min, hu_max = float(prep.get("hu_min", DEFAULT_WINDOW[0])), float(prep.get("hu_max", DEFAULT_WINDOW[1]))
    target = np.asarray(center_ras if center_ras is not None else summary["crop"]["center_ras"], dtype=np.float64)

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise MiMSlicerError("The scene has no subject hierarchy; cannot group the preview volumes.")
    before = node_ids(scene)
    root = sh.CreateFolderItem(sh.GetSceneItemID(), scene.GenerateUniqueName(f"MiM preview - {title}"))
    try:
        result: dict[int, dict] = {}
        for level in summary["levels"]:
            number = int(level["level"])
            folder = sh.CreateFolderItem(root, f"Level {number}")
            volumes = []
            for entry in level["volumes"]:
                index = int(entry["index"])
                item = {"index": index, "loss": entry.get("loss")}
                for role, key in ROLES.items():
                    node = load_volume(output_dir / entry["files"][role], scene,
                                       name=f"L{number}.{index:02d} {ROLE_TITLES[role]}")
                    _set_window(node, hu_min, hu_max)
                    _sh_item(sh, node, folder)
                    item[key] = node
                volumes.append(item)
            nearest = min(volumes, key=lambda v: (np.linalg.norm(region_center(v["original"]) - target), v["index"]))
            result[number] = {"input": nearest["input"], "reconstruction": nearest["reconstruction"],
                              "original": nearest["original"], "volumes": volumes, "loss": level.get("loss"),
                              "folder": folder, "summary": dict(level, crop=summary.get("crop"))}
        return result
    except Exception:
        sh.RemoveItem(root, True, True)  # the folders, and the volumes in them
        remove_nodes_added_since(scene, before)  # display nodes, and volumes not yet in a folder
        raise
