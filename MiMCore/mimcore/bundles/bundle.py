"""Model bundles: the one file format of every trained model.

A bundle is a directory (or a ``.zip`` of it) with two files::

    model.json            the description (see below)
    weights.safetensors   the state dict, tensors only

``model.json`` keys (all required):

=================  =====  ==============================================================
key                type   meaning
=================  =====  ==============================================================
``format``         str    ``"mimcore.bundle.v1"``
``name``           str    a human name of the model
``architecture``   dict   ``{"kind": "mim-seg", ...}``; the rest belongs to the builder
``labels``         list   ``[{"value": 1, "name": "liver", "color": [r, g, b]}, ...]``:
                          unique positive ints, non-empty names, colours 0-255; the
                          background (0) is not listed
``preprocessing``  dict   orientation, spacing (mm), intensity window, ...
``inference``      dict   patch (roi) size, overlap, ...
``training``       dict   provenance (data, run, metrics); may be empty
``weights``        dict   ``{"file": "weights.safetensors", "sha256": hex, "size": bytes}``
=================  =====  ==============================================================

Nothing here unpickles anything: weights are read with safetensors, their sha256 is
checked on every load, and zips are extracted member by member after refusing paths
that would leave the bundle directory (``../x``, absolute paths, symlinks) and zips that
are no bundle's size or shape (too many entries, zip bombs). A zip is extracted once into
the cache, atomically (:func:`mimcore.files.atomic_dir`), and kept only when its weights
verify; every bundle, zip and extraction is written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError, safe_open

from mimcore.bundles.layout import DESCRIPTION_FILE
from mimcore.errors import MimError, OutputError
from mimcore.files import atomic_dir, atomic_write, clean_orphans, free_bytes, sha256_file

BUNDLE_FORMAT = "mimcore.bundle.v1"
WEIGHTS_FILE = "weights.safetensors"
_FORMAT_RE = re.compile(r"^mimcore\.bundle\.v(\d+)$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# Zip-bomb guards, checked on the zip's directory before anything is written. A bundle is a
# handful of files (model.json, the weights, perhaps a README and folders): at most MAX_MEMBERS
# entries. Its weights are float tensors, which hardly compress (write_zip stores them), so
# the whole zip may unpack to at most MAX_TOTAL_RATIO times its own size once past
# MAX_TOTAL_RATIO_FROM_BYTES (small bundles of zeros stay usable), no member larger than
# MAX_RATIO_FROM_BYTES may be compressed more than MAX_RATIO times, and nothing unpacks to more
# than MAX_UNPACKED_BYTES: the largest network mimcore builds (MiM base, UNETR ViT-B) has
# under 0.5 GiB of fp32 weights, so 4 GiB leaves 8x room.
MAX_MEMBERS = 64
MAX_UNPACKED_BYTES = 4 << 30
MAX_TOTAL_RATIO, MAX_TOTAL_RATIO_FROM_BYTES = 20, 64 << 20
MAX_RATIO, MAX_RATIO_FROM_BYTES = 100, 8 << 20
#: extraction folders older than this in the cache were left by a killed process
STALE_EXTRACTION_S = 3600.0
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")
_REQUIRED = {"format": str, "name": str, "architecture": dict, "labels": list, "preprocessing": dict,
             "inference": dict, "training": dict, "weights": dict}


@dataclass
class Bundle:
    """A model bundle on disk.

    ``path`` is the bundle directory (a zip is extracted to a cache directory first);
    ``description`` is the parsed, validated ``model.json``.
    """

    path: Path
    description: dict

    @property
    def name(self) -> str:
        """The model's name (``model.json`` ``name``)."""
        return self.description["name"]

    @property
    def labels(self) -> list[dict]:
        """``[{"value": int > 0, "name": str, "color": [r, g, b] ints 0-255}, ...]``, background excluded."""
        return self.description["labels"]

    @property
    def architecture(self) -> dict:
        return self.description["architecture"]

    @property
    def preprocessing(self) -> dict:
        return self.description["preprocessing"]

    @property
    def inference(self) -> dict:
        return self.description["inference"]

    @property
    def weights_path(self) -> Path:
        return self.path / self.description["weights"]["file"]

    @property
    def description_path(self) -> Path:
        return self.path / DESCRIPTION_FILE

    def verify(self) -> None:
        """Check the weights file (size, sha256, safetensors header) without loading the tensors."""
        path = self._checked_weights()
        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise MimError(f"{path} is not a valid safetensors file ({e}); re-export or re-download the bundle") from None

    def state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The weights as ``{name: tensor}`` (safetensors; sha256 checked on every call)."""
        path = self._checked_weights()
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise MimError(f"{path} is not a valid safetensors file ({e}); re-export or re-download the bundle") from None

    def _checked_weights(self) -> Path:
        info = self.description["weights"]
        path = self.weights_path
        if not path.is_file():
            raise MimError(f"the weights file {path} of model bundle {self.path} is missing; "
                           f"copy the whole bundle (model.json and {info['file']}) or re-export it")
        actual_size = path.stat().st_size
        if actual_size != info["size"]:
            raise MimError(f"the weights file {path} has {actual_size} bytes but model.json says {info['size']}: "
                           "the file is damaged or was replaced; re-download or re-export the bundle")
        actual = sha256_file(path)
        if actual != info["sha256"]:
            raise MimError(f"the weights file {path} does not match model.json (sha256 {actual}, expected "
                           f"{info['sha256']}): it is damaged or was tampered with; re-download or re-export the bundle")
        return path


# --------------------------------------------------------------------------- validation

def validate_description(d: dict, source: str | os.PathLike | None = None) -> None:
    """Raise a :class:`MimError` naming the file and the missing or bad key, else return None."""
    where = f"{source}" if source is not None else "model.json"

    def bad(msg: str) -> MimError:
        return MimError(f"{where}: {msg}")

    if not isinstance(d, dict):
        raise bad(f"expected a JSON object, got {type(d).__name__}; is this a model bundle's model.json?")
    fmt = d.get("format")
    if fmt is None:
        raise bad("key 'format' is missing: this is not a mimcore model bundle description "
                  f"(expected \"format\": \"{BUNDLE_FORMAT}\")")
    if fmt != BUNDLE_FORMAT:
        m = _FORMAT_RE.match(str(fmt))
        if m and int(m.group(1)) > 1:
            raise bad(f"the bundle format is {fmt!r}, newer than this mimcore reads ({BUNDLE_FORMAT!r}); "
                      "upgrade mimcore (pip install -U mimcore, or update the MiM Slicer extension)")
        if str(fmt).startswith("mimcore.pretrain."):
            raise bad(f"this is a pre-training checkpoint ({fmt!r}), not a model bundle; "
                      "fine-tune it to get a model bundle")
        raise bad(f"unknown format {fmt!r}; expected {BUNDLE_FORMAT!r}")
    for key, typ in _REQUIRED.items():
        if key not in d:
            raise bad(f"key {key!r} is missing; a model bundle needs {', '.join(_REQUIRED)}")
        if not isinstance(d[key], typ):
            raise bad(f"key {key!r} must be a {'JSON object' if typ is dict else typ.__name__}, "
                      f"got {type(d[key]).__name__}")
    if not d["name"].strip():
        raise bad("key 'name' is empty")
    if not isinstance(d["architecture"].get("kind"), str) or not d["architecture"]["kind"]:
        raise bad("key 'architecture' needs a 'kind' string (e.g. \"mim-seg\")")
    _validate_labels(d["labels"], bad)
    w = d["weights"]
    file = w.get("file")
    if not isinstance(file, str) or not _is_plain_name(file):
        raise bad(f"'weights.file' must be a file name inside the bundle (e.g. {WEIGHTS_FILE!r}), got {file!r}")
    if not isinstance(w.get("sha256"), str) or not _SHA_RE.match(w["sha256"]):
        raise bad(f"'weights.sha256' must be 64 lower-case hex digits, got {w.get('sha256')!r}")
    if not _is_int(w.get("size")) or w["size"] < 0:
        raise bad(f"'weights.size' must be a byte count, got {w.get('size')!r}")


def _validate_labels(labels: list, bad) -> None:
    seen: set[int] = set()
    for i, label in enumerate(labels):
        if not isinstance(label, dict):
            raise bad(f"labels[{i}] must be an object {{\"value\", \"name\", \"color\"}}, got {label!r}")
        value, name, color = label.get("value"), label.get("name"), label.get("color")
        if not _is_int(value) or value <= 0:
            raise bad(f"labels[{i}].value must be a positive integer (0 is the background), got {value!r}")
        if value in seen:
            raise bad(f"labels[{i}].value {value} is used twice; label values must be unique")
        seen.add(value)
        if not isinstance(name, str) or not name.strip():
            raise bad(f"labels[{i}].name must be a non-empty string, got {name!r}")
        if (not isinstance(color, list) or len(color) != 3
                or not all(_is_int(c) and 0 <= c <= 255 for c in color)):
            raise bad(f"labels[{i}].color (label {name!r}) must be [r, g, b] with integers 0-255, got {color!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


# --------------------------------------------------------------------------- saving

def _prepare_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; tensors sharing storage are cloned (safetensors refuses shared memory)."""
    import torch  # here: reading descriptions and listing the library need no torch

    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise MimError(f"state dict keys must be strings, got {key!r}")
        if not torch.is_tensor(value):
            raise MimError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                           "a bundle holds tensors only (put other values in the description)")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel() > 0:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[key] = t
    return out


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_bundle_files(folder: Path, tensors: dict[str, torch.Tensor], description: dict) -> dict:
    """Write weights + model.json into ``folder``; returns the completed description."""
    weights = folder / WEIGHTS_FILE
    from safetensors.torch import save_file

    save_file(tensors, str(weights), metadata={"format": BUNDLE_FORMAT})
    _fsync(weights)
    desc = dict(description)
    desc["format"] = BUNDLE_FORMAT
    desc["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(weights), "size": weights.stat().st_size}
    validate_description(desc, source="the description given to save_bundle")
    with open(folder / DESCRIPTION_FILE, "w", encoding="utf-8") as f:
        json.dump(desc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return desc


def save_bundle(dest: str | os.PathLike, state_dict: dict[str, torch.Tensor], description: dict,
                as_zip: bool = False) -> Path:
    """Write a model bundle; returns ``dest``.

    ``state_dict``: ``{name: tensor}`` (moved to CPU, made contiguous). ``description``: the
    model.json content; ``format`` and ``weights`` are filled in here (the caller's dict is
    not modified). ``dest`` is the bundle directory, or the zip file when ``as_zip``.
    Writing is atomic: a temporary sibling is renamed into place, replacing an existing
    bundle at ``dest`` (anything else at ``dest`` is refused, never deleted).
    """
    dest = Path(dest)
    try:
        description = json.loads(json.dumps(description))
    except (TypeError, ValueError) as e:
        raise MimError(f"the bundle description must be JSON-serialisable: {e}") from None
    if not isinstance(description, dict):
        raise MimError("the bundle description must be a dict")
    # check everything we can before writing a large weights file
    validate_description(dict(description, format=BUNDLE_FORMAT,
                              weights={"file": WEIGHTS_FILE, "sha256": "0" * 64, "size": 0}),
                         source="the description given to save_bundle")
    tensors = _prepare_tensors(state_dict)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:
        if dest.is_dir():
            raise MimError(f"{dest} is a directory; give a .zip file path to save a zipped bundle")
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
            _write_bundle_files(Path(tmp), tensors, description)
            atomic_write(dest, lambda path: write_zip(Path(tmp), path), verify_zip, what="zipped model bundle")
        return dest
    if dest.exists() and not _is_replaceable_bundle_dir(dest):
        raise MimError(f"{dest} exists and is not a model bundle; choose a new folder for the bundle")
    with atomic_dir(dest, replace=True, what="model bundle") as tmp:
        _write_bundle_files(tmp, tensors, description)
    return dest


def _is_replaceable_bundle_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (
        (path / DESCRIPTION_FILE).is_file() or not any(path.iterdir()))


def write_zip(folder: Path, zip_path: str | os.PathLike) -> None:
    """Zip a bundle directory's model.json and weights (at the zip's root) into ``zip_path``."""
    desc = json.loads((folder / DESCRIPTION_FILE).read_text(encoding="utf-8"))
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.write(folder / DESCRIPTION_FILE, DESCRIPTION_FILE, compress_type=zipfile.ZIP_DEFLATED)
        # float weights hardly compress: store them, which also keeps extraction fast
        zf.write(folder / desc["weights"]["file"], desc["weights"]["file"], compress_type=zipfile.ZIP_STORED)


def verify_zip(zip_path: str | os.PathLike) -> None:
    """Raise ValueError unless every member of ``zip_path`` reads back with its CRC (for
    :func:`mimcore.files.atomic_write`: a zip cut short by a full disk is never renamed into place)."""
    with zipfile.ZipFile(zip_path) as zf:
        bad = zf.testzip()
    if bad is not None:
        raise ValueError(f"member {bad!r} of the written zip does not read back")


# --------------------------------------------------------------------------- loading

def read_description(json_path: Path) -> dict:
    """Parse and validate a model.json file (no weights are read)."""
    try:
        text = json_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MimError(f"{json_path} is missing: a model bundle is a folder with model.json and "
                       f"{WEIGHTS_FILE} (or a .zip of it)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MimError(f"cannot read {json_path} ({e}); is this a model bundle?") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise MimError(f"{json_path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): "
                       "the file is damaged or incomplete; re-download or re-export the bundle") from None
    validate_description(d, source=json_path)
    return d


def load_bundle(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Bundle:
    """Open a bundle: a directory, its ``model.json``, or a ``.zip`` of it.

    The description is validated; the weights are checked when they are read
    (:meth:`Bundle.state_dict`, :meth:`Bundle.verify`). A zip is extracted once into
    ``cache_dir/<sha256 of the zip>`` (default: the model library's cache).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MimError(f"{path} does not exist; give a model bundle folder, its model.json, or a .zip of it")
    if path.is_dir():
        return Bundle(path, read_description(path / DESCRIPTION_FILE))
    if zipfile.is_zipfile(path):
        return Bundle(*_open_zip(path, cache_dir))
    if path.suffix.lower() == ".json":
        desc = read_description(path)
        if path.name != DESCRIPTION_FILE:
            raise MimError(f"{path}: a bundle's description must be named {DESCRIPTION_FILE}; rename it, "
                           "or pass the bundle folder")
        return Bundle(path.parent, desc)
    raise MimError(_not_a_bundle_message(path))


def _not_a_bundle_message(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(2)
    if path.suffix.lower() in _PICKLE_SUFFIXES or head[:1] == b"\x80":
        return (f"{path} looks like a PyTorch/pickle checkpoint, not a model bundle. mimcore never loads "
                "pickle files because they can run arbitrary code; export the model as a bundle "
                f"(a folder with model.json and {WEIGHTS_FILE}) from a trusted environment")
    return f"{path} is not a model bundle: give a folder with model.json and {WEIGHTS_FILE}, its model.json, or a .zip of it"


def _open_zip(zip_path: Path, cache_dir: str | os.PathLike | None) -> tuple[Path, dict]:
    if cache_dir is None:
        cache_dir = default_cache_dir()
    root = Path(cache_dir) / "bundles"
    key = sha256_file(zip_path)
    target = root / key
    if not (target / ".complete").is_file():
        root.mkdir(parents=True, exist_ok=True)
        clean_orphans(root, min_age_s=STALE_EXTRACTION_S)  # what killed extractions left
        if target.exists():  # left incomplete by hand: start over
            shutil.rmtree(target, ignore_errors=True)
        try:
            # built under a temporary name and renamed when complete: any failure (a refused
            # or broken zip, a bundle that does not verify, a full disk) leaves nothing here
            with atomic_dir(target, what="extracted model bundle") as tmp:
                inner = extract_zip_bundle(zip_path, tmp)
                try:
                    Bundle(inner, read_description(inner / DESCRIPTION_FILE)).verify()
                except MimError as e:
                    raise MimError(f"the zipped model bundle {zip_path} is damaged, nothing was kept: {e}") from None
                (tmp / ".complete").touch()
        except OutputError:
            if not (target / ".complete").is_file():  # not a concurrent extraction that won
                raise
    inner = _bundle_root_in(target)
    return inner, read_description(inner / DESCRIPTION_FILE)


def default_cache_dir() -> Path:
    """Where zips are extracted: the model library's cache, or a temporary folder if that is not writable."""
    from mimcore.bundles.layout import cache_dir

    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"mimcore-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _bundle_root_in(folder: Path) -> Path:
    """The folder holding model.json: the extraction root, or its single sub-folder."""
    if (folder / DESCRIPTION_FILE).is_file():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX"]
    if len(subdirs) == 1 and (subdirs[0] / DESCRIPTION_FILE).is_file():
        return subdirs[0]
    raise MimError(f"no {DESCRIPTION_FILE} at the top of the zip {folder}")


def extract_zip_bundle(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Safely extract a zipped bundle into the existing directory ``dest``; returns the bundle folder.

    Refused (:class:`MimError`, nothing extracted): absolute paths, ``..`` components,
    backslashes, symlinks and other special files, duplicate names, more entries than a
    bundle has (MAX_MEMBERS), zip bombs (MAX_UNPACKED_BYTES, MAX_TOTAL_RATIO, MAX_RATIO),
    more than the disk has free, and zips without a
    model.json at the top (or in a single top-level folder). A zip holding a pickle
    (``torch.save`` writes zips of pickles) is named as such and never unpickled.
    A failure half-way (a damaged member, a full disk) removes what was written into
    ``dest`` before the :class:`MimError` is raised.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise MimError(f"{zip_path} is not a readable zip file ({e}); re-download or re-export the bundle") from None
    with zf:
        if len(zf.infolist()) > MAX_MEMBERS:
            raise MimError(f"{zip_path} holds {len(zf.infolist())} entries; a model bundle is a handful of files "
                           f"(model.json and {WEIGHTS_FILE}), at most {MAX_MEMBERS}. Refusing to extract it: "
                           "zip only the bundle folder (`mim models export NAME out.zip` writes such a zip)")
        members = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        names = [i.filename for i in members]
        for info in members:
            _check_member(zip_path, info)
        if len(set(names)) != len(names):
            raise MimError(f"{zip_path} lists the same file twice; refusing an ambiguous zip")
        _check_sizes(zip_path, members)
        _check_free_space(zip_path, members, dest)
        files = [n for n in names if not n.endswith("/")]
        prefix = _zip_bundle_prefix(zip_path, files)
        before = set(os.listdir(dest))
        try:
            for info in members:
                target = dest.joinpath(*PurePosixPath(info.filename).parts)
                if not target.resolve().is_relative_to(dest.resolve()):
                    raise MimError(f"{zip_path}: member {info.filename!r} would be written outside the bundle folder")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except BaseException as e:
            _remove_new_entries(dest, before)  # a failure half-way leaves nothing behind
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise MimError(f"the disk filled up while extracting {zip_path} into {dest} (no space left on "
                               "device); nothing was kept. Free some space (or set MIM_MODELS_DIR to a folder on a "
                               "larger disk) and try again") from None
            if isinstance(e, (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError)):
                # RuntimeError: encrypted; NotImplementedError: unsupported compression
                raise MimError(f"{zip_path} cannot be extracted ({e}); nothing was kept. Re-download or "
                               "re-export the bundle (or free some disk space, if that is the cause)") from None
            raise
    return dest / prefix if prefix else dest


def _remove_new_entries(folder: Path, before: set[str]) -> None:
    """Delete what appeared in ``folder`` since its listing was ``before``."""
    for name in set(os.listdir(folder)) - before:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _check_member(zip_path: Path, info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = PurePosixPath(name).parts
    unsafe = (not name or name.startswith("/") or "\\" in name or "\0" in name
              or re.match(r"^[A-Za-z]:", name) is not None or ".." in parts)
    if unsafe:
        raise MimError(f"{zip_path} contains the path {name!r}, which would leave the bundle folder; "
                       "refusing to extract it (the zip is broken or malicious)")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise MimError(f"{zip_path} contains a symbolic link {name!r}; bundles hold plain files only, "
                       "refusing to extract it")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise MimError(f"{zip_path} contains {name!r}, which is not a plain file; refusing to extract it")


def _check_sizes(zip_path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Refuse zip bombs before writing anything (zipfile never yields more than a member's
    declared size, so the declared sizes bound what extraction writes)."""
    total = sum(i.file_size for i in members)
    if total > MAX_UNPACKED_BYTES:
        raise MimError(f"{zip_path} would unpack to {total / 2**30:.1f} GiB, more than a model bundle's limit of "
                       f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB; refusing to extract it (the zip is broken or malicious)")
    archive = zip_path.stat().st_size
    if total > MAX_TOTAL_RATIO_FROM_BYTES and total > MAX_TOTAL_RATIO * archive:
        raise MimError(f"{zip_path} would unpack to {total / 2**20:.0f} MiB, {total / max(1, archive):.0f} times its "
                       f"own size ({archive / 2**20:.1f} MiB); model weights hardly compress, so a bundle unpacks to "
                       f"at most {MAX_TOTAL_RATIO} times its zip. Refusing a likely zip bomb")
    for info in members:
        if info.file_size > MAX_RATIO_FROM_BYTES and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise MimError(f"{zip_path}: member {info.filename!r} unpacks {info.file_size / max(1, info.compress_size):.0f}"
                           f" times larger than it is stored ({info.file_size / 2**20:.0f} MiB); model weights do not "
                           "compress like that, refusing a likely zip bomb")


def _check_free_space(zip_path: Path, members: list[zipfile.ZipInfo], dest: Path) -> None:
    """Refuse to start an extraction the disk cannot hold (it would fail half-way)."""
    need = sum(i.file_size for i in members)
    free = free_bytes(dest)
    if free is not None and need > free:
        raise MimError(f"{zip_path} unpacks to {need / 2**20:.1f} MiB but only {free / 2**20:.1f} MiB are free in "
                       f"{dest}; free some space (or set MIM_MODELS_DIR to a folder on a larger disk) and try again")


def _zip_bundle_prefix(zip_path: Path, files: list[str]) -> str:
    if DESCRIPTION_FILE in files:
        return ""
    tops = {PurePosixPath(n).parts[0] for n in files}
    if len(tops) == 1:
        top = tops.pop()
        if f"{top}/{DESCRIPTION_FILE}" in files:
            return top
    if any(n.endswith(".pkl") or n.endswith("/data.pkl") for n in files):
        raise MimError(f"{zip_path} is a PyTorch (torch.save) checkpoint holding a pickle, not a model bundle. "
                       "mimcore never loads pickles because they can run arbitrary code; export the model "
                       f"as a bundle (model.json + {WEIGHTS_FILE}) from a trusted environment")
    raise MimError(f"{zip_path} is not a zipped model bundle: no {DESCRIPTION_FILE} at its top "
                   "(or in a single top-level folder)")
