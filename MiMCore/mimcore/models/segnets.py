"""The segmentation networks, one per pre-training backbone, behind one set of functions.

==============  ==============================================  ====================
bundle kind     network                                         backbone it loads
==============  ==============================================  ====================
``mim-seg``     :class:`~mimcore.models.segnet.MiMSegNet`       ConvViT3D (``encoder.``)
``unetr``       :class:`~mimcore.models.unetr.UNETRSegNet`      ViT (``vit.``)
``swinunetr``   MONAI ``SwinUNETR`` (:mod:`mimcore.models.swin`)  Swin (``swinViT.``)
==============  ==============================================  ====================

A model bundle's ``architecture`` dict names the kind; :func:`build` makes the network
from it, :func:`describe` writes it. The accessors (:func:`input_size`,
:func:`out_channels`, :func:`head_prefix`, :func:`encoder_parameters`) are what the
fine-tuning engine and the segmenter need from any of them.
"""

from __future__ import annotations

import torch
from torch import nn

from mimcore.errors import MimError

KINDS = ("mim-seg", "unetr", "swinunetr")
#: ``architecture`` a SwinUNETR was built from (MONAI's class does not keep its input size).
_SWIN_ARCH = "mim_architecture"


def swin_architecture(preset: str, out_channels: int) -> dict:
    """The ``architecture`` dict of a SwinUNETR with the Swin encoder of GMIM's ``preset``
    (input and feature size from :func:`mimcore.methods.gmim.gmim_config`)."""
    from mimcore.methods.gmim import gmim_config

    cfg = gmim_config(preset)
    return {"kind": "swinunetr", "preset": preset, "input_size": cfg.input_size, "feature_size": cfg.feature_size,
            "in_channels": 1, "out_channels": out_channels}


def build(architecture: dict, **options) -> nn.Module:
    """The (untrained) network of a bundle's ``architecture`` dict. ``options``: ``drop_path`` and
    ``checkpointing`` (mim-seg), ``dropout_path_rate`` and ``use_checkpoint`` (swinunetr); UNETR has none."""
    kind = architecture.get("kind")
    if kind == "mim-seg":
        from mimcore.models.segnet import build_mim_segnet

        return build_mim_segnet(architecture, **options)
    if kind == "unetr":
        from mimcore.models.unetr import build_unetr

        return build_unetr(architecture, **options)
    if kind == "swinunetr":
        arch = dict(swin_architecture(architecture.get("preset") or "base", int(architecture["out_channels"])),
                    **architecture)
        from mimcore.models.swin import build_swin_segnet

        net = build_swin_segnet(arch["preset"], arch["out_channels"], arch["feature_size"], **options)
        setattr(net, _SWIN_ARCH, arch)
        return net
    raise MimError(f"this model's architecture is {kind!r}; mimcore builds {', '.join(map(repr, KINDS))}")


def kind_of(net: nn.Module) -> str:
    from mimcore.models.segnet import MiMSegNet
    from mimcore.models.unetr import UNETRSegNet

    if isinstance(net, MiMSegNet):
        return "mim-seg"
    if isinstance(net, UNETRSegNet):
        return "unetr"
    if hasattr(net, _SWIN_ARCH):
        return "swinunetr"
    raise TypeError(f"{type(net).__name__} is not one of mimcore's segmentation networks")


def describe(net: nn.Module, preset: str | None) -> dict:
    """The ``architecture`` entry of a model bundle's model.json for ``net``."""
    kind = kind_of(net)
    if kind == "mim-seg":
        from mimcore.models.segnet import architecture_dict

        return architecture_dict(net, preset)
    if kind == "unetr":
        return net.architecture_dict(preset)
    return dict(getattr(net, _SWIN_ARCH), preset=preset, out_channels=out_channels(net))


def input_size(net: nn.Module) -> int:
    """Edge of the cubic windows the network takes."""
    kind = kind_of(net)
    if kind == "swinunetr":
        return int(getattr(net, _SWIN_ARCH)["input_size"])
    return int(net.input_size)


def out_channels(net: nn.Module) -> int:
    """Output classes, background included."""
    if kind_of(net) == "swinunetr":
        return int(net.out.conv.conv.out_channels)
    return int(net.out_channels)


def head_prefix(net: nn.Module) -> str:
    """State-dict prefix of the output layer (replaced when the label set changes)."""
    return getattr(net, "head_prefix", "out.")


def encoder_parameters(net: nn.Module) -> list[torch.nn.Parameter]:
    """The pre-trained part of the network (what ``--freeze-encoder`` freezes)."""
    if kind_of(net) == "swinunetr":
        return list(net.swinViT.parameters())
    return net.encoder_parameters()
