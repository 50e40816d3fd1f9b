"""Finding volumes: MONAI-style datalist JSON files and plain folders.

A datalist is ``{"labels": {"0": "background", ...}, "training": [{"image": ..., "label": ...}],
...}`` with paths relative to the datalist's own folder (MONAI's decathlon format). An
``image`` may be a volume file or a DICOM series folder. ``labels`` may also be a list
``[{"value": 1, "name": "liver", "color": [r, g, b]}, ...]`` to give the classes' colours
(see :func:`mimcore.training.finetune_data.label_table`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mimcore.data.volume_io import VOLUME_SUFFIXES, dicom_series_files, volume_suffix
from mimcore.errors import MimError

PATH_KEYS = ("image", "label")


def read_datalist(datalist_path: str | os.PathLike) -> dict:
    """The parsed datalist JSON (a dict), with clear errors for a missing or broken file."""
    path = Path(datalist_path).expanduser()
    if not path.is_file():
        raise MimError(f"No datalist at {path}. Run `mim data samples` to create the sample one, "
                       "or pass the path of your datalist JSON.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MimError(f"Cannot read the datalist {path}: {err}. It must be a JSON file.") from None
    if not isinstance(data, dict):
        raise MimError(f"The datalist {path} must hold a JSON object with sections like 'training'.")
    return data


def datalist_entries(datalist_path: str | os.PathLike, section: str) -> list[dict]:
    """Entries of one section with ``image``/``label`` paths made absolute (as ``str``).

    Other keys (e.g. ``modality``, ``label_values``) are kept. Raises MimError for an
    unknown section or files that do not exist.
    """
    path = Path(datalist_path).expanduser().resolve()
    data = read_datalist(path)
    sections = [k for k, v in data.items() if isinstance(v, list)]
    if section in data and not isinstance(data[section], list):
        value = data[section]
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise MimError(f"The section '{section}' of the datalist {path} is not a list of entries: it is "
                       f"{_json_kind(value)} ({shown}). Make it a list such as "
                       f"[{{\"image\": \"imagesTr/case1.nii.gz\", \"label\": \"labelsTr/case1.nii.gz\"}}, ...].")
    if section not in sections:
        raise MimError(f"The datalist {path} has no section '{section}'; it has: "
                       f"{', '.join(sections) or 'no list of entries'}.")
    entries, missing = [], []
    for i, item in enumerate(data[section]):
        if not isinstance(item, (dict, str)):
            raise MimError(f"Entry {i + 1} of section '{section}' in the datalist {path} is {_json_kind(item)}; "
                           "each entry must be an object such as {\"image\": \"...\", \"label\": \"...\"} or an "
                           "image path.")
        entry = dict(item) if isinstance(item, dict) else {"image": item}
        for key in PATH_KEYS:
            if isinstance(entry.get(key), str):
                entry[key] = str((path.parent / entry[key]).resolve())
                if not Path(entry[key]).exists():
                    missing.append(entry[key])
        entries.append(entry)
    if missing:
        raise MimError(f"{len(missing)} file(s) listed in {path} ('{section}') do not exist, e.g. {missing[0]}. "
                       "Fix the paths (they are relative to the datalist's folder) or fetch the data again.")
    return entries


def _json_kind(value) -> str:
    """'a string', 'a number', ... : what a JSON value is, for messages."""
    if isinstance(value, bool):
        return "true/false"
    kinds = ((str, "a string"), ((int, float), "a number"), (dict, "an object"), (list, "a list"))
    return next((word for kind, word in kinds if isinstance(value, kind)), "null")


def volumes_from_folder(folder: str | os.PathLike) -> list[Path]:
    """Volume files (NIfTI/NRRD/MetaImage) and DICOM series subfolders in ``folder``, sorted.

    ``folder`` itself is listed first when it holds a DICOM series. Hidden names are skipped;
    subfolders are looked into one level deep only (one subfolder = one DICOM series).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MimError(f"{folder} is not a folder. Pass a folder with volume files or DICOM series subfolders.")
    found = [folder] if dicom_series_files(folder, warn=False) else []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and volume_suffix(path) in VOLUME_SUFFIXES:
            found.append(path)
        elif path.is_dir() and dicom_series_files(path, warn=False):
            found.append(path)
    if not found:
        raise MimError(f"No volumes found in {folder}. Put NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or "
                       "MetaImage (.mha, .mhd) files there, or one subfolder per DICOM series.")
    return found
