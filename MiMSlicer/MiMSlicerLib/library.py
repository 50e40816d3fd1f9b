"""The local model library and model registries, as the GUI sees them (no torch import).

The library is the folder ``mimcore`` uses: ``$MIM_MODELS_DIR`` if set, else
``platformdirs.user_data_dir("mimcore")/models``; one sub-folder per model, named after it,
holding ``model.json`` and ``weights.safetensors``; hidden entries (``.cache``, ``.add-*``)
are not models. These rules (folder, environment variables, name pattern, slugs) are
mimcore's own, from ``mimcore.bundles.layout`` (standard library only), imported on first
use: importing this module loads no mimcore.

Reading is done here, from ``model.json`` alone: listing models must be instant in the
GUI, and the rest of ``mimcore.bundles`` needs the module's Python packages (safetensors,
and torch to load weights). Adding a model (copy, verify sha256, maybe download) is ``mim models add`` in
a child process, which owns the rules of the library.

A model entry (:func:`read_model`) is a dict::

    {"name": "liver-v2",            # library name (the folder's)
     "title": "liver-v2",           # model.json "name"
     "path": "/.../models/liver-v2",
     "labels": ["liver", ...],      # label names in value order
     "label_table": [{"value": 1, "name": "liver", "color": [r, g, b]}, ...],
     "preset": "small", "architecture": "mim-seg",
     "error": None,                 # or why the entry is unusable (then labels are [])
     "description": {...}}          # model.json as read (absent for an unreadable entry)

A label of ``label_table`` carries ``"terminology"`` when model.json gives one (see
:func:`MiMSlicerLib.segmentations.terminology_entry`); :mod:`MiMSlicerLib.modelinfo`
formats an entry for people (details panel, tooltip, first-run text).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.jobs import Job, default_python

_RULES = ("ENV_LIBRARY", "ENV_REGISTRY", "DESCRIPTION_FILE", "NAME_PATTERN")


def _layout():
    """mimcore's library rules (``mimcore.bundles.layout``), imported on first use."""
    from mimcore.bundles import layout

    return layout


