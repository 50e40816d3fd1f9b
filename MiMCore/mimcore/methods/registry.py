"""The pre-training methods, the backbones each runs on, and how to build them: one table,
:data:`METHOD_TABLE` (``{name: method class}``).

- ``mim``: ``convvit``; crop = 2 x input (192^3); fine-tuned as MiMSegNet (``mim-seg``);
- ``mae``, ``simmim``: ``vit`` (default) or ``convvit``; crop = the input (96^3); fine-tuned
  as UNETR (``unetr``) for vit, MiMSegNet for convvit;
- ``gmim``: ``swin``; crop = ``GMIMConfig.crop_size`` (160^3); fine-tuned as SwinUNETR
  (``swinunetr``).

Each method class (:class:`PretrainMethod`) says which backbones it accepts (default first),
its display name, its published recipe (:mod:`mimcore.methods.recipes`), how it builds its
model from a size preset and options (:meth:`~PretrainMethod.build`) and from a checkpoint
description (:meth:`~PretrainMethod.from_meta`), and the segmentation network each backbone
is fine-tuned as (:attr:`~PretrainMethod.fine_tune_as`). The module-level names
(:data:`METHODS`, :data:`BACKBONES`, :data:`SEGMENTATION_KIND` ...) are derived from it.

Every model has ``forward(crop (N, 1, C, C, C), generator) -> {"loss": ..., ...}`` (C = the
crop size returned by :func:`build_pretrain_model`). A checkpoint's description records
``method``, ``backbone``, ``preset``, ``model`` (the backbone's sizes) and ``method_config``;
:func:`model_from_meta` rebuilds the model from it. Checkpoints written before methods
existed have neither ``method`` nor ``backbone``: they are MiM on ConvViT3D.

This module imports nothing heavy at import time (the CLI's parser reads its constants);
the method classes import their models when they build one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from mimcore.errors import MimError

#: The size presets every backbone offers (``PRESETS`` of :mod:`mimcore.models.convvit`,
#: :mod:`mimcore.models.vit` and :mod:`mimcore.models.swin`), smallest last.
PRESET_NAMES = ("base", "small", "tiny")


def _with_options(cfg, options: dict | None, display_name: str):
    """``cfg`` (a frozen dataclass) with the fields in ``options`` replaced; MimError on unknown names."""
    if not options:
        return cfg
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MimError(f"unknown {display_name} setting(s) {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **options)


class PretrainMethod:
    """A pre-training method as the rest of mimcore sees it (class attributes and classmethods;
    subclasses are the rows of :data:`METHOD_TABLE`)."""

    #: the ``--method`` name
    name: ClassVar[str]
    #: how reports and messages name it
    display_name: ClassVar[str]
    #: the backbones it runs on; the first is the default
    backbones: ClassVar[tuple[str, ...]]
    #: per backbone, the segmentation network (bundle ``architecture.kind``) its encoder fine-tunes as
    fine_tune_as: ClassVar[dict[str, str]]

    @classmethod
    def recipe(cls):
        """The published optimisation and data recipe (:func:`mimcore.methods.recipes.recipe`)."""
        from mimcore.methods.recipes import recipe

        return recipe(cls.name)

    @classmethod
    def build(cls, backbone: str, preset: str, options: dict | None) -> tuple[object, int, dict]:
        """-> (fresh model, crop size, meta entries ``model`` and ``method_config`` (+ any other))."""
        raise NotImplementedError

    @classmethod
    def from_meta(cls, backbone: str, meta: dict) -> tuple[object, int]:
        """-> (untrained model, crop size) of a checkpoint description."""
        raise NotImplementedError


class MiM(PretrainMethod):
    """Mask in Mask (METHODS.md section 1) on ConvViT3D."""

    name, display_name = "mim", "MiM"
    backbones = ("convvit",)
    fine_tune_as = {"convvit": "mim-seg"}

    @classmethod
    def build(cls, backbone, preset, options):
        from mimcore.methods.mim import MiMConfig, MiMPretrainModel
        from mimcore.models import convvit

        model_cfg = convvit.preset(preset)
        cfg = _with_options(MiMConfig(), options, cls.display_name)
        return (MiMPretrainModel(model_cfg, cfg), model_cfg.crop_size,
                {"model": model_cfg.to_dict(), "mim": cfg.to_dict(), "method_config": cfg.to_dict()})

    @classmethod
    def from_meta(cls, backbone, meta):
        from mimcore.methods.mim import MiMConfig, MiMPretrainModel
        from mimcore.models.convvit import ModelConfig

        model_cfg = ModelConfig.from_dict(meta["model"])
        cfg = MiMConfig.from_dict(meta.get("mim") or meta.get("method_config") or {})
        return MiMPretrainModel(model_cfg, cfg), model_cfg.crop_size


class _TokenMethod(PretrainMethod):
    """MAE and SimMIM: one masked-token method on ViT or ConvViT3D (:mod:`mimcore.methods.backbones`).

    ``module`` names the method's module, which defines ``config(preset)``, ``CONFIG`` (its
    settings class) and ``MODEL`` (its pre-training model class); imported on first use.
    """

    backbones = ("vit", "convvit")
    fine_tune_as = {"vit": "unetr", "convvit": "mim-seg"}
    module: ClassVar[str]

    @classmethod
    def _impl(cls, name: str):
        import importlib

        return getattr(importlib.import_module(cls.module), name)

    @classmethod
    def build(cls, backbone, preset, options):
        from mimcore.methods.backbones import backbone_config

        backbone_cfg = backbone_config(backbone, preset)
        cfg = _with_options(cls._impl("config")(preset), options, cls.display_name)
        return (cls._impl("MODEL")(backbone_cfg, cfg), backbone_cfg.input_size,
                {"model": backbone_cfg.to_dict(), "method_config": cfg.to_dict()})

    @classmethod
    def from_meta(cls, backbone, meta):
        from mimcore.methods.backbones import config_from_dict

        backbone_cfg = config_from_dict(backbone, meta["model"])
        cfg = cls._impl("CONFIG").from_dict(meta["method_config"])
        return cls._impl("MODEL")(backbone_cfg, cfg), backbone_cfg.input_size


class MAE(_TokenMethod):
    """Masked autoencoder (METHODS.md section 2)."""

    name, display_name, module = "mae", "MAE", "mimcore.methods.mae"


class SimMIM(_TokenMethod):
    """Simple masked image modelling (METHODS.md section 2)."""

    name, display_name, module = "simmim", "SimMIM", "mimcore.methods.simmim"


class GMIM(PretrainMethod):
    """Grid mask image modelling (METHODS.md section 3) on MONAI's Swin encoder."""

    name, display_name = "gmim", "GMIM"
    backbones = ("swin",)
    fine_tune_as = {"swin": "swinunetr"}

    @classmethod
    def build(cls, backbone, preset, options):
        from mimcore.methods import gmim

        cfg = _with_options(gmim.gmim_config(preset), options, cls.display_name)
        return gmim.GMIMPretrainModel(cfg), int(cfg.crop_size), {"model": cfg.to_dict(), "method_config": cfg.to_dict()}

    @classmethod
    def from_meta(cls, backbone, meta):
        from mimcore.methods import gmim

        cfg = gmim.GMIMConfig.from_dict(meta["method_config"])
        return gmim.GMIMPretrainModel(cfg), int(cfg.crop_size)


