"""Segmentation nodes <-> label map files, with segment names matched to a model's labels.

A *label list* is what a model bundle's ``model.json`` holds::

    [{"value": 1, "name": "liver", "color": [221, 130, 101]}, ...]   # colour 0-255, background not listed

* :func:`export_labelmap` writes a segmentation as one label map on a reference
  volume's voxel grid (its world geometry, as :func:`MiMSlicerLib.volumes.write_volume`
  writes the volume itself), the segment matching label ``i`` of ``label_names``
  getting value ``values[i]`` (default ``i + 1``). Segments overlapping each other:
  the later label wins. Uses Slicer's own
  ``vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry``
  (which also resamples segments drawn on another grid or under another transform),
  so nothing is added to the scene.
* :func:`import_labelmap` turns a label map file (e.g. ``mim segment``'s output, on
  exactly the reference volume's grid) into a segmentation node with one named,
  coloured segment per label (empty segments for labels the file does not contain),
  all sharing one labelmap layer, in a new node or replacing the segments of a given one.

Names match case-insensitively, and spaces, ``_`` and ``-`` count as the same
("Kidney left" = "kidney_left"); see :func:`normalize_name`.

A label with a ``"terminology"`` (SNOMED CT category/type codes, see
:func:`terminology_entry`) gives its segment Slicer's terminology entry, so the Segment
Editor and DICOM SEG export show the standard name. :func:`show_3d` shows a result in 3D
(its closed-surface representation, made by Slicer's own converter).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.scenes import node_ids, remove_nodes_added_since
from MiMSlicerLib.volumes import (array_to_matrix, check_scalar_volume, matrix_to_array, parent_to_world,
                                  read_volume_into, write_volume)

BINARY_LABELMAP = "Binary labelmap"
_FALLBACK_COLORS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
                    (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0)]


def normalize_name(name: str) -> str:
    """The form names are compared in: lower case, runs of spaces/``_``/``-`` as one ``_``."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


def segments(segmentation_node) -> list[tuple[str, str]]:
    """``[(segment_id, segment_name), ...]`` in the segmentation's order."""
    seg = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    seg.GetSegmentIDs(ids)
    return [(ids.GetValue(i), seg.GetSegment(ids.GetValue(i)).GetName()) for i in range(ids.GetNumberOfValues())]