def __getattr__(name: str):
    """``ENV_LIBRARY``, ``ENV_REGISTRY``, ``DESCRIPTION_FILE``, ``NAME_PATTERN``: mimcore's own."""
    if name in _RULES:
        return getattr(_layout(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_library_dir() -> Path:
    """``$MIM_MODELS_DIR``, else the per-user data folder mimcore uses."""
    layout = _layout()
    try:
        return layout.library_dir()
    except ImportError:
        raise MiMSlicerError("The Python package 'platformdirs' (a mimcore requirement) is missing, so the default "
                             "model library folder is unknown: install the module's Python packages, or set "
                             f"{layout.ENV_LIBRARY} to a folder.") from None


def slugify(name: str) -> str:
    """A valid library name made from any text (mimcore's rule): ``"Liver (v2)"`` -> ``"Liver-v2"``."""
    return _layout().slugify(name)


def _description(text: str, where: str) -> dict:
    try:
        desc = json.loads(text)
    except json.JSONDecodeError as e:
        raise MiMSlicerError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(desc, dict) or not isinstance(desc.get("labels"), list):
        raise MiMSlicerError(f"{where} is not a model description (no 'labels' list).")
    for i, label in enumerate(desc["labels"]):
        if not isinstance(label, dict) or not isinstance(label.get("value"), int) or not label.get("name"):
            raise MiMSlicerError(f"{where}: labels[{i}] needs an integer 'value' and a 'name'.")
    return desc


def _entry(name: str, path: Path, desc: dict) -> dict:
    labels = sorted(desc["labels"], key=lambda lb: lb["value"])
    arch = desc.get("architecture") or {}
    return {"name": name, "title": desc.get("name", name), "path": str(path),
            "labels": [str(lb["name"]) for lb in labels],
            "label_table": [dict({"value": int(lb["value"]), "name": str(lb["name"]),
                                  "color": [int(c) for c in lb.get("color") or []] or None},
                                 **({"terminology": lb["terminology"]} if lb.get("terminology") else {}))
                            for lb in labels],
            "preset": arch.get("preset"), "architecture": arch.get("kind"), "error": None,
            "description": desc}


def read_model(path: str | os.PathLike, name: str | None = None) -> dict:
    """The entry of a bundle folder, its ``model.json`` or a ``.zip`` of it (see module doc).
    Raises MiMSlicerError if it is not a readable bundle description."""
    model_json = _layout().DESCRIPTION_FILE
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / model_json
        if not file.is_file():
            raise MiMSlicerError(f"{path} is not a model bundle: it has no {model_json}.")
        return _entry(name or path.name, path, _description(file.read_text(encoding="utf-8"), str(file)))
    if path.is_file() and path.name == model_json:
        return _entry(name or path.parent.name, path.parent, _description(path.read_text(encoding="utf-8"), str(path)))
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == model_json]
            if not members:
                raise MiMSlicerError(f"{path} is a zip without a {model_json}: not a model bundle.")
            text = zf.read(min(members, key=len)).decode("utf-8")
        return _entry(name or path.stem, path, _description(text, f"{path}:{model_json}"))
    raise MiMSlicerError(f"No model bundle at {path}: expected a folder with {model_json}, the file itself, "
                         "or a .zip of the folder.")


def list_models(library: str | os.PathLike) -> list[dict]:
    """The entries of every model in the library folder, sorted by name; an unreadable
    one has ``error`` set and no labels."""
    library = Path(library)
    if not library.is_dir():
        return []
    rows = []
    for folder in sorted(p for p in library.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            rows.append(read_model(folder))
        except (MiMSlicerError, OSError, UnicodeDecodeError) as e:
            rows.append({"name": folder.name, "title": None, "path": str(folder), "labels": [], "label_table": [],
                         "preset": None, "architecture": None, "error": str(e)})
    return rows


def find_model(model, library: str | os.PathLike) -> dict:
    """The entry of ``model``: a library name, a bundle path (folder, model.json, .zip), or an
    entry dict (as :func:`list_models` returns). A library name wins over a same-named folder."""
    library = Path(library)
    if isinstance(model, dict):
        model = model.get("path") or model.get("name")
    if not model:
        raise MiMSlicerError("No model selected: choose a model from the library, or add one.")
    text = str(model)
    if _layout().NAME_PATTERN.match(text) and (library / text).is_dir():
        entry = read_model(library / text)
    elif Path(text).expanduser().exists():
        entry = read_model(text)
    else:
        names = [m["name"] for m in list_models(library)]
        have = f"the library {library} has: {', '.join(names)}" if names else f"the library {library} is empty"
        raise MiMSlicerError(f"No model named '{text}' in the library and no such file or folder; {have}. "
                             "Add the model first (Add from file / from registry).")
    if not entry["label_table"]:
        raise MiMSlicerError(f"The model '{entry['name']}' has no labels; it cannot segment anything.")
    return entry


def registry_entries(registry: str | os.PathLike) -> list[dict]:
    """The ``models`` list of a registry JSON file (path, ``file://`` or ``http(s)://`` URL)."""
    text = str(registry)
    try:
        if urllib.parse.urlsplit(text).scheme in ("http", "https", "file"):
            with urllib.request.urlopen(text, timeout=30) as response:  # noqa: S310 (http/file URLs only)
                raw = response.read().decode("utf-8")
        else:
            raw = Path(text).expanduser().read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise MiMSlicerError(f"Could not read the model registry {text} ({e}). Check the path or URL and the "
                             "network connection.") from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise MiMSlicerError(f"The model registry {text} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) and m.get("name") for m in models):
        raise MiMSlicerError(f"The model registry {text} must be a JSON object with a \"models\" list of "
                             "{\"name\", \"url\", \"sha256\"} entries.")
    return models


def add_model(source: str, library: str | os.PathLike, name: str | None = None, registry: str | None = None,
              overwrite: bool = False, python: str | None = None, env: dict | None = None,
              timeout: float | None = None) -> str:
    """Add a bundle to the library with ``mim models add`` (a child process); returns its library name.

    source: a bundle folder, model.json or .zip; or the name of a model in ``registry``
            (a registry file or URL; default ``$MIM_MODEL_REGISTRY``), downloaded and
            sha256-checked; or ``REGISTRY#NAME`` (e.g. ``https://host/models.json#liver``).
    Blocks until the copy (or download) is done. Raises MiMSlicerError with mimcore's message.
    """
    library = Path(library)
    source, registry = split_registry_source(str(source), registry)
    argv = add_model_arguments(source, library, name=name, registry=registry, overwrite=overwrite, json=False)
    before = {m["name"] for m in list_models(library)}
    job = Job(argv, python=python or default_python(), env=env)
    try:
        proc = subprocess.run(job.command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              env=job.environment(), timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MiMSlicerError(f"Adding '{source}' to the model library did not finish within {timeout:.0f} s.") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln.split("mim: error: ", 1)[1] for ln in lines if ln.startswith("mim: error: ")]
        detail = errors[-1] if errors else "\n".join(lines[-20:]) or f"exit code {proc.returncode}"
        raise MiMSlicerError(f"Could not add '{source}' to the model library: {detail}")
    added = re.search(r"Added '([^']+)' to the model library", proc.stdout)
    if added:
        return added.group(1)
    new = sorted({m["name"] for m in list_models(library)} - before)
    if len(new) == 1:
        return new[0]
    if name:
        return name
    raise MiMSlicerError(f"'mim models add {source}' succeeded but did not say under which name; "
                         f"look in {library}.")


# --------------------------------------------------------------------------- adding as a task


def split_registry_source(source: str, registry: str | None = None) -> tuple[str, str | None]:
    """``("REGISTRY#NAME", None)`` -> ``("NAME", "REGISTRY")``; an existing path or a plain name is kept."""
    source = str(source)
    if "#" in source and not Path(source).expanduser().exists():
        registry, source = source.rsplit("#", 1)
    return source, registry


def add_model_arguments(source: str, library: str | os.PathLike, name: str | None = None,
                        registry: str | None = None, overwrite: bool = False, json: bool = True) -> list[str]:
    """The ``mim models add`` command line (without ``mim``). ``json``: ``--progress json``, the
    download's progress, the result (``done``) and a failure (``error``) as JSON events (see
    :func:`add_model_event`); else ``--quiet``, the result as text."""
    argv = ["models", "add", str(source), "--library", str(library)]
    argv += ["--progress", "json"] if json else ["--quiet"]
    if registry:
        argv += ["--registry", str(registry)]
    if name:
        argv += ["--name", name]
    if overwrite:
        argv.append("--overwrite")
    return argv


def added_name(job, name: str | None = None) -> str:
    """The library name a finished ``mim models add --progress json`` job reported (its ``done`` event)."""
    done = next((e for e in reversed(job.events) if e.get("event") == "done" and e.get("name")), None)
    if done is not None:
        return str(done["name"])
    if name:
        return name
    raise MiMSlicerError("'mim models add' succeeded but did not say under which name the model was added.")


def staging_dirs(library: str | os.PathLike) -> set[str]:
    """Names of the hidden temporary folders ``mim models add`` makes in the library while it
    copies (``.add-*.tmp``, and ``.<name>.*.tmp`` while a model is moved into place)."""
    library = Path(library)
    if not library.is_dir():
        return set()
    return {p.name for p in library.iterdir() if p.is_dir() and p.name.startswith(".") and p.name.endswith(".tmp")}


def remove_staging_dirs(library: str | os.PathLike, keep: set[str] = frozenset()) -> list[str]:
    """Remove the staging folders of the library except ``keep`` (those of other, running adds); returns the names.
    A killed ``mim models add`` cannot remove its own."""
    removed = []
    for folder in sorted(staging_dirs(library) - set(keep)):
        shutil.rmtree(Path(library) / folder, ignore_errors=True)
        removed.append(folder)
    return removed


def add_model_event(event: dict, source: str) -> dict:
    """The event a task shows for one event of ``mim models add --progress json``.

    The ``start`` event's stage ``add`` becomes ``adding NAME to the library``. A download's
    ``progress`` event (stage ``download``, ``step``/``total`` in bytes, ``total`` null when
    unknown) becomes ``{"event": "progress", "stage": "downloading NAME (x.y of z.w MB)",
    "step": KiB, "total": KiB (0 when unknown), "eta_s": as sent, "metrics": {},
    "bytes": done, "total_bytes": total or None}``: KiB keep a Qt progress bar's int range for
    files over 2 GiB, and the bytes stay for whoever wants them. Any other event is returned
    as it is.
    """
    if event.get("event") == "start" and event.get("stage") == "add":
        return {**event, "stage": f"adding {source} to the library"}
    if event.get("event") != "progress" or event.get("stage") != "download":
        return event
    try:
        done = int(event.get("step") or 0)
        size = int(event["total"]) if event.get("total") else None
    except (TypeError, ValueError):
        return event
    total_kib = (size + 1023) // 1024 if size else 0
    of = f" of {size / 1e6:.1f}" if size else ""
    return {"event": "progress", "stage": f"downloading {source} ({done / 1e6:.1f}{of} MB)",
            "step": total_kib if size and done >= size else done // 1024, "total": total_kib,
            "eta_s": event.get("eta_s"), "metrics": {}, "bytes": done, "total_bytes": size}
