"""The pre-training methods, the backbones each runs on, and how to build them.

- ``mim``: ``convvit``; crop = 2 x input (192^3); fine-tuned as MiMSegNet (``mim-seg``);
- ``mae``, ``simmim``: ``vit`` (default) or ``convvit``; crop = the input (96^3); fine-tuned
  as UNETR (``unetr``) for vit, MiMSegNet for convvit;
- ``gmim``: ``swin``; crop = ``GMIMConfig.crop_size`` (160^3); fine-tuned as SwinUNETR
  (``swinunetr``).

Every model has ``forward(crop (N, 1, C, C, C), generator) -> {"loss": ..., ...}`` (C = the
crop size returned by :func:`build_pretrain_model`). A checkpoint's description records
``method``, ``backbone``, ``preset``, ``model`` (the backbone's sizes) and ``method_config``;
:func:`model_from_meta` rebuilds the model from it. Checkpoints written before methods
existed have neither ``method`` nor ``backbone``: they are MiM on ConvViT3D.

This module imports nothing heavy at import time (the CLI's parser reads its constants).
"""

from __future__ import annotations

import dataclasses
import json

from mimcore.errors import MimError

METHODS = ("mim", "mae", "simmim", "gmim")
#: Allowed backbones per method; the first one is the default.
BACKBONES = {"mim": ("convvit",), "mae": ("vit", "convvit"), "simmim": ("vit", "convvit"), "gmim": ("swin",)}
DEFAULT_BACKBONE = {method: names[0] for method, names in BACKBONES.items()}
ALL_BACKBONES = ("convvit", "vit", "swin")
#: The segmentation network (bundle ``architecture.kind``) that fine-tunes each backbone's encoder.
SEGMENTATION_KIND = {"convvit": "mim-seg", "vit": "unetr", "swin": "swinunetr"}
METHOD_NAMES = {"mim": "MiM", "mae": "MAE", "simmim": "SimMIM", "gmim": "GMIM"}


def resolve_backbone(method: str, backbone: str | None = None) -> str:
    """The backbone ``method`` runs on (its default when ``backbone`` is None); MimError for a
    method or a pair that does not exist."""
    if method not in METHODS:
        raise MimError(f"unknown pre-training method {method!r}; choose one of: {', '.join(METHODS)}")
    if backbone is None:
        return DEFAULT_BACKBONE[method]
    if backbone not in BACKBONES[method]:
        allowed = " or ".join(f"--backbone {b}" for b in BACKBONES[method])
        raise MimError(f"--method {method} does not run on --backbone {backbone}: {METHOD_NAMES[method]} is "
                       f"implemented on {', '.join(BACKBONES[method])} only; use {allowed}")
    return backbone


def checkpoint_method(meta: dict) -> tuple[str, str]:
    """(method, backbone) of a pre-training checkpoint description (old ones: MiM on ConvViT3D)."""
    method = meta.get("method", "mim")
    return method, meta.get("backbone") or DEFAULT_BACKBONE.get(method, "convvit")


def _with_options(cfg, options: dict | None, method: str):
    """``cfg`` (a frozen dataclass) with the fields in ``options`` replaced; MimError on unknown names."""
    if not options:
        return cfg
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MimError(f"unknown {METHOD_NAMES[method]} setting(s) {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **options)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def build_pretrain_model(method: str = "mim", backbone: str | None = None, preset: str = "base",
                         options: dict | None = None):
    """-> (model, crop size, meta): a fresh pre-training model of ``method`` on ``backbone``
    (default: the method's) at size ``preset``, with the method settings in ``options``
    changed. ``meta`` is what a checkpoint must record to rebuild it."""
    backbone = resolve_backbone(method, backbone)
    meta = {"method": method, "backbone": backbone, "preset": preset}
    if method == "mim":
        from mimcore.methods.mim import MiMPretrainModel
        from mimcore.models.presets import MiMConfig, get_preset

        model_cfg = get_preset(preset)
        cfg = _with_options(MiMConfig(), options, method)
        model, crop = MiMPretrainModel(model_cfg, cfg), model_cfg.crop_size
        meta.update(model=model_cfg.to_dict(), mim=cfg.to_dict())
    elif method in ("mae", "simmim"):
        from mimcore.methods.backbones import backbone_config

        backbone_cfg = backbone_config(backbone, preset)
        if method == "mae":
            from mimcore.methods.mae import MAEPretrainModel, mae_config

            cfg = _with_options(mae_config(preset), options, method)
            model = MAEPretrainModel(backbone_cfg, cfg)
        else:
            from mimcore.methods.simmim import SimMIMConfig, SimMIMPretrainModel

            cfg = _with_options(SimMIMConfig(), options, method)
            model = SimMIMPretrainModel(backbone_cfg, cfg)
        crop = backbone_cfg.input_size
        meta["model"] = backbone_cfg.to_dict()
    else:
        from mimcore.methods import gmim

        cfg = _with_options(gmim.gmim_config(preset), options, method)
        model, crop = gmim.GMIMPretrainModel(cfg), int(cfg.crop_size)
        meta["model"] = cfg.to_dict()
    meta["method_config"] = cfg.to_dict()
    return model, int(crop), _jsonable(meta)


def model_from_meta(meta: dict):
    """-> (model, crop size): the untrained model a checkpoint description belongs to."""
    method, backbone = checkpoint_method(meta)
    resolve_backbone(method, backbone)
    if method == "mim":
        from mimcore.methods.mim import MiMPretrainModel
        from mimcore.models.presets import MiMConfig, ModelConfig

        model_cfg = ModelConfig.from_dict(meta["model"])
        cfg = MiMConfig.from_dict(meta.get("mim") or meta.get("method_config") or {})
        return MiMPretrainModel(model_cfg, cfg), model_cfg.crop_size
    if method in ("mae", "simmim"):
        from mimcore.methods.backbones import config_from_dict

        backbone_cfg = config_from_dict(backbone, meta["model"])
        if method == "mae":
            from mimcore.methods.mae import MAEConfig, MAEPretrainModel

            model = MAEPretrainModel(backbone_cfg, MAEConfig.from_dict(meta["method_config"]))
        else:
            from mimcore.methods.simmim import SimMIMConfig, SimMIMPretrainModel

            model = SimMIMPretrainModel(backbone_cfg, SimMIMConfig.from_dict(meta["method_config"]))
        return model, backbone_cfg.input_size
    from mimcore.methods import gmim

    cfg = gmim.GMIMConfig.from_dict(meta["method_config"])
    return gmim.GMIMPretrainModel(cfg), int(cfg.crop_size)


def load_pretrain_checkpoint(path):
    """(model with the checkpoint's weights, meta) of a ``mim pretrain`` checkpoint or run folder
    (sha256-verified, any method)."""
    from pathlib import Path

    from mimcore.training.checkpoint import read_checkpoint

    meta, weights, _ = read_checkpoint(Path(path))
    model, _ = model_from_meta(meta)
    model.load_state_dict(weights)
    return model, meta