@dataclass
class LabelMatch:
    """How a segmentation's segments map onto a list of label names.

    segment_ids: ``{label name: segment ID}`` for the labels found, in label order.
    missing:     label names no segment matches.
    unknown:     names of segments that match no label.
    """

    segmentation: str
    segment_ids: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One paragraph for a user: what is missing/unknown and what to do."""
        parts = []
        if self.missing:
            parts.append(f"segmentation '{self.segmentation}' has no segment for " +
                         ", ".join(f"'{n}'" for n in self.missing) +
                         " (add a segment with that name - it may be empty if the structure is not in the image - "
                         "or rename the matching segment)")
        if self.unknown:
            parts.append("segments " + ", ".join(f"'{n}'" for n in self.unknown) +
                         f" of '{self.segmentation}' match no label (rename them to one of the labels, or they are "
                         "left out)")
        return "; ".join(parts)


def match_segments(segmentation_node, label_names: list[str]) -> LabelMatch:
    """Match the segments of ``segmentation_node`` to ``label_names`` by :func:`normalize_name`.

    Raises MiMSlicerError if two labels have the same normalized name or two segments
    match the same label (the mapping would be ambiguous).
    """
    keys = [normalize_name(n) for n in label_names]
    if len(set(keys)) != len(keys):
        dup = sorted({n for n, k in zip(label_names, keys) if keys.count(k) > 1})
        raise MiMSlicerError(f"The label names {dup} are the same when case, spaces and '_' are ignored; "
                             "give each label a distinct name.")
    by_key = dict(zip(keys, label_names))
    match = LabelMatch(segmentation_node.GetName())
    for segment_id, name in segments(segmentation_node):
        label = by_key.get(normalize_name(name))
        if label is None:
            match.unknown.append(name)
        elif label in match.segment_ids:
            other = segmentation_node.GetSegmentation().GetSegment(match.segment_ids[label]).GetName()
            raise MiMSlicerError(f"Segments '{other}' and '{name}' of '{segmentation_node.GetName()}' both match the "
                                 f"label '{label}'; rename or delete one of them.")
        else:
            match.segment_ids[label] = segment_id
    match.segment_ids = {n: match.segment_ids[n] for n in label_names if n in match.segment_ids}
    match.missing = [n for n in label_names if n not in match.segment_ids]
    return match


def labelmap_node(segmentation_node, reference_volume, label_names: list[str], values: list[int] | None = None,
                  allow_missing: bool = False, allow_unknown: bool = True):
    """``(label map node, LabelMatch)``: the segments of ``segmentation_node`` merged into one
    label map on ``reference_volume``'s grid.

    The node is not in any scene; its IJK-to-RAS is the reference volume's own (in the
    volume's coordinates, parent transform not applied) and its dimensions are the volume's.
    label_names:   the model's labels in order; segment names are matched to them.
    values:        label value of each name (default ``1 .. len(label_names)``).
    allow_missing: if False (default), a label without a segment is an error; if True
                   its voxels are simply 0.
    allow_unknown: if False, a segment matching no label is an error; by default it is
                   left out (reported in the returned :class:`LabelMatch`).
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise MiMSlicerError("Choose a segmentation node (the annotation to export).")
    check_scalar_volume(reference_volume, "the reference volume")
    values = list(values) if values is not None else list(range(1, len(label_names) + 1))
    if len(values) != len(label_names) or any(int(v) <= 0 for v in values):
        raise ValueError("values must hold one positive label value per label name")
    match = match_segments(segmentation_node, label_names)
    if (match.missing and not allow_missing) or (match.unknown and not allow_unknown):
        raise MiMSlicerError(f"Cannot export the annotation: {match.describe()}.")

    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetName(f"{segmentation_node.GetName()}-label")
    if match.segment_ids:
        ids = vtk.vtkStringArray()
        label_values = vtk.vtkIntArray()
        for name, segment_id in match.segment_ids.items():
            ids.InsertNextValue(segment_id)
            label_values.InsertNextValue(int(values[label_names.index(name)]))
        # make sure every exported segment has a binary labelmap (e.g. if drawn as closed surfaces)
        segmentation_node.GetSegmentation().CreateRepresentation(BINARY_LABELMAP)
        merged = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
            segmentation_node, reference_volume, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged,
            label_values)
        if not slicer.vtkSlicerSegmentationsModuleLogic.CreateLabelmapVolumeFromOrientedImageData(merged, labelmap):
            raise MiMSlicerError(f"Slicer could not export '{segmentation_node.GetName()}' to a label map.")
    else:  # nothing to export: an all-background map
        image = vtk.vtkImageData()
        image.SetDimensions(reference_volume.GetImageData().GetDimensions())
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.GetPointData().GetScalars().Fill(0)
        labelmap.SetAndObserveImageData(image)
        matrix = vtk.vtkMatrix4x4()
        reference_volume.GetIJKToRASMatrix(matrix)
        labelmap.SetIJKToRASMatrix(matrix)
    expected = reference_volume.GetImageData().GetDimensions()
    if labelmap.GetImageData() is None or labelmap.GetImageData().GetDimensions() != expected:
        got = labelmap.GetImageData().GetDimensions() if labelmap.GetImageData() is not None else "no"
        raise MiMSlicerError(f"Exporting '{segmentation_node.GetName()}' gave a {got} label map instead of the "
                             f"reference volume's {expected} grid.")
    return labelmap, match


def labelmap_array(segmentation_node, reference_volume, label_names: list[str], values: list[int] | None = None,
                   allow_missing: bool = False, allow_unknown: bool = True) -> tuple[np.ndarray, LabelMatch]:
    """``(labels, LabelMatch)``: :func:`labelmap_node` as a ``(K, J, I)`` integer array
    (``slicer.util.arrayFromVolume`` layout) on ``reference_volume``'s grid."""
    node, match = labelmap_node(segmentation_node, reference_volume, label_names, values, allow_missing, allow_unknown)
    return np.array(slicer.util.arrayFromVolume(node)), match


def export_labelmap(segmentation_node, reference_volume, path: str | os.PathLike, label_names: list[str],
                    values: list[int] | None = None, allow_missing: bool = False,
                    allow_unknown: bool = True) -> LabelMatch:
    """Write :func:`labelmap_node` to the file ``path`` (``.nrrd``, ``.nii.gz``, ...).

    The file's voxel grid is exactly the reference volume's as
    :func:`MiMSlicerLib.volumes.write_volume` writes it (same size, world IJK-to-RAS with
    a linear parent transform hardened), so the two files pair up. Returns the LabelMatch.
    """
    labelmap, match = labelmap_node(segmentation_node, reference_volume, label_names, values, allow_missing,
                                    allow_unknown)
    local = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(local)
    labelmap.SetIJKToRASMatrix(array_to_matrix(parent_to_world(reference_volume) @ matrix_to_array(local)))
    write_volume(labelmap, path, compress=True)
    return match


def _color01(entry: dict, index: int) -> tuple[float, float, float]:
    color = entry.get("color") or _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)]
    if len(color) != 3:
        raise ValueError(f"label {entry.get('name')!r}: a colour needs 3 components, got {color!r}")
    return tuple(min(1.0, max(0.0, float(c) / 255.0)) for c in color)