#: The methods, in the order the CLI lists them.
METHOD_TABLE: dict[str, type[PretrainMethod]] = {m.name: m for m in (MiM, MAE, SimMIM, GMIM)}

METHODS = tuple(METHOD_TABLE)
#: Allowed backbones per method; the first one is the default.
BACKBONES = {name: m.backbones for name, m in METHOD_TABLE.items()}
DEFAULT_BACKBONE = {name: m.backbones[0] for name, m in METHOD_TABLE.items()}
ALL_BACKBONES = tuple(dict.fromkeys(b for m in METHOD_TABLE.values() for b in m.backbones))
#: The segmentation network (bundle ``architecture.kind``) that fine-tunes each backbone's encoder.
SEGMENTATION_KIND = {b: k for m in METHOD_TABLE.values() for b, k in m.fine_tune_as.items()}
METHOD_NAMES = {name: m.display_name for name, m in METHOD_TABLE.items()}

for _m in METHOD_TABLE.values():  # one network per backbone, whichever method trained it
    assert set(_m.fine_tune_as) == set(_m.backbones), _m
    assert all(SEGMENTATION_KIND[b] == k for b, k in _m.fine_tune_as.items()), _m
del _m


def method(name: str) -> type[PretrainMethod]:
    """The method class of a ``--method`` name; MimError for one that does not exist."""
    try:
        return METHOD_TABLE[name]
    except KeyError:
        raise MimError(f"unknown pre-training method {name!r}; choose one of: {', '.join(METHODS)}") from None


def resolve_backbone(method_name: str, backbone: str | None = None) -> str:
    """The backbone ``method_name`` runs on (its default when ``backbone`` is None); MimError for a
    method or a pair that does not exist."""
    m = method(method_name)
    if backbone is None:
        return m.backbones[0]
    if backbone not in m.backbones:
        allowed = " or ".join(f"--backbone {b}" for b in m.backbones)
        raise MimError(f"--method {method_name} does not run on --backbone {backbone}: {m.display_name} is "
                       f"implemented on {', '.join(m.backbones)} only; use {allowed}")
    return backbone


def checkpoint_method(meta: dict) -> tuple[str, str]:
    """(method, backbone) of a pre-training checkpoint description (old ones: MiM on ConvViT3D)."""
    name = meta.get("method", "mim")
    return name, meta.get("backbone") or DEFAULT_BACKBONE.get(name, "convvit")


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def build_pretrain_model(method: str = "mim", backbone: str | None = None, preset: str = "base",
                         options: dict | None = None):
    """-> (model, crop size, meta): a fresh pre-training model of ``method`` on ``backbone``
    (default: the method's) at size ``preset``, with the method settings in ``options``
    changed. ``meta`` is what a checkpoint must record to rebuild it."""
    backbone = resolve_backbone(method, backbone)
    model, crop, entries = METHOD_TABLE[method].build(backbone, preset, options)
    meta = {"method": method, "backbone": backbone, "preset": preset, **entries}
    return model, int(crop), _jsonable(meta)


def model_from_meta(meta: dict):
    """-> (model, crop size): the untrained model a checkpoint description belongs to."""
    name, backbone = checkpoint_method(meta)
    resolve_backbone(name, backbone)
    return METHOD_TABLE[name].from_meta(backbone, meta)


def load_pretrain_checkpoint(path):
    """(model with the checkpoint's weights, meta) of a ``mim pretrain`` checkpoint or run folder
    (sha256-verified, any method)."""
    from pathlib import Path

    from mimcore.models.checkpoint import read_checkpoint

    meta, weights, _ = read_checkpoint(Path(path))
    model, _ = model_from_meta(meta)
    model.load_state_dict(weights)
    return model, meta
