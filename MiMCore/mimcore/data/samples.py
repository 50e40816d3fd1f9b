"""Real sample CT volumes for demos and tests, fetched from a pinned, verified source.

Source: ``tests/reference_files/`` of the source distribution (sdist) of
``totalsegmentator==2.18.0`` (Apache-2.0), obtained with ``pip download`` (pip checks
the archive's sha256 before it runs anything from it; we check it again, and every
extracted file's sha256). Label names come from ``class_map["total"]`` in the same
archive's ``totalsegmentator/map_to_binary.py``, read with ``ast`` (never imported).

What ``datalist.json`` holds (paths relative to its folder; all volumes are ``(X, Y, Z)``
once loaded with :func:`mimcore.data.volume_io.load_volume`):

* ``training`` (labelled CT, TotalSegmentator "total" labels):
  ``example_ct_sm.nii.gz`` + ``example_seg.nii.gz`` (abdomen, 122x101x30, 3 mm, 41 classes)
  and the Siemens DICOM series ``example_ct_dicom/`` + ``example_seg_dicom.nii.gz``
  (512x512x20, 0.98x0.98x2 mm, 31 classes). Note: ``example_seg.nii.gz`` is drawn on
  the grid of ``example_ct_sm.nii.gz`` (30 slices), not of ``example_ct.nii.gz`` (112),
  and ``example_seg_dicom.nii.gz`` stores the DICOM grid with the y axis reversed, so
  image and label only line up through their affines (e.g. ``Orientationd`` on both).
* ``validation`` and ``test``: empty (two labelled cases are too few to split).
* ``pretraining`` (CT images only, for self-supervised MiM pre-training):
  ``example_ct.nii.gz`` (abdomen, 122x101x112, 3 mm) and ``example_ct_dicom``.
* ``held_out`` (never trained on; for the ``mim reconstruct`` / ``mim segment`` demos):
  ``aorta_report/example_ct.nii.gz`` (chest, 233x167x191, 1.5 mm).
* ``mr``: ``example_mr_sm.nii.gz`` (MR, ``"modality": "MR"``): kept out of every CT list.

Cache folder: ``cache_dir`` argument > ``$MIM_DATA_DIR`` > ``platformdirs.user_cache_dir("mimcore")/samples``;
the files go to its subfolder ``totalsegmentator-2.18.0/``, written atomically.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

import platformdirs
import SimpleITK as sitk

from mimcore.data.datalist import datalist_entries, volumes_from_folder  # noqa: F401  (public API)
from mimcore.data.volume_io import dicom_series_files, load_volume
from mimcore.errors import MimError
from mimcore.files import sha256_file

PACKAGE, VERSION = "totalsegmentator", "2.18.0"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
SAMPLE_DIRNAME = f"{PACKAGE}-{VERSION}"
_REFERENCE = f"{PACKAGE}-{VERSION}/tests/reference_files/"
_LABEL_SOURCE = f"{PACKAGE}-{VERSION}/totalsegmentator/map_to_binary.py"
_DCM = "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.300000221208081134280000"

# sha256 of every file taken from tests/reference_files/ (path relative to that folder)
FILES: dict[str, str] = {
    "example_ct.nii.gz": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    "example_ct_sm.nii.gz": "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
    "example_seg.nii.gz": "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
    "example_seg_dicom.nii.gz": "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc",
    "aorta_report/example_ct.nii.gz": "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
    "example_mr_sm.nii.gz": "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f",
    _DCM + "16573": "4c5633409fa4d3edf6871e5684e9e1b10325b4d0949997582f43b23a684d0dc4",
    _DCM + "16574": "9148f91127145497f4d6c6f0780f9452504cd7fe5088ec8f2bf2b21800c731ff",
    _DCM + "16575": "3edaccec892e0821440cbefe3d5465923bb5146c316cbaf58f578d962f120484",
    _DCM + "16576": "9b68685f0c5f9bfcfc2c397f4fadf431da288d7422ca72e7d9031d4e039418cd",
    _DCM + "16577": "c8d2c0dc05e414d47d3652c658d8fecc20c3cf7ce106c10d84ad033d39700bcc",
    _DCM + "16578": "0ee2c1d58e06cedd91483ca35c04da3c26fea0dbe88aaf1eaa950b57f38357d6",
    _DCM + "16579": "c76cf0818d4215b92883d109b8a0b62ae0a4d81637eed98738f9c62b6f49bb72",
    _DCM + "16580": "106e20514fd3ca66895e14dbfba96c01c1195e4ed890c035d4368dd71f3ee116",
    _DCM + "16581": "5804e6c4a50f4d5b20040ac82a1c6d79cba5f7267d71f10b0a1b49eda1bc13ff",
    _DCM + "16582": "bef219a16b22949224de4581a2d288863b2585d29556ac24021f03307378cb39",
    _DCM + "16583": "9de5a49e880417d5330fe299115fdb95831a98234216a31c5c0e9a0be9a6dcd3",
    _DCM + "16584": "fa00c8d81ec8aa0d0cfc4e05343782c3a75a4c60df8cccf9ff5db42ac454e61d",
    _DCM + "16585": "ebba0900b0f728db0c94c769db3e5ca38a0cd916386a727541eb3e56350770e5",
    _DCM + "16586": "f084ec95cfba25efb7cbe86e8b4966b051904037e8385f58fe398c5475693b89",
    _DCM + "16587": "20a9b88a30ea8a824ac65cb19c1ebf80964b41ff476497706ff2a286e5f27a25",
    _DCM + "16588": "2a515d3b60f3ff733aac1fc5414206c331e3ed2ccef8c2e0c30b844c538e3ed8",
    _DCM + "16589": "5880669f1bc36b09cad4bdf487992ec415da0afa014e927efc282e612f467574",
    _DCM + "16590": "7af4dd5b5766a87368939116b91f90d989820e7b2237fb9bcd10d47db0960875",
    _DCM + "16591": "671306f4462ae881976c18c6a2d8a1567279fb0166ef0e9e8a41271fac9c1cbb",
    _DCM + "16592": "fdb76ad5272f074e07cc81509604fd163f2f8a9903d34b16ba6f078250373c51",
}

_CT = {"modality": "CT"}
SPLIT = {
    "training": [
        {"image": "example_ct_sm.nii.gz", "label": "example_seg.nii.gz", **_CT},
        {"image": "example_ct_dicom", "label": "example_seg_dicom.nii.gz", **_CT},
    ],
    "validation": [],
    "test": [],
    "pretraining": [{"image": "example_ct.nii.gz", **_CT}, {"image": "example_ct_dicom", **_CT}],
    "held_out": [{"image": "aorta_report/example_ct.nii.gz", **_CT}],
    "mr": [{"image": "example_mr_sm.nii.gz", "modality": "MR"}],
}
_OFFLINE_HELP = (
    "Connect this machine to the internet (or set up pip's index/proxy settings) and run again; or, on a "
    f"machine with access, run\n    python -m pip download --no-deps --no-binary :all: {PACKAGE}=={VERSION} -d DIR\n"
    f"copy DIR/{SAMPLE_DIRNAME}.tar.gz here and run\n    mim data samples --from-archive PATH/{SAMPLE_DIRNAME}.tar.gz"
)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$MIM_DATA_DIR``, else the per-user cache ``.../mimcore/samples``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("MIM_DATA_DIR"):
        return Path(os.environ["MIM_DATA_DIR"]).expanduser()
    return Path(platformdirs.user_cache_dir("mimcore")) / "samples"


def fetch_samples(cache_dir: str | os.PathLike | None = None, quiet: bool = False,
                  from_archive: str | os.PathLike | None = None) -> Path:
    """Make sure the verified samples are in the cache; return the path of ``datalist.json``.

    Does nothing (no network) when the cache already holds every file with the right
    sha256. Otherwise downloads the sdist with pip (or uses ``from_archive``, a local copy
    of it), extracts into a temporary folder and renames it into place.
    """
    root = resolve_cache_dir(cache_dir)
    target = root / SAMPLE_DIRNAME
    if target.is_dir():
        problems = _cache_problems(target)
        if not problems:
            if not quiet:
                _say(f"Samples already in {target} ({len(FILES)} files, sha256 verified).")
                _describe(target)
            return target / "datalist.json"
        if not quiet:
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            _say(f"The sample cache {target} is incomplete or modified ({problems[0]}{more}); fetching it again.")
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    except OSError as err:
        raise MimError(f"Cannot create the sample cache in {root}: {err.strerror}. Choose a writable "
                       "folder with --cache-dir or the MIM_DATA_DIR environment variable.") from None
    try:
        _remove_stale(root, keep=work)
        archive = _verified_archive(Path(from_archive)) if from_archive else _pip_download(work, quiet)
        staged = work / SAMPLE_DIRNAME
        _extract_samples(archive, staged)
        _write_datalist(staged)
        _move_into_place(staged, target, work)
    except OSError as err:
        raise MimError(f"Could not write the samples into {root}: {err}. Free some disk space or choose "
                       "another folder with --cache-dir.") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        _say(f"Fetched {len(FILES)} sample files into {target}:")
        _describe(target)
    return target / "datalist.json"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cache_problems(folder: Path) -> list[str]:
    """What is wrong with a cache folder: missing or modified files ([] when all is well)."""
    problems = [f"{rel} missing" for rel in ("datalist.json", "labels_total.json") if not (folder / rel).is_file()]
    for rel, expected in FILES.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel} modified")
    return problems


def _remove_stale(root: Path, keep: Path, age_s: float = 3600) -> None:
    """Delete leftovers of interrupted fetches (older than ``age_s``; others may be running)."""
    for path in root.glob(".partial-*"):
        with contextlib.suppress(OSError):
            if path != keep and time.time() - path.stat().st_mtime > age_s:
                shutil.rmtree(path, ignore_errors=True)


def _verified_archive(archive: Path) -> Path:
    if not archive.is_file():
        raise MimError(f"No such archive: {archive}. Pass the path of {SAMPLE_DIRNAME}.tar.gz.")
    actual = sha256_file(archive)
    if actual != SDIST_SHA256:
        raise MimError(f"{archive} is not the {PACKAGE} {VERSION} source archive: its sha256 is {actual}, "
                       f"expected {SDIST_SHA256}. Download it again:\n    python -m pip download --no-deps "
                       f"--no-binary :all: {PACKAGE}=={VERSION} -d DIR")
    return archive


def _pip_download(work: Path, quiet: bool) -> Path:
    """Download the sdist with this Python's pip, hash-pinned; return the verified archive."""
    requirements = work / "requirements.txt"
    requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
    out = work / "download"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--progress-bar", "off", "-r", str(requirements), "-d", str(out)]
    if not quiet:
        _say(f"Downloading the {PACKAGE} {VERSION} source archive (38 MB) with pip ...")
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MimError(f"Could not run pip to download the samples ({err}).\n{_OFFLINE_HELP}") from None
    archives = sorted(out.glob("*.tar.gz")) if out.is_dir() else []
    if result.returncode != 0 or len(archives) != 1:
        tail = "\n    ".join(result.stdout.strip().splitlines()[-12:])
        raise MimError(f"pip could not download {PACKAGE}=={VERSION} (exit code {result.returncode}). "
                       f"pip said:\n    {tail}\n{_OFFLINE_HELP}")
    return _verified_archive(archives[0])


