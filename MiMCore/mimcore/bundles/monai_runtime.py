"""What an exported MONAI bundle calls at run time (``python -m monai.bundle run``).

:mod:`mimcore.bundles.monai_export` writes ``configs/inference.json`` so that

- ``bundle_root`` is :func:`bundle_root`: the folder the runner was pointed at with
  ``--config_file``, wherever it is started from (``--bundle_root DIR`` still overrides it);
- the inputs are :func:`input_files` of ``dataset_dir``: the same volumes ``mim segment``
  takes from a folder (NIfTI, NRRD, MetaImage, DICOM series subfolders); none is a clear
  message and exit code 2, not a run that succeeds without output;
- images are read by :class:`VolumeReader` (SimpleITK, as ``mim segment`` reads them), so
  NRRD and MetaImage need neither ITK nor pynrrd.

Kept free of torch at import time beyond what MONAI itself imports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

CONFIG_FILE = Path("configs") / "inference.json"
WEIGHTS_FILE = Path("models") / "model.pt"
EXIT_USAGE = 2  # what every mimcore command exits with for a wrong input


def _fail(message: str) -> None:
    """Print ``message`` (what is wrong and what to do) and exit with code 2.

    Raised as SystemExit so that MONAI's config evaluation, which wraps every Exception in
    a RuntimeError traceback, lets it through to the runner's caller.
    """
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def is_bundle_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds an exported bundle (``configs/inference.json`` and ``models/model.pt``)."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def bundle_root() -> str:
    """The exported bundle's folder, as an absolute path.

    MONAI's ``ConfigWorkflow.run`` puts the folder above ``--config_file``'s ``configs/``
    at ``sys.path[1]`` before it evaluates the bundle (its documented way of making a
    bundle's own code importable); the first ``sys.path`` entry after the script's own
    (``sys.path[0]``, the working directory under ``python -m``) that holds a bundle is it.
    The working directory is the last resort (the model-zoo convention, ``bundle_root: "."``).
    Programs that parse the config themselves (MONAI Label, a notebook) set ``bundle_root``;
    when they do not and none is found, a :class:`~mimcore.errors.MimError` says so (an
    exception, not an exit: it may run inside a server).
    """
    from mimcore.errors import MimError

    for entry in sys.path[1:]:
        if entry and is_bundle_folder(entry):
            return str(Path(entry).resolve())
    if is_bundle_folder("."):
        return str(Path.cwd())
    raise MimError("cannot tell where this MONAI bundle is (no configs/inference.json with models/model.pt on "
                   "sys.path or in the working directory); run it with `python -m monai.bundle run --config_file "
                   "BUNDLE/configs/inference.json`, or set bundle_root (--bundle_root BUNDLE)")


def input_files(dataset_dir: str | os.PathLike) -> list[str]:
    """The volumes to segment in ``dataset_dir``, sorted: NIfTI (.nii, .nii.gz), NRRD (.nrrd,
    .nhdr), MetaImage (.mha, .mhd) files and DICOM series subfolders, as ``mim segment`` takes
    them from a folder. A missing folder or one without volumes exits with code 2 and says so."""
    from mimcore.data.datalist import volumes_from_folder
    from mimcore.errors import MimError

    folder = Path(dataset_dir).expanduser()
    if not folder.is_dir():
        _fail(f"the input folder {folder} does not exist; pass --dataset_dir FOLDER with the CT volumes to "
              "segment (NIfTI, NRRD, MetaImage files or DICOM series subfolders)")
    try:
        return [str(p) for p in volumes_from_folder(folder)]
    except MimError as e:
        _fail(f"{e} (pass --dataset_dir FOLDER)")
    return []  # not reached


class VolumeReader(ImageReader):
    """A MONAI image reader that reads like ``mim segment``: SimpleITK through
    :func:`mimcore.data.volume_io.load_volume` (NIfTI, NRRD, MetaImage, DICOM series folders;
    2D/4D/NaN inputs refused with a clear message). The array is ``(X, Y, Z)`` float32 with
    its RAS affine, the metadata MONAI's NibabelReader gives (``affine``,
    ``original_affine``, ``spatial_shape``, ``space`` RAS, no channel)."""

    SUFFIXES = ("nii", "nii.gz", "nrrd", "nhdr", "mha", "mhd")

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True for the volume file suffixes above and for folders (DICOM series)."""
        names = [str(f) for f in ensure_tuple(filename)]
        return all(Path(n).is_dir() or n.lower().endswith(tuple("." + s for s in self.SUFFIXES)) for n in names)

    def read(self, data, **kwargs):
        """One path (a list is refused: an exported bundle reads one volume per case)."""
        from mimcore.data.volume_io import load_volume

        names = ensure_tuple(data)
        if len(names) != 1:
            raise ValueError(f"VolumeReader reads one volume at a time, got {len(names)} paths")
        return load_volume(names[0])

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """``(array (X, Y, Z), meta)`` of a :class:`~mimcore.data.volume_io.Volume`."""
        affine = np.asarray(img.affine, dtype=np.float64)
        meta = {
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(img.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
        }
        return img.array, meta