SLICER_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_REGION_CONTEXT = "Anatomic codes - DICOM master list"
_CODE_KEYS = ("category", "type", "modifier", "region", "region_modifier")


def _code(value, where: str) -> tuple[str, str, str]:
    """(value, scheme, meaning) of a code given as ``[scheme, value, meaning]`` or
    ``{"scheme", "code", "meaning"}`` (``codingScheme``/``CodingSchemeDesignator``,
    ``value``/``CodeValue``, ``CodeMeaning`` accepted too)."""
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) for v in value):
        scheme, code, meaning = value
    elif isinstance(value, dict):
        scheme = value.get("scheme") or value.get("codingScheme") or value.get("CodingSchemeDesignator")
        code = value.get("code") or value.get("value") or value.get("CodeValue")
        meaning = value.get("meaning") or value.get("CodeMeaning")
    else:
        scheme = code = meaning = None
    if not (scheme and code and meaning):
        raise MiMSlicerError(f"{where} must be [coding scheme, code value, meaning], e.g. "
                             f"[\"SCT\", \"10200004\", \"Liver\"]; got {value!r}.")
    return str(code), str(scheme), str(meaning)


def terminology_entry(terminology, where: str = "terminology") -> str | None:
    """The terminology string Slicer stores on a segment (``vtkSegment.SetTerminology``, tag
    ``TerminologyEntry``) for a label's ``"terminology"`` in model.json; None if it has none.

    model.json may give Slicer's own serialized string (``"...~SCT^10200004^Liver~..."``) or
    ``{"category": [scheme, code, meaning], "type": [...], "modifier"?: [...], "region"?: [...],
    "region_modifier"?: [...], "context"?: str, "region_context"?: str}``, e.g. for the liver
    ``{"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}``
    (SNOMED CT codes, as Slicer's terminologies use). Contexts default to Slicer's general
    anatomy list and the DICOM anatomic region list. MiMSlicerError if it is malformed."""
    if terminology is None or terminology == "" or terminology == {}:
        return None
    if isinstance(terminology, str):
        if "~" not in terminology:
            raise MiMSlicerError(f"{where} is not a Slicer terminology string (fields separated by '~'): "
                                 f"{terminology!r}.")
        return terminology
    if not isinstance(terminology, dict):
        raise MiMSlicerError(f"{where} must be an object with 'category' and 'type' codes, got {terminology!r}.")
    unknown = set(terminology) - set(_CODE_KEYS) - {"context", "region_context"}
    if unknown:
        raise MiMSlicerError(f"{where} has unknown keys {sorted(unknown)}; known: {', '.join(_CODE_KEYS)}, "
                             "context, region_context.")
    for required in ("category", "type"):
        if required not in terminology:
            raise MiMSlicerError(f"{where} needs a '{required}' code ([scheme, code, meaning]).")
    codes = {key: (_code(terminology[key], f"{where}.{key}") if terminology.get(key) else ("", "", ""))
             for key in _CODE_KEYS}
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        str(terminology.get("context") or SLICER_ANATOMY_CONTEXT), *codes["category"], *codes["type"],
        *codes["modifier"], str(terminology.get("region_context") or DICOM_REGION_CONTEXT), *codes["region"],
        *codes["region_modifier"])


def _label_values(image) -> list[int]:
    values = vtk.vtkIntArray()
    slicer.vtkSlicerSegmentationsModuleLogic.GetAllLabelValues(values, image)
    return sorted(int(values.GetValue(i)) for i in range(values.GetNumberOfValues()))