def _unsafe_member(name: str) -> bool:
    posix = PurePosixPath(name)
    return posix.is_absolute() or ".." in posix.parts or "\\" in name or (len(name) > 1 and name[1] == ":")


def safe_extract(tar: tarfile.TarFile, dest: Path, wanted: dict[str, str]) -> dict[str, str]:
    """Extract ``wanted`` (archive member name -> path under ``dest``); return path -> sha256.

    Refuses the whole archive if any member name is absolute or climbs out with ``..``,
    and refuses wanted members that are links or not regular files.
    """
    dest_abs = dest.resolve()
    hashes = {}
    for member in tar:
        if _unsafe_member(member.name):
            raise MimError(f"Refusing the archive: member '{member.name}' would be written outside the "
                           "target folder. The archive is not the expected one; download it again.")
        if member.name not in wanted:
            continue
        if not member.isreg():
            raise MimError(f"Refusing the archive: '{member.name}' is a link or special file, not a regular file.")
        out = (dest / wanted[member.name]).resolve()
        if dest_abs not in out.parents:
            raise MimError(f"Refusing to write {out}: outside {dest_abs}.")
        out.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with tar.extractfile(member) as source, open(out, "wb") as sink:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                sink.write(chunk)
        hashes[wanted[member.name]] = digest.hexdigest()
    return hashes


