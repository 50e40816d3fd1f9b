"""Export a model bundle as a MONAI bundle (for MONAI Label, MONAI Deploy, ``monai.bundle run``).

Layout written::

    configs/metadata.json    versions, task, label channels, the mimcore description
    configs/inference.json   network_def, preprocessing, sliding-window inferer, postprocessing
    configs/logging.conf     MONAI's runner applies it (plain console logging)
    models/model.pt          the plain state dict (tensors only: torch.load(weights_only=True))
    docs/README.md           what the model segments and how to run it

``network_def`` is ``{"_target_": "mimcore.models.segnet.build_segnet", "architecture": ...}``,
so the MONAI bundle needs ``mimcore`` installed; running ``inference.json`` with
``python -m monai.bundle run`` also needs ``fire`` (the runner's command line) and
``pytorch-ignite`` (MONAI's evaluator): :data:`RUNNER_PACKAGES`, recorded in the metadata's
``required_packages_version`` (MONAI's current name: it renames a deprecated
``optional_packages_version`` onto it) and the README.
The preprocessing repeats mimcore's: orientation, optional resampling to ``spacing``
(mm), the HU window ``[hu_min, hu_max]`` mapped to ``[b_min, b_max]`` (default [0, 1]);
the prediction is inverted back onto the input CT's grid before it is saved.

The bundle runs from any working directory: ``bundle_root`` is where the runner found
``configs/inference.json`` (:func:`mimcore.bundles.monai_runtime.bundle_root`; ``--bundle_root``
overrides it), inputs are every volume in ``dataset_dir`` that ``mim segment`` would take
(NIfTI, NRRD, MetaImage, DICOM series folders, read with SimpleITK as ``mim segment`` reads
them), and an input folder without volumes exits with code 2 and a message. Nothing in the
bundle names a path of the machine that exported it.

Compared with ``mim segment`` on the same CT, the label map has the same grid; the labels
agree except at organ boundaries: MONAI resamples the class probabilities back onto the
input grid (``Invertd``, bilinear) and takes the argmax there, ``mim segment`` takes the
argmax at the model's spacing and resamples the labels (nearest neighbour).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from mimcore import __version__
from mimcore.bundles.bundle import Bundle
from mimcore.errors import MimError
from mimcore.files import atomic_dir

NETWORK_TARGET = "mimcore.models.segnet.build_segnet"
READER_TARGET = "mimcore.bundles.monai_runtime.VolumeReader"
#: what ``python -m monai.bundle run`` needs besides monai and mimcore, at the versions the
#: export is tested with (MiMCore's ``test`` extra pins the same)
RUNNER_PACKAGES = {"fire": "0.7.1", "pytorch-ignite": "0.5.5"}
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                   "0.8.1/meta_schema_20220324.json")


def _roi_size(bundle: Bundle) -> list[int]:
    roi = bundle.inference.get("roi_size")
    if roi is None:
        roi = (bundle.architecture.get("model") or {}).get("input_size")
    if roi is None:
        raise MimError(f"model bundle {bundle.path}: model.json has no inference.roi_size; cannot export to MONAI")
    return [int(roi)] * 3 if isinstance(roi, (int, float)) else [int(r) for r in roi]


def _out_channels(bundle: Bundle) -> int:
    return int(bundle.architecture.get("out_channels") or len(bundle.labels) + 1)


def _check_no_references(value, where: str) -> None:
    """MONAI's config parser evaluates strings starting with $, @ or %: refuse them."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_no_references(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_no_references(v, f"{where}[{i}]")
    elif isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise MimError(f"{where} = {value!r} starts with {value[0]!r}, which MONAI's config parser would evaluate; "
                       "cannot export this model to MONAI")


