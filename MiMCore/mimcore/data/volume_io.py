"""Reading and writing 3D volumes with their geometry, through SimpleITK only.

Conventions used everywhere in ``mimcore``:

* ``Volume.array`` has shape ``(X, Y, Z)``: index ``[i, j, k]`` runs along the image's
  first, second and third axis (x fastest in the file). This is the transpose of
  ``SimpleITK.GetArrayFromImage``, which returns ``(Z, Y, X)``, and the layout that
  MONAI and nibabel use.
* ``Volume.affine`` is a 4x4 float64 matrix mapping a voxel index ``(i, j, k, 1)`` to
  RAS millimetres (x towards the patient's Right->Left is *negative* x: R is +x, A is
  +y, S is +z). ITK/DICOM geometry is LPS; RAS is LPS with x and y negated.

Supported inputs: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and DICOM series directories. Every failure a user can cause is a
:class:`mimcore.errors.MimError` whose message says what is wrong and what to do; NaN or
infinite voxels are refused (in NIfTI they are counted on the raw data with nibabel, since
ITK reads them as 0). Writing (:func:`save_volume`, :func:`write_image`) is atomic and
verified (:func:`mimcore.files.atomic_write`): a full disk is an OutputError, never a
truncated file at the final name.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mimcore.errors import MimError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder holding one DICOM series"


@dataclass
class Volume:
    """A 3D scalar volume with its geometry.

    array:  ``(X, Y, Z)`` float32, ``array[i, j, k]`` is the voxel at index (i, j, k).
    affine: ``(4, 4)`` float64, ``affine @ (i, j, k, 1)`` is that voxel's centre in RAS mm.
    source: where it came from (a path, or a description).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """``(3,)`` voxel size in mm along i, j, k (norms of the affine's columns)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin_ras(self) -> np.ndarray:
        """``(3,)`` RAS position in mm of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def direction_ras(self) -> np.ndarray:
        """``(3, 3)`` unit column vectors: the RAS directions of the i, j, k axes."""
        return self.affine[:3, :3] / self.spacing


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """The ``(4, 4)`` voxel-index -> RAS affine of a 3D SimpleITK image (LPS geometry)."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(np.array(image.GetSpacing(), dtype=np.float64))
    affine[:3, 3] = _LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=np.float64)
    return affine


def sitk_geometry(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """LPS ``(origin, spacing, direction)`` for SimpleITK from a RAS ``(4, 4)`` affine.

    Raises MimError when the affine is not finite, has a zero-length axis or a shear
    (ITK images need an orthonormal direction matrix).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise MimError(f"The affine must be a finite 4x4 matrix, got shape {affine.shape}. "
                       "Pass the affine of the volume the array came from.")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise MimError(f"The affine has a zero-length axis (spacing {spacing.tolist()}). "
                       "Pass the affine of the volume the array came from.")
    direction = affine[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise MimError("The affine has a shear (its axes are not perpendicular), which NIfTI/NRRD "
                       "via ITK cannot store. Resample the volume onto a grid without shear first.")
    origin = _LPS_TO_RAS @ affine[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple((_LPS_TO_RAS @ direction).ravel().tolist())


def itk_message(err: Exception) -> str:
    """The useful line of an ITK exception (ITK messages carry C++ file names first)."""
    text = str(err)
    match = re.search(r"(?:sitk::ERROR|itk::ERROR)[^:]*:\s*(.+)", text)
    if match:
        return match.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@contextlib.contextmanager
def quiet_itk():
    """Silence ITK's own warnings on stderr (we report problems as MimError/warnings)."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def volume_stem(path: str | os.PathLike, seg: bool = False) -> str:
    """A volume file's name without its volume suffix (any case; ``.nii.gz`` is one suffix):
    ``/data/CT_001.nii.gz`` -> ``CT_001``. ``seg``: also without a trailing ``.seg`` (3D Slicer's
    ``.seg.nrrd``). A name without a volume suffix (a DICOM folder) is returned whole."""
    name = Path(str(path).rstrip("/\\")).name
    suffix = next((s for s in VOLUME_SUFFIXES if name.lower().endswith(s)), "")
    name = name[: len(name) - len(suffix)]
    if seg and name.lower().endswith(".seg"):
        name = name[:-4]
    return name


def volume_suffix(path: str | os.PathLike) -> str:
    """The lower-case suffix of a volume path, with ``.nii.gz`` as one suffix."""
    path = Path(path)
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def dicom_series_files(folder: str | os.PathLike, warn: bool = True) -> list[str]:
    """The slice files of the DICOM series in ``folder`` (sorted by GDCM), or ``[]``.

    With several series, the one with the most files is chosen (and a warning says so).
    """
    folder = str(folder)
    reader = sitk.ImageSeriesReader
    with quiet_itk():
        series_ids = reader.GetGDCMSeriesIDs(folder)
        candidates = [list(reader.GetGDCMSeriesFileNames(folder, sid)) for sid in series_ids]
    candidates = [files for files in candidates if files]
    if not candidates:
        return []
    candidates.sort(key=len, reverse=True)
    if len(candidates) > 1 and warn:
        sizes = ", ".join(str(len(files)) for files in candidates)
        warnings.warn(f"{folder} holds {len(candidates)} DICOM series ({sizes} files); using the one "
                      f"with the most files ({len(candidates[0])}). Put each series in its own folder "
                      "to choose another.", stacklevel=3)
    return candidates[0]


def _read_dicom_series(folder: Path) -> sitk.Image:
    files = dicom_series_files(folder)
    if not files:
        found = sorted(p.name for p in folder.iterdir() if volume_suffix(p) in VOLUME_SUFFIXES)[:5]
        hint = f" It holds volume files ({', '.join(found)}): pass one of them instead." if found else ""
        raise MimError(f"No DICOM series found in folder {folder}.{hint} Pass a folder that contains "
                       f"the DICOM files of one series, or a volume file: {_SUPPORTED}.")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with quiet_itk():
            return reader.Execute()
    except RuntimeError as err:
        raise MimError(f"Could not read the DICOM series in {folder} ({len(files)} files): "
                       f"{itk_message(err)}. Check that the series is complete and not compressed "
                       "with an unsupported transfer syntax.") from None


def _read_file(path: Path) -> sitk.Image:
    suffix = volume_suffix(path)
    if suffix not in VOLUME_SUFFIXES:
        io_name = ""
        with quiet_itk(), contextlib.suppress(RuntimeError):
            io_name = sitk.ImageFileReader().GetImageIOFromFileName(str(path))
        if io_name == "GDCMImageIO":
            raise MimError(f"{path} is a single DICOM file. Pass the folder that holds the whole "
                           f"series instead: {path.parent}")
        raise MimError(f"Unsupported file type '{suffix or path.name}' for {path}. "
                       f"mimcore reads {_SUPPORTED}. Convert it, e.g. with 3D Slicer (Save as .nrrd).")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as err:
        raise MimError(f"Could not read {path}: {itk_message(err)}. The file is damaged or not a "
                       f"valid {suffix} image; re-export it.") from None
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(path, reader)
    return image


def _check_nifti_complete(path: Path, reader: sitk.ImageFileReader, full: bool = False) -> None:
    """ITK's NIfTI reader fills a truncated file's missing voxels with zeros, silently.

    Compare the data length implied by the header (as ITK parsed it) with what the
    file holds. For ``.nii.gz`` the gzip trailer's length field is compared first; only
    when it disagrees (or with ``full``, used to verify a file just written) is the whole
    stream decompressed (which checks end marker and CRC).
    """
    keys = set(reader.GetMetaDataKeys())
    if not {"vox_offset", "bitpix", "dim[0]"} <= keys or reader.GetMetaData("nifti_type") not in ("1", "4"):
        return  # not a single-file NIfTI-1 or NIfTI-2: nothing to compare
    ndim = int(reader.GetMetaData("dim[0]"))
    voxels = int(np.prod([int(reader.GetMetaData(f"dim[{d}]")) for d in range(1, ndim + 1)]))
    expected = int(float(reader.GetMetaData("vox_offset"))) + voxels * int(reader.GetMetaData("bitpix")) // 8
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as raw:  # fast path: the gzip trailer holds the length mod 2**32
            raw.seek(max(path.stat().st_size - 4, 0))
            if not full and int.from_bytes(raw.read(4), "little") == expected % (1 << 32):
                return
        length = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    length += len(chunk)
        except (OSError, EOFError, zlib.error) as err:
            raise MimError(f"{path} is truncated or damaged ({err}). Copy or download it again.") from None
    else:
        length = path.stat().st_size
    if length < expected:
        raise MimError(f"{path} is truncated: its header needs {expected} bytes, the file holds {length}. "
                       "Copy or download it again.")


def _as_3d_scalar(image: sitk.Image, path: Path) -> sitk.Image:
    """Squeeze a trailing size-1 4th axis and a single vector component; refuse the rest."""
    size = list(image.GetSize())
    components = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() == 4 and size[3] == 1:
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        kind = {2: "2D"}.get(image.GetDimension(), f"{image.GetDimension()}D")
        raise MimError(f"{path} is a {kind} image of size {'x'.join(map(str, size))}; mimcore needs a "
                       "single 3D volume. For a time series or multi-volume file, save the one 3D "
                       "volume you want (e.g. in 3D Slicer) and pass that.")
    if components > 1:
        raise MimError(f"{path} has {components} values per voxel (a vector/colour image); mimcore "
                       "needs one scalar per voxel. Extract or convert to one grey-value channel first.")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise MimError(f"{path} has complex voxels; convert it to real values (e.g. magnitude) first.")
    if "vector" in image.GetPixelIDTypeAsString().lower():  # one-component vector image
        image = sitk.VectorIndexSelectionCast(image, 0)
    return image


def load_volume(path: str | os.PathLike) -> Volume:
    """Load a 3D volume as float32 ``(X, Y, Z)`` with its RAS affine.

    ``path`` is a NIfTI/NRRD/MetaImage file or a folder with a DICOM series (the largest
    series when there are several, with a warning). Raises MimError for a missing path,
    an unreadable or unsupported file, a non-3D or vector image, or NaN/infinite voxels.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MimError(f"No such file or folder: {path}. Check the path (relative paths are "
                       f"relative to {Path.cwd()}).")
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    image = _as_3d_scalar(image, path)
    is_float = image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
    counts = None
    if is_float and not path.is_dir() and volume_suffix(path) in (".nii", ".nii.gz"):
        counts = nifti_nonfinite_counts(path)  # ITK reads NaN/Inf in NIfTI as 0: look at the raw data
    float_image = sitk.Cast(image, sitk.sitkFloat32)
    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(float_image).transpose(2, 1, 0))
    if counts is None and is_float:
        counts = (int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array))), array.size)
    if counts and (counts[0] or counts[1]):
        raise MimError(nonfinite_message(path, *counts))
    return Volume(array, affine_from_sitk(image), str(path))