def _extract_samples(archive: Path, staged: Path) -> None:
    """Extract and verify FILES, and write labels_total.json, into ``staged``."""
    wanted = {_REFERENCE + rel: rel for rel in FILES}
    wanted[_LABEL_SOURCE] = ".map_to_binary.py"
    try:
        with tarfile.open(archive, "r:gz") as tar:
            hashes = safe_extract(tar, staged, wanted)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise MimError(f"Cannot unpack {archive}: {err}. Delete it and fetch again.") from None
    bad = [rel for rel, sha in FILES.items() if hashes.get(rel) != sha]
    if bad or ".map_to_binary.py" not in hashes:
        raise MimError(f"The archive lacks or has different sample files ({', '.join(bad[:3]) or 'label names'}). "
                       "It is not the expected release; fetch again.")
    source = staged / ".map_to_binary.py"
    labels = parse_total_labels(source.read_text(encoding="utf-8"))
    source.unlink()
    (staged / "labels_total.json").write_text(json.dumps({str(k): v for k, v in labels.items()}, indent=1))


def parse_total_labels(source: str) -> dict[int, str]:
    """``{0: "background", 1: "spleen", ...}`` from the text of TotalSegmentator's map_to_binary.py.

    Finds the dict literal ``class_map = {..., "total": {...}}`` with ``ast`` and evaluates
    only that literal (no code is run).
    """
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets)):
            continue
        for key, value in zip(node.value.keys, node.value.values):
            if isinstance(key, ast.Constant) and key.value == "total":
                names = ast.literal_eval(value)
                if names and all(isinstance(k, int) and k > 0 and isinstance(v, str) for k, v in names.items()):
                    return {0: "background", **dict(sorted(names.items()))}
    raise MimError("Could not find the label names (class_map['total']) in the archive; "
                   "it is not the expected release.")


