"""Model library entries as people read them: a model's details, and what to do with an empty library.

Pure functions of a library entry (:func:`MiMSlicerLib.library.read_model`: ``model.json``
as read, under ``"description"``) and of the library's situation, so the Qt module, MiM
Studio and the tests share one wording:

* :func:`model_details` - labels (with their terminology codes), the input spacing and
  intensity window, the network and weights size, the training provenance and the
  licence: the text of a details panel or a model's tooltip.
* :func:`empty_library_guidance` - what the Segment section says instead of an empty
  model list: the three ways to get a model.
"""

from __future__ import annotations

import os

NO_LICENSE = "not stated in model.json - ask the model's provider before clinical or commercial use"
_PROVENANCE_KEYS = ("data", "datalist", "dataset", "cases", "init", "pretrained", "method", "steps", "epochs",
                    "best_dice", "dice", "best_step", "created", "date", "author", "mimcore", "version")


def _human_size(n) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _short(value, limit: int = 80) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_short(v, limit) for v in value[:6]) + (f", ... ({len(value)} in all)" if len(value) > 6 else "")
    elif isinstance(value, dict):
        text = ", ".join(f"{k} {_short(v, limit)}" for k, v in list(value.items())[:6])
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _terminology_text(terminology) -> str:
    """``"SCT 10200004 Liver"`` for a label's terminology (the type code; Slicer's string: its type part)."""
    if isinstance(terminology, dict):
        code = terminology.get("type")
        if isinstance(code, (list, tuple)) and len(code) == 3:
            return f"{code[0]} {code[1]} {code[2]}"
        if isinstance(code, dict):
            parts = [code.get("scheme") or code.get("codingScheme"), code.get("code") or code.get("value"),
                     code.get("meaning")]
            return " ".join(str(p) for p in parts if p)
    if isinstance(terminology, str) and "~" in terminology:
        fields = terminology.split("~")
        if len(fields) > 2 and fields[2].count("^") == 2:
            scheme, code, meaning = fields[2].split("^")
            return f"{scheme} {code} {meaning}".strip()
    return ""


def label_lines(entry: dict) -> list[str]:
    """``["1 liver (SCT 10200004 Liver)", "2 spleen", ...]`` from an entry's label table."""
    lines = []
    for label in entry.get("label_table") or []:
        code = _terminology_text(label.get("terminology"))
        lines.append(f"{label['value']} {label['name']}" + (f" ({code})" if code else ""))
    return lines


def model_details(entry: dict) -> str:
    """A model's details as plain text lines (labels, input, size, provenance, licence).

    ``entry`` is a library entry; an unusable one (``error`` set) says why. Missing facts
    are said to be missing, never invented."""
    name = entry.get("name") or "?"
    if entry.get("error"):
        return f"{name}: this library entry cannot be used.\n{entry['error']}"
    desc = entry.get("description") or {}
    lines = [f"{name}" + (f" - {desc['name']}" if desc.get("name") and desc.get("name") != name else "")]
    labels = label_lines(entry)
    lines.append(f"Labels ({len(labels)}): " + ("; ".join(labels) if labels else "none"))

    prep = desc.get("preprocessing") or {}
    spacing = prep.get("spacing")
    if isinstance(spacing, (list, tuple)) and spacing:
        text = " x ".join(f"{float(s):g}" for s in spacing) + " mm"
    else:
        text = "not stated (the volume's own)"
    extras = []
    if prep.get("orientation"):
        extras.append(f"orientation {prep['orientation']}")
    low = prep.get("hu_min", prep.get("a_min"))
    high = prep.get("hu_max", prep.get("a_max"))
    if low is not None and high is not None:
        extras.append(f"intensity window {float(low):g} to {float(high):g} HU")
    lines.append("Input spacing: " + text + (f" ({', '.join(extras)})" if extras else ""))

    arch = desc.get("architecture") or {}
    size = [str(arch.get("kind") or entry.get("architecture") or "unknown network")]
    if arch.get("preset") or entry.get("preset"):
        size.append(f"size {arch.get('preset') or entry.get('preset')}")
    weights = desc.get("weights") or {}
    if isinstance(weights.get("size"), int):
        size.append(f"weights {_human_size(weights['size'])}")
    roi = (desc.get("inference") or {}).get("roi_size")
    if isinstance(roi, (list, tuple)) and roi:
        size.append("patch " + " x ".join(str(r) for r in roi) + " voxels")
    lines.append("Size: " + ", ".join(size))

    training = desc.get("training") or {}
    facts = [f"{k} {_short(training[k])}" for k in _PROVENANCE_KEYS if training.get(k) not in (None, "", [], {})]
    lines.append("Training: " + ("; ".join(facts) if facts else "no provenance in model.json"))

    license_text = desc.get("license") or desc.get("licence") or training.get("license") or training.get("licence")
    lines.append("Licence: " + (str(license_text) if license_text else NO_LICENSE))
    if entry.get("path"):
        lines.append(f"Folder: {entry['path']}")
    return "\n".join(lines)


def empty_library_guidance(models_dir: str | os.PathLike | None = None, registry: str | None = None) -> str:
    """What the Segment section says when the model library has no usable model: the three
    ways forward, in plain words (the registry line names the registry when one is set)."""
    where = f" ({models_dir})" if models_dir else ""
    source = f"the registry {registry}" if registry else "a model registry (a JSON file or web address you are given)"
    return "\n".join([
        f"No segmentation model yet: the model library{where} is empty. To get one:",
        "1. Add from file... - a model bundle you received (a folder with model.json, or a .zip of it).",
        f"2. Add from registry... - download a published model from {source}.",
        "3. Fine-tune (section below) - train one from a few of your own volumes with segmentations; "
        "it joins the library when it is done.",
    ])