def nonfinite_message(path, nan: int, inf: int, total: int) -> str:
    """What is wrong with a volume holding NaN/infinite voxels, and what to do."""
    parts = [f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n]
    share = "all" if nan + inf == total else f"{100.0 * (nan + inf) / max(total, 1):.3g} %"
    why = (" SimpleITK, and so 3D Slicer, reads them in NIfTI as 0 (water in CT), so a segmentation of it "
           "would look valid and be wrong." if volume_suffix(path) in (".nii", ".nii.gz") else "")
    return (f"{path} has {nan + inf} NaN or infinite voxel(s) ({', '.join(parts)}) out of {total} ({share}).{why} "
            "Replace them with the background value (for CT -1024, e.g. numpy.nan_to_num(data, nan=-1024) "
            "with nibabel) or crop them away, then run again.")


def nifti_nonfinite_counts(path: str | os.PathLike, chunk_bytes: int = 1 << 26) -> tuple[int, int, int] | None:
    """``(NaN count, infinite count, voxel count)`` of a floating-point NIfTI's raw data, read
    with nibabel independently of ITK (which turns both into 0), in chunks of ``chunk_bytes``
    (memory stays small for big volumes; a ``.nii.gz`` is decompressed once).

    Returns None when nibabel cannot parse the file (the caller then checks the array ITK
    returned); ``(0, 0, n)`` for integer data, which cannot hold NaN.
    """
    try:
        import nibabel as nib
        from nibabel.openers import ImageOpener

        img = nib.load(str(path))
        dtype = img.header.get_data_dtype()
        offset = int(img.dataobj.offset)
        total = int(np.prod(img.shape))
    except Exception:  # noqa: BLE001 - not parseable by nibabel: fall back to ITK's array
        return None
    if dtype.kind not in "fc":
        return 0, 0, total
    step = max(chunk_bytes // dtype.itemsize, 1) * dtype.itemsize
    nan = inf = 0
    remaining = total * dtype.itemsize
    with ImageOpener(str(path), "rb") as stream:
        stream.seek(offset)
        while remaining > 0:
            data = stream.read(min(step, remaining))
            if not data:
                break
            values = np.frombuffer(data[: len(data) - len(data) % dtype.itemsize], dtype=dtype)
            nan += int(np.count_nonzero(np.isnan(values)))
            inf += int(np.count_nonzero(np.isinf(values)))
            remaining -= len(data)
    return nan, inf, total


def _prepare_array(array, dtype) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor / MetaTensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise MimError(f"save_volume needs an (X, Y, Z) or (1, X, Y, Z) array, got shape {array.shape}.")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    dtype = np.dtype(dtype) if dtype is not None else (
        np.dtype(np.float32) if array.dtype == np.float64 else array.dtype)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)):
            raise MimError("Cannot save NaN or infinite values as an integer image.")
        array = np.rint(array)
    if np.issubdtype(dtype, np.integer) and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise MimError(f"Values {array.min()}..{array.max()} do not fit in {dtype.name}; "
                           "choose a wider dtype.")
    return array.astype(dtype, copy=False)


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image (LPS geometry) of ``array`` ``(X, Y, Z)`` placed by its RAS ``(4, 4)`` affine."""
    origin, spacing, direction = sitk_geometry(affine)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def save_volume(path: str | os.PathLike, array, affine: np.ndarray | None = None,
                reference: Volume | str | os.PathLike | None = None, dtype=None, what: str = "volume") -> Path:
    """Write ``array`` (``(X, Y, Z)`` or ``(1, X, Y, Z)``, numpy or torch) with its RAS affine.

    The format follows the suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``,
    ``.mhd``). ``affine`` may be omitted when ``reference`` (a Volume or a volume path) is
    given: the array is then written on the reference's grid, and its shape must match.
    ``dtype`` sets the voxel type on disk (e.g. ``np.uint8`` for label maps; values are
    rounded); default: the array's dtype (float64 is written as float32). ``what`` names the
    file in error messages (``"label map"``). Written atomically and verified
    (:func:`write_image`). Returns the written path.
    """
    path = Path(path).expanduser()
    if volume_suffix(path) not in WRITE_SUFFIXES:
        raise MimError(f"Cannot write '{path.name}': use one of {', '.join(WRITE_SUFFIXES)}.")
    array = _prepare_array(array, dtype)
    if reference is not None:
        ref = reference if isinstance(reference, Volume) else load_volume(reference)
        if tuple(array.shape) != ref.shape:
            raise MimError(f"Array shape {array.shape} does not match the reference grid {ref.shape} "
                           f"of {ref.source}; resample the array onto that grid first.")
        if affine is None:
            affine = ref.affine
    if affine is None:
        raise MimError("save_volume needs an affine or a reference volume to place the array in space.")
    image = to_sitk(array, affine)
    return write_image(image, path, what=what)


DETACHED_SUFFIXES = (".nhdr", ".mhd")


def verify_volume_file(path: str | os.PathLike, size: tuple[int, ...] | None = None) -> None:
    """Check that a volume file just written is complete: its header reads back with size
    ``size``; for NIfTI the data the header needs is all there (the whole gzip stream of a
    ``.nii.gz`` decompresses, in constant memory; ITK alone would read a truncated NIfTI
    with zeros); other formats are read whole by ITK (its NRRD and MetaImage readers fail
    on missing data). Raises OSError saying what is wrong."""
    path = Path(path)
    nifti = volume_suffix(path) in (".nii", ".nii.gz")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
            if not nifti:
                reader.Execute()
    except RuntimeError as err:
        raise OSError(f"the file written does not read back ({itk_message(err)})") from None
    if size is not None and tuple(reader.GetSize()) != tuple(size):
        raise OSError(f"the file written reads back with size {reader.GetSize()}, not {tuple(size)}")
    if nifti:
        try:
            _check_nifti_complete(path, reader, full=True)
        except MimError as err:
            raise OSError(f"the file written is incomplete ({str(err).split('. Copy')[0]})") from None


def write_image(image: sitk.Image, path: str | os.PathLike, what: str = "volume") -> Path:
    """Write a SimpleITK image atomically (:func:`mimcore.files.atomic_write`) and verify it
    (:func:`verify_volume_file`); the format follows the suffix. Errors a C library prints
    instead of raising (NIfTI on a full disk) are caught and become the message.

    For the two-file formats (``.nhdr``, ``.mhd``) both files are written and verified in a
    temporary folder, then the data file is moved into place and the header last, so the
    header (the name a user opens) appears only when both are complete.
    Raises :class:`~mimcore.errors.OutputError` ("no space left on device" ...) and leaves
    nothing at ``path`` when anything fails.
    """
    from mimcore.files import apply_umask, atomic_write, captured_c_stderr

    path = Path(path).expanduser()
    suffix = volume_suffix(path)
    printed: list[str] = []

    def itk_write(target: str) -> None:
        try:
            with quiet_itk(), captured_c_stderr(printed):
                sitk.WriteImage(image, target, useCompression=True)
        except RuntimeError as err:
            raise RuntimeError(itk_message(err)) from None

    def write(tmp: str) -> None:
        if suffix not in DETACHED_SUFFIXES:
            itk_write(tmp)
            return
        import shutil
        import tempfile

        work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            itk_write(str(work / path.name))
            verify(str(work / path.name))  # before anything moves next to the final name
            for item in work.iterdir():
                if item.name != path.name:  # the data file, named after the final header
                    apply_umask(item)
                    os.replace(item, path.parent / item.name)
            shutil.copyfile(work / path.name, tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def verify(tmp: str) -> None:
        try:
            verify_volume_file(tmp, image.GetSize())
        except OSError as err:
            said = " ".join(" ".join(printed).split()).replace("** ERROR:", "").strip()
            raise OSError(f"{err}{'; the writer said: ' + said if said else ''}") from None

    written = atomic_write(path, write, verify, keep_suffix=suffix, what=what)
    text = "".join(printed).strip()
    if text:  # the writer printed something yet wrote a complete file: pass it on
        print(text, file=sys.stderr)
    return written
