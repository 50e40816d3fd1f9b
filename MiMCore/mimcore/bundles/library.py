"""The local model library: one folder of model bundles that every command can use by name.

The library is ``$MIM_MODELS_DIR`` if set, else ``platformdirs.user_data_dir("mimcore")/models``
(every function also takes ``library=`` to use another folder). Each model is a
sub-folder named after it holding ``model.json`` and ``weights.safetensors``; hidden
entries (``.cache`` for downloads and extracted zips, ``.add-.*.tmp`` staging folders) are
not models; staging folders a killed process left are removed by the next addition.

A model enters the library only after its copy there was verified (description valid,
weights size and sha256 as stated, safetensors header readable), and then appears at
once with a rename, so a half-copied model is never listed.

A *registry* is a JSON file (local path, ``file://`` or ``http(s)://`` URL; default
``$MIM_MODEL_REGISTRY``) listing downloadable zipped bundles::

    {"models": [{"name": "liver", "url": "liver.zip", "sha256": "...", "size": 123,
                 "description": "..."}]}

Relative URLs are relative to the registry file. Where the library is and how entries are
named: :mod:`mimcore.bundles.layout` (standard library only; the Slicer GUI reads it too).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

from mimcore.bundles.bundle import (DESCRIPTION_FILE, STALE_EXTRACTION_S, Bundle, extract_zip_bundle, load_bundle,
                                    read_description, verify_zip, write_zip)
from mimcore.bundles.download import download, is_url, local_path, read_text
from mimcore.bundles.layout import ENV_REGISTRY, NAME_PATTERN, cache_dir, library_dir, slugify
from mimcore.errors import MimError, OutputError
from mimcore.files import atomic_dir, atomic_write, clean_orphans

EXPORT_FORMATS = ("zip", "dir", "monai")


def check_name(name: str) -> str:
    """``name`` if it is usable as a library name, else a :class:`MimError`."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise MimError(f"{name!r} is not a valid model name: use letters, digits, '.', '_', '+' and '-' "
                       f"(at most 100, starting with a letter or digit), e.g. {slugify(str(name))!r}")
    return name


def _names(lib: Path) -> list[str]:
    if not lib.is_dir():
        return []
    return sorted(p.name for p in lib.iterdir() if p.is_dir() and not p.name.startswith("."))


def _available(lib: Path) -> str:
    names = _names(lib)
    if not names:
        return f"the library {lib} is empty; add a model with `mim models add SOURCE`"
    return f"available in {lib}: {', '.join(names)}"


def list_models(library: str | os.PathLike | None = None) -> list[dict]:
    """One dict per model, sorted by name.

    Keys: ``name`` (library name), ``title`` (model.json name), ``path``, ``labels`` (count),
    ``label_names``, ``architecture`` (kind), ``preset``, ``size`` (bytes on disk) and
    ``error`` (None, or why the entry is not a usable bundle).
    """
    lib = library_dir(library)
    rows = []
    for name in _names(lib):
        folder = lib / name
        row = {"name": name, "title": None, "path": str(folder), "labels": 0, "label_names": [],
               "architecture": None, "preset": None, "size": _folder_size(folder), "error": None}
        try:
            d = read_description(folder / DESCRIPTION_FILE)
        except MimError as e:
            row["error"] = str(e)
        else:
            arch = d["architecture"]
            row.update(title=d["name"], labels=len(d["labels"]), label_names=[lb["name"] for lb in d["labels"]],
                       architecture=arch.get("kind"), preset=arch.get("preset"))
        rows.append(row)
    return rows


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def get_model(name_or_path: str | os.PathLike, library: str | os.PathLike | None = None) -> Bundle:
    """The bundle of a library name, or of a path (bundle folder, model.json or .zip).

    A library name wins over a same-named folder in the current directory (write
    ``./name`` for the folder).
    """
    lib = library_dir(library)
    text = str(name_or_path)
    if NAME_PATTERN.match(text) and (lib / text).is_dir():
        return load_bundle(lib / text)
    path = Path(text).expanduser()
    if path.exists():
        return load_bundle(path, cache_dir=cache_dir(library))
    raise MimError(f"no model named {text!r} in the library and no such file or folder; {_available(lib)}")


