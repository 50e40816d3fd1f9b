"""Export a model bundle as a MONAI bundle (for MONAI Label, MONAI Deploy, ``monai.bundle run``).

Layout written::

    configs/metadata.json    versions, task, label channels, the mimcore description
    configs/inference.json   network_def, preprocessing, sliding-window inferer, postprocessing
    models/model.pt          the plain state dict (tensors only: torch.load(weights_only=True))
    docs/README.md           what the model segments and how to run it

``network_def`` is ``{"_target_": "mimcore.models.segnet.build_segnet", "architecture": ...}``,
so the MONAI bundle needs ``mimcore`` installed; running ``inference.json`` with
``python -m monai.bundle run`` also needs ``pytorch-ignite`` (MONAI's evaluator).
The preprocessing repeats mimcore's: orientation, optional resampling to ``spacing``
(mm), the HU window ``[hu_min, hu_max]`` mapped to ``[b_min, b_max]`` (default [0, 1]);
the prediction is inverted back onto the input CT's grid before it is saved.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mimcore import __version__
from mimcore.bundles.bundle import Bundle, replace_dir
from mimcore.errors import MimError

NETWORK_TARGET = "mimcore.models.segnet.build_segnet"
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
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
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
    if inf.get("mode") in ("constant", "gaussian"):
        inferer["mode"] = inf["mode"]
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
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
        "required_packages_version": {"mimcore": __version__},
        "optional_packages_version": {"pytorch-ignite": "", "nibabel": ""},
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
        "mimcore": {k: v for k, v in desc.items() if k != "weights"},
    }


def readme(bundle: Bundle) -> str:
    """``docs/README.md``."""
    rows = "\n".join(f"| {i + 1} | {lb['value']} | {lb['name']} | {tuple(lb['color'])} |"
                     for i, lb in enumerate(bundle.labels))
    prep = bundle.preprocessing
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

Needs `mimcore` (the network's code) and `pytorch-ignite`:

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/ct_folder

Segmentations (label values as above, on each input CT's grid) are written to `eval/`.
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        (tmp / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        torch.save(state, tmp / "models" / "model.pt")
        (tmp / "docs" / "README.md").write_text(readme(bundle), encoding="utf-8")
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