def preprocessing_config(bundle: Bundle) -> dict:
    """The ``preprocessing`` Compose of inference.json (key ``image``)."""
    prep = bundle.preprocessing
    for key in ("hu_min", "hu_max"):
        if not isinstance(prep.get(key), (int, float)):
            raise MimError(f"model bundle {bundle.path}: model.json preprocessing.{key} (a number, HU) is missing; "
                           "cannot export to MONAI")
    transforms: list[dict] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True, "reader": {"_target_": READER_TARGET}},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": prep.get("orientation") or "RAS", "labels": None},
    ]
    if prep.get("spacing") is not None:
        transforms.append({"_target_": "Spacingd", "keys": "image",
                           "pixdim": [float(s) for s in prep["spacing"]], "mode": "bilinear"})
    transforms += [
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": float(prep["hu_min"]),
         "a_max": float(prep["hu_max"]), "b_min": float(prep.get("b_min", 0.0)),
         "b_max": float(prep.get("b_max", 1.0)), "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    return {"_target_": "Compose", "transforms": transforms}


def postprocessing_config(bundle: Bundle) -> dict:
    """Softmax, inversion onto the input grid, argmax, label values, saving (key ``pred``)."""
    values = [lb["value"] for lb in bundle.labels]
    transforms: list[dict] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    if bundle.inference.get("keep_largest"):  # as mim segment does (it does so at the model's spacing)
        transforms.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred",
                           "applied_labels": list(range(1, len(values) + 1)), "is_onehot": False,
                           "independent": True})
    if values != list(range(1, len(values) + 1)):  # channel i is the i-th label of model.json
        transforms.append({"_target_": "MapLabelValued", "keys": "pred",
                           "orig_labels": list(range(len(values) + 1)), "target_labels": [0] + values})
    transforms.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
                       "output_postfix": "seg", "output_dtype": "$numpy.uint8", "resample": False,
                       "separate_folder": False})
    return {"_target_": "Compose", "transforms": transforms}


def inference_config(bundle: Bundle) -> dict:
    """The whole ``configs/inference.json`` (MONAI model-zoo layout)."""
    _check_no_references(bundle.architecture, "architecture")
    inf = bundle.inference
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": _roi_size(bundle),
               "sw_batch_size": int(inf.get("sw_batch_size", 1)), "overlap": float(inf.get("overlap", 0.5))}
    # mim segment blends windows with Gaussian weights; a bundle may say otherwise
    inferer["mode"] = inf["mode"] if inf.get("mode") in ("constant", "gaussian") else "gaussian"
    return {
        "imports": ["$import os", "$import numpy", "$import torch",
                    "$import mimcore.bundles.monai_runtime as mim_runtime"],
        "bundle_root": "$mim_runtime.bundle_root()",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "datalist": "$mim_runtime.input_files(@dataset_dir)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": NETWORK_TARGET, "architecture": bundle.architecture},
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing_config(bundle),
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": inferer,
        "postprocessing": postprocessing_config(bundle),
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@checkpoint", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }


def metadata(bundle: Bundle) -> dict:
    """``configs/metadata.json``: versions, task, input/output channels, the mimcore description."""
    import monai
    import numpy

    names = [lb["name"] for lb in bundle.labels]
    roi = _roi_size(bundle)
    desc = bundle.description
    training = desc.get("training", {})
    return {
        "schema": METADATA_SCHEMA,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by mimcore {__version__} from the model bundle {bundle.name!r}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        # MONAI reads only this key (it renames the deprecated optional_packages_version
        # onto it, replacing what is here): every package the runner needs goes in it
        "required_packages_version": dict({"mimcore": __version__}, **RUNNER_PACKAGES,
                                          nibabel=_installed("nibabel", "5.4.2")),
        "name": bundle.name,
        "task": f"CT segmentation of {', '.join(names)}",
        "description": str(desc.get("description") or f"{bundle.name}: MiM segmentation model ({', '.join(names)})"),
        "authors": str(training.get("authors") or desc.get("authors") or "unknown (exported by mimcore)"),
        "copyright": str(training.get("license") or desc.get("license") or "see the original model's license"),
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": _out_channels(bundle),
                "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {"0": "background", **{str(i + 1): n for i, n in enumerate(names)}}}},
        },
        "mimcore": without_local_paths({k: v for k, v in desc.items() if k != "weights"}),
    }


def _installed(package: str, default: str) -> str:
    """The installed version of ``package``, else ``default``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return default


_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


def is_local_path(text: str) -> bool:
    """True for an absolute file path (POSIX ``/...``, ``~/...``, Windows ``C:\\...``,
    ``\\\\server\\...``) or a ``file://`` URL: things that name the exporting machine's files."""
    return (text.startswith(("/", "~", "file:")) and len(text) > 1) or bool(_WINDOWS_ABSOLUTE.match(text))