def remove_model(name: str, library: str | os.PathLike | None = None) -> Path:
    """Delete a model from the library; returns the folder it was in."""
    lib = library_dir(library)
    folder = lib / check_name(name)
    if not folder.is_dir():
        raise MimError(f"no model named {name!r} in the library; {_available(lib)}")
    trash = Path(tempfile.mkdtemp(dir=lib, prefix=f".{name}.", suffix=".tmp"))  # an orphan if killed
    os.rmdir(trash)
    os.rename(folder, trash)  # disappears from the library at once
    shutil.rmtree(trash, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- registries

def load_registry(registry: str | os.PathLike) -> list[dict]:
    """The entries of a registry file, ``url`` made absolute; :class:`MimError` if malformed."""
    text = read_text(registry)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise MimError(f"the model registry {registry} is not valid JSON ({e.msg} at line {e.lineno})") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        raise MimError(f"the model registry {registry} must be a JSON object with a \"models\" list")
    entries = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict):
            raise MimError(f"the model registry {registry}: models[{i}] must be an object")
        for key in ("name", "url", "sha256"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise MimError(f"the model registry {registry}: models[{i}] needs a {key!r} string")
        if entry.get("size") is not None and (not isinstance(entry["size"], int) or entry["size"] < 0):
            raise MimError(f"the model registry {registry}: models[{i}].size must be a byte count")
        entries.append(dict(entry, url=_resolve_url(entry["url"], registry)))
    return entries


def _resolve_url(url: str, registry: str | os.PathLike) -> str:
    if is_url(url) or Path(url).is_absolute():
        return url
    if is_url(str(registry)) and urllib.parse.urlsplit(str(registry)).scheme != "file":
        return urllib.parse.urljoin(str(registry), url)
    return str(local_path(registry).parent / url)


def _registry_entry(name: str, registry: str | os.PathLike | None) -> dict:
    registry = registry or os.environ.get(ENV_REGISTRY)
    if not registry:
        raise MimError(f"{name!r} is not a file or folder, and no model registry was given to look it up in; "
                       f"pass a bundle folder, model.json or .zip, or --registry FILE_OR_URL (or set {ENV_REGISTRY})")
    entries = load_registry(registry)
    for entry in entries:
        if entry["name"] == name:
            return entry
    names = ", ".join(e["name"] for e in entries) or "none"
    raise MimError(f"{name!r} is not a file or folder, nor a model in the registry {registry} (it has: {names})")


# --------------------------------------------------------------------------- adding and exporting

def add_model(source: str | os.PathLike, name: str | None = None, registry: str | os.PathLike | None = None,
              progress: bool = True, overwrite: bool = False, library: str | os.PathLike | None = None,
              on_progress=None) -> Path:
    """Copy a bundle into the library; returns its library folder.

    ``source``: a bundle folder, its model.json, a .zip of it, or the name of a model in
    ``registry`` (downloaded with a progress bar, resumable, sha256-checked). ``name``:
    the library name (default: the registry name, or the model's name made path-safe);
    an existing name is refused unless ``overwrite``. The copy is verified before it
    becomes visible; model.json's ``name`` is set to the library name. ``progress``: the
    download's progress bar; ``on_progress(done_bytes, total_bytes_or_None)``: called as the
    download proceeds (see :mod:`mimcore.bundles.download`).
    """
    lib = library_dir(library)
    if name is not None:
        check_name(name)
    lib.mkdir(parents=True, exist_ok=True)
    clean_orphans(lib, min_age_s=STALE_EXTRACTION_S)  # staging folders of killed additions
    staging = Path(tempfile.mkdtemp(dir=lib, prefix=".add-.", suffix=".tmp"))  # clean_orphans' pattern
    downloaded: Path | None = None
    try:
        path = Path(str(source)).expanduser()
        if path.exists():
            src = _unpack_local(path, staging)
            default_name = None
        else:
            entry = _registry_entry(str(source), registry)
            downloaded = download(entry["url"], cache_dir(library) / "downloads" / f"{entry['sha256'].lower()}.zip",
                                  entry["sha256"], entry.get("size"), progress=progress, on_progress=on_progress)
            src = extract_zip_bundle(downloaded, _mkdir(staging / "unzipped"))
            default_name = slugify(entry["name"])
        bundle = load_bundle(src)
        final = check_name(name or default_name or slugify(bundle.name))
        dest = lib / final
        if dest.exists() and not overwrite:
            raise MimError(f"a model named {final!r} is already in the library ({dest}); pass --overwrite "
                           "(overwrite=True) to replace it, or --name to add it under another name")
        try:  # copied and verified under a hidden temporary name, then renamed into place
            with atomic_dir(dest, replace=overwrite, what=f"model {final!r} in the library") as new:
                _copy_bundle(bundle, new, final)
                load_bundle(new).verify()
        except OutputError:
            if dest.exists() and not overwrite:
                raise MimError(f"could not add {final!r} to the library at {dest}: another process added a model "
                               "of that name meanwhile; pass --overwrite or another --name") from None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if downloaded is not None:
        downloaded.unlink(missing_ok=True)  # verified and copied: no need to keep the zip
    return dest


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _unpack_local(path: Path, staging: Path) -> Path:
    """A local source as a bundle folder (zips are extracted into ``staging``)."""
    import zipfile

    if path.is_file() and zipfile.is_zipfile(path):
        return extract_zip_bundle(path, _mkdir(staging / "unzipped"))
    return load_bundle(path).path


def _copy_bundle(bundle: Bundle, folder: Path, name: str | None = None) -> Path:
    """Copy model.json (``name`` set, if given) and the weights of ``bundle`` into ``folder``."""
    shutil.copyfile(bundle.weights_path, folder / bundle.weights_path.name)
    desc = dict(bundle.description)
    if name is not None and desc["name"] != name:
        desc["name"] = name
        (folder / DESCRIPTION_FILE).write_text(json.dumps(desc, indent=2) + "\n")
    else:
        shutil.copyfile(bundle.description_path, folder / DESCRIPTION_FILE)
    return folder


def _is_export(folder: Path, fmt: str) -> bool:
    """True when ``folder`` is itself an export of format ``fmt`` (a bundle folder, a MONAI bundle)."""
    if fmt == "dir":
        return (folder / DESCRIPTION_FILE).is_file()
    return fmt == "monai" and (folder / "configs" / "inference.json").is_file()


def export_model(name: str, dest: str | os.PathLike, fmt: str = "zip", library: str | os.PathLike | None = None,
                 overwrite: bool = False) -> Path:
    """Write a library model (or a bundle path) to ``dest``; returns what was written.

    ``fmt``: ``"zip"`` (one .zip file), ``"dir"`` (a bundle folder) or ``"monai"`` (a
    MONAI bundle, :func:`mimcore.bundles.monai_export.export_monai_bundle`). If ``dest``
    is an existing folder, the export goes inside it (``<name>.zip`` or ``<name>/``), unless
    it is an earlier export of the same format (then ``dest`` itself is the target).
    The weights are verified first; an existing target is refused unless ``overwrite``.
    """
    if fmt not in EXPORT_FORMATS:
        raise MimError(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    bundle = get_model(name, library)
    bundle.verify()
    stem = bundle.path.name if bundle.path.parent == library_dir(library) else slugify(bundle.name)
    dest = Path(dest).expanduser()
    inside = dest.is_dir() and not _is_export(dest, fmt)  # an earlier export of this format is replaced, not nested
    target = dest / (f"{stem}.zip" if fmt == "zip" else stem) if inside else dest
    if target.exists() and not overwrite:
        raise MimError(f"{target} already exists; pass --overwrite (overwrite=True) or choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":
        if target.is_dir():
            raise MimError(f"{target} is a folder; give a .zip file name")
        atomic_write(target, lambda tmp: write_zip(bundle.path, tmp), verify_zip, what="zipped model bundle")
    elif fmt == "dir":
        if target.exists() and not target.is_dir():
            raise MimError(f"{target} is a file; give a folder name")
        with atomic_dir(target, replace=True, what="model bundle") as staging:
            _copy_bundle(bundle, staging)
            load_bundle(staging).verify()
    else:
        from mimcore.bundles.monai_export import export_monai_bundle

        export_monai_bundle(bundle, target, overwrite=overwrite)
    return target