def import_labelmap(path: str | os.PathLike, labels: list[dict], reference_volume, scene,
                    segmentation_node=None, name: str | None = None):
    """A segmentation node holding the label map file ``path``, one segment per label.

    labels:            ``[{"value", "name", "color" (0-255, optional), "terminology" (optional,
                       see :func:`terminology_entry`)}, ...]``; each becomes a segment with that
                       name, colour and terminology (empty if the value is absent).
                       Values in the file that are not listed become segments ``label_<v>``.
    reference_volume:  the volume the labels belong to. The segmentation gets it as its
                       reference geometry, and a new node is put under the same parent
                       transform. When the file's grid is the volume's (``mim segment``
                       writes exactly that), the segments use the volume's IJK-to-RAS
                       exactly; otherwise the file's own geometry is kept.
    segmentation_node: None to create a new node named ``name``; else its segments are
                       replaced (its display settings, name and transform are kept).
    Returns the segmentation node.
    """
    check_scalar_volume(reference_volume, "the reference volume")
    if segmentation_node is not None and not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise MiMSlicerError(f"'{segmentation_node.GetName()}' is not a segmentation node; choose a segmentation "
                             "(or none, to create one).")
    labelmap = read_volume_into(slicer.vtkMRMLLabelMapVolumeNode(), path)
    file_matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(file_matrix)
    file_ijk_to_world = matrix_to_array(file_matrix)

    ref_to_world = parent_to_world(reference_volume)
    seg_to_world = parent_to_world(segmentation_node) if segmentation_node is not None else ref_to_world
    local = np.linalg.inv(seg_to_world) @ file_ijk_to_world
    ref_local_matrix = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(ref_local_matrix)
    ref_local = matrix_to_array(ref_local_matrix)
    same_frame = np.allclose(seg_to_world, ref_to_world, rtol=0, atol=1e-9)
    same_grid = labelmap.GetImageData().GetDimensions() == reference_volume.GetImageData().GetDimensions()
    if same_frame and same_grid and np.allclose(local, ref_local, rtol=0, atol=1e-4):
        local = ref_local  # the reference's own grid, exactly (no float drift through the file)

    image = slicer.vtkOrientedImageData()
    vtk.vtkImageData.DeepCopy(image, labelmap.GetImageData())
    image.SetGeometryFromImageToWorldMatrix(array_to_matrix(local))

    entries = [dict(e) for e in labels]
    listed = {int(e["value"]) for e in entries}
    entries += [{"value": v, "name": f"label_{v}"} for v in _label_values(image) if v != 0 and v not in listed]

    new_segments = []
    for index, entry in enumerate(entries):
        segment = slicer.vtkSegment()
        segment.SetName(str(entry["name"]))
        segment.SetColor(*_color01(entry, index))
        segment.SetLabelValue(int(entry["value"]))
        segment.AddRepresentation(BINARY_LABELMAP, image)  # one shared layer: its voxels == value
        try:
            terminology = terminology_entry(entry.get("terminology"), f"label {entry['name']!r}: terminology")
        except MiMSlicerError as e:  # a metadata slip must not cost the radiologist the segmentation
            logging.getLogger(__name__).warning("MiMSlicer: %s The segment keeps its name only.", e)
            terminology = None
        if terminology:
            segment.SetTerminology(terminology)
        new_segments.append(segment)

    before = node_ids(scene)
    try:
        if segmentation_node is None:
            segmentation_node = slicer.vtkMRMLSegmentationNode()
            segmentation_node.SetName(scene.GenerateUniqueName(name or f"{reference_volume.GetName()} segmentation"))
            scene.AddNode(segmentation_node)
            segmentation_node.CreateDefaultDisplayNodes()
            transform = reference_volume.GetParentTransformNode()
            if transform is not None:
                segmentation_node.SetAndObserveTransformNodeID(transform.GetID())
            _place_next_to(scene, segmentation_node, reference_volume)
        was_modifying = segmentation_node.StartModify()
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        for segment in new_segments:
            segmentation.AddSegment(segment, segment.GetName())
        segmentation_node.EndModify(was_modifying)
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()
    except Exception:
        remove_nodes_added_since(scene, before)
        raise
    return segmentation_node


def _place_next_to(scene, node, neighbour) -> None:
    """Put ``node`` in the subject hierarchy under ``neighbour``'s parent (its study), where
    both have items (inside Slicer they always do)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    item, other = sh.GetItemByDataNode(node), sh.GetItemByDataNode(neighbour)
    if item and other:
        sh.SetItemParent(item, sh.GetItemParent(other))


CLOSED_SURFACE = "Closed surface"


def show_3d(segmentation_node, visible: bool = True) -> bool:
    """Show (or hide) ``segmentation_node`` in the 3D views: on showing, create its closed-surface
    representation (Slicer's converter, from the binary labelmap) if it has none, and make
    its display node show 3D. Returns True when the segmentation has a closed surface now
    (False for hiding, or when it has no segments). Hiding keeps the surface (showing again
    is instant)."""
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise MiMSlicerError("Show 3D needs a segmentation node; segment a volume first.")
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    if not visible:
        display.SetVisibility3D(False)
        return False
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        return False
    if not segmentation.ContainsRepresentation(CLOSED_SURFACE):
        if not segmentation_node.CreateClosedSurfaceRepresentation():
            raise MiMSlicerError(f"Slicer could not make a 3D surface of '{segmentation_node.GetName()}' "
                                 "(no converter from its representation).")
    display.SetPreferredDisplayRepresentationName3D(CLOSED_SURFACE)
    display.SetVisibility(True)
    display.SetVisibility3D(True)
    return True


def shows_3d(segmentation_node) -> bool:
    """True when ``segmentation_node`` has a closed surface and its display node shows it in 3D."""
    display = segmentation_node.GetDisplayNode() if segmentation_node is not None else None
    return bool(display is not None and display.GetVisibility3D() and display.GetVisibility()
                and segmentation_node.GetSegmentation().ContainsRepresentation(CLOSED_SURFACE))