def without_local_paths(value):
    """``value`` (JSON) with every absolute local path replaced by its last component
    (``/home/me/runs/liver/model`` -> ``model``): an exported bundle names no folder of the
    machine it was exported on."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and is_local_path(value):
        return re.split(r"[\\/]", value.rstrip("\\/"))[-1] or "<path>"
    return value


def readme(bundle: Bundle) -> str:
    """``docs/README.md``."""
    rows = "\n".join(f"| {i + 1} | {lb['value']} | {lb['name']} | {tuple(lb['color'])} |"
                     for i, lb in enumerate(bundle.labels))
    prep = bundle.preprocessing
    packages = ", ".join(f"`{name}` {version}" for name, version in RUNNER_PACKAGES.items())
    pins = " ".join(f"{name}=={version}" for name, version in RUNNER_PACKAGES.items())
    tta = ("\nThis model is run with flip test-time augmentation by `mim segment`; the MONAI bundle runs "
           "without it." if bundle.inference.get("tta_flips") else "")
    return f"""# {bundle.name}

A MiM (Mask in Mask) CT segmentation model, exported by mimcore {__version__} as a MONAI bundle.

## Labels

| channel | value | name | colour (RGB) |
|---|---|---|---|
{rows}

## Preprocessing

Orientation {prep.get('orientation') or 'RAS'}, spacing {prep.get('spacing') or 'unchanged'} mm,
HU window [{prep.get('hu_min')}, {prep.get('hu_max')}] mapped to [0, 1];
sliding-window inference with {_roi_size(bundle)} windows.

## Running

Needs `mimcore` {__version__} (the network's code and the image reader: the MiM project's
`MiMCore` package, `pip install ./MiMCore` from its source), MONAI, and MONAI's runner
packages {packages}:

    pip install {pins}
    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --dataset_dir /path/to/ct_folder

`BUNDLE` is this folder; the command works from any working directory (`--bundle_root BUNDLE`
overrides where the bundle is). Every NIfTI (`.nii`, `.nii.gz`), NRRD (`.nrrd`, `.nhdr`),
MetaImage (`.mha`, `.mhd`) file and DICOM series subfolder in the input folder is segmented;
a folder without any exits with code 2 and says so. Segmentations (label values as above, on
each input CT's grid, `<case>_seg.nii.gz`) are written to `BUNDLE/eval/`, or to
`--output_dir DIR`.

Expected agreement with `mim segment` on the same CT: the same grid (size, spacing, origin,
direction) and the same labels away from organ boundaries. At boundaries they can differ:
MONAI resamples the class probabilities back onto the input grid and takes the argmax
there, `mim segment` takes the argmax at the model's spacing and resamples the labels.{tta}

`models/model.pt` is a plain state dict: `torch.load(path, weights_only=True)`.
"""


def export_monai_bundle(bundle: Bundle, dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``bundle`` as a MONAI bundle folder ``dest``; returns ``dest``.

    Written into a temporary sibling and renamed into place; an existing ``dest`` is
    refused unless ``overwrite`` (an empty folder is fine).
    """
    dest = Path(dest)
    if dest.exists() and not overwrite and not (dest.is_dir() and not any(dest.iterdir())):
        raise MimError(f"{dest} already exists; choose a new folder for the MONAI bundle (or overwrite)")
    if dest.exists() and not dest.is_dir():
        raise MimError(f"{dest} is a file; give a folder for the MONAI bundle")
    inference = inference_config(bundle)
    meta = metadata(bundle)
    state = bundle.state_dict()
    with atomic_dir(dest, replace=True, what="MONAI bundle") as tmp:  # fsync-ed, renamed when complete
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        (tmp / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n", encoding="utf-8")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        torch.save(state, tmp / "models" / "model.pt")
        if set(torch.load(tmp / "models" / "model.pt", weights_only=True, mmap=True)) != set(state):  # reads back
            raise MimError(f"the weights written to {dest}/models/model.pt do not read back; is the disk full?")
        (tmp / "docs" / "README.md").write_text(readme(bundle), encoding="utf-8")
    return dest