def _write_datalist(folder: Path) -> None:
    labels = json.loads((folder / "labels_total.json").read_text(encoding="utf-8"))
    split = json.loads(json.dumps(SPLIT))  # deep copy
    for entry in split["training"]:
        values = sorted({int(v) for v in load_volume(folder / entry["label"]).array.ravel()})
        entry["label_values"] = values
    datalist = {
        "name": f"{PACKAGE} {VERSION} sample volumes",
        "description": "Small real CT volumes (and one MR) from tests/reference_files/ of the "
                       f"{PACKAGE} {VERSION} source distribution (Apache-2.0). Labels: TotalSegmentator "
                       "'total' classes. See mimcore.data.samples for the split.",
        "source_sha256": SDIST_SHA256,
        "modality": "CT",
        "labels": labels,
        **split,
    }
    text = json.dumps(datalist, indent=1)
    text = re.sub(r"\[[\d,\s]+\]", lambda m: json.dumps(json.loads(m.group(0))), text)  # number lists on one line
    (folder / "datalist.json").write_text(text + "\n")


def _move_into_place(staged: Path, target: Path, work: Path) -> None:
    """Swap ``staged`` in for ``target`` with renames (same file system), never half-written."""
    if target.exists():
        target.rename(work / "old")
    try:
        staged.rename(target)
    except OSError:
        if target.is_dir() and not _cache_problems(target):
            return  # another process finished the same fetch first
        raise MimError(f"Could not move the samples into {target}. Remove that folder and try again.") from None


def _describe(folder: Path) -> None:
    """Print one line per sample volume: name, size on disk, grid, spacing, labels."""
    datalist = json.loads((folder / "datalist.json").read_text(encoding="utf-8"))
    seen = {}
    for section in ("training", "pretraining", "held_out", "mr"):
        for entry in datalist[section]:
            for key in ("image", "label"):
                if key in entry and entry[key] not in seen:
                    seen[entry[key]] = (section, key, entry)
    for rel, (section, key, entry) in seen.items():
        path = folder / rel
        files = dicom_series_files(path, warn=False) if path.is_dir() else [str(path)]
        size = sum(Path(f).stat().st_size for f in files)
        size = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        grid = list(reader.GetSize()[:3])
        grid[2] = len(files) if path.is_dir() else grid[2]
        spacing = "x".join(f"{s:.2f}" for s in reader.GetSpacing()[:3 if not path.is_dir() else 2])
        what = (f"{len(entry['label_values']) - 1} classes" if key == "label" else entry.get("modality", ""))
        kind = f"DICOM, {len(files)} files" if path.is_dir() else "file"
        grid = "x".join(map(str, grid))
        _say(f"  {rel:34s} {size:>7s}  {grid:12s} {spacing:>16s} mm  {section}/{key} {what} ({kind})")
