"""The segmentation networks, one per pre-training backbone, behind one protocol.

==============  ==================================================  ====================
bundle kind     network                                             backbone it loads
==============  ==================================================  ====================
``mim-seg``     :class:`~mimcore.models.mim_segnet.MiMSegNet`       ConvViT3D (``encoder.``)
``unetr``       :class:`~mimcore.models.unetr.UNETRSegNet`          ViT (``vit.``)
``swinunetr``   :class:`~mimcore.models.swin.SwinUNETR`             Swin (``swinViT.``)
==============  ==================================================  ====================

Each is a class that describes itself (:class:`SegNet`): its ``kind``, the window edge it
takes (``input_size``), its ``out_channels``, the state-dict prefix of its output layer
(``head_prefix``), its pre-trained part (``encoder_parameters()``) and the ``architecture``
dict a model bundle records (``architecture_dict(preset)``). A bundle's ``architecture``
names the kind; :func:`build` (and :func:`build_segnet`, the name exported MONAI bundles
call: ``mimcore.models.segnet.build_segnet``) makes the network from it, :func:`describe`
writes it. The module-level accessors are kept for the fine-tuning engine and the segmenter.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mimcore.errors import MimError

KINDS = ("mim-seg", "unetr", "swinunetr")


@runtime_checkable
class SegNet(Protocol):
    """What the rest of mimcore reads off a segmentation network (an ``nn.Module``)."""

    #: the bundle ``architecture.kind`` (one of :data:`KINDS`)
    kind: str
    #: state-dict prefix of the output layer (replaced when the label set changes)
    head_prefix: str

    @property
    def input_size(self) -> int:
        """Edge of the cubic windows the network takes."""

    @property
    def out_channels(self) -> int:
        """Output classes, background included."""

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The pre-trained part (what ``--freeze-encoder`` freezes)."""

    def architecture_dict(self, preset: str | None) -> dict:
        """The ``architecture`` entry of a model bundle's model.json."""


def swin_architecture(preset: str, out_channels: int) -> dict:
    """The ``architecture`` dict of a SwinUNETR with the Swin encoder of size ``preset``
    (input and feature size from :data:`mimcore.models.swin.PRESETS`)."""
    from mimcore.models.swin import swin_architecture as arch

    return arch(preset, out_channels)


def build(architecture: dict, **options) -> nn.Module:
    """The (untrained) network of a bundle's ``architecture`` dict. ``options``: ``drop_path`` and
    ``checkpointing`` (mim-seg), ``dropout_path_rate`` and ``use_checkpoint`` (swinunetr); UNETR has none."""
    kind = architecture.get("kind")
    if kind == "mim-seg":
        from mimcore.models.mim_segnet import build_mim_segnet

        return build_mim_segnet(architecture, **options)
    if kind == "unetr":
        from mimcore.models.unetr import build_unetr

        return build_unetr(architecture, **options)
    if kind == "swinunetr":
        from mimcore.models.swin import SwinUNETR, swin_architecture as arch

        return SwinUNETR(dict(arch(architecture.get("preset") or "base", int(architecture["out_channels"])),
                                    **architecture), **options)
    raise MimError(f"this model's architecture is {kind!r}; mimcore builds {', '.join(map(repr, KINDS))}")


def build_segnet(architecture: dict, **options) -> nn.Module:
    """Build the network a bundle describes, whatever its kind (:func:`build`). MONAI bundles
    exported by mimcore build their network through this function (by this dotted name)."""
    return build(architecture, **options)


def _segnet(net: nn.Module) -> SegNet:
    if isinstance(net, SegNet) and getattr(net, "kind", None) in KINDS:
        return net
    raise TypeError(f"{type(net).__name__} is not one of mimcore's segmentation networks")


def kind_of(net: nn.Module) -> str:
    """The bundle kind of ``net`` (TypeError for a network that is not one of ours)."""
    return _segnet(net).kind


def describe(net: nn.Module, preset: str | None) -> dict:
    """The ``architecture`` entry of a model bundle's model.json for ``net``."""
    return _segnet(net).architecture_dict(preset)


def input_size(net: nn.Module) -> int:
    """Edge of the cubic windows the network takes."""
    return int(_segnet(net).input_size)


def out_channels(net: nn.Module) -> int:
    """Output classes, background included."""
    return int(_segnet(net).out_channels)


def head_prefix(net: nn.Module) -> str:
    """State-dict prefix of the output layer (replaced when the label set changes)."""
    return _segnet(net).head_prefix


def encoder_parameters(net: nn.Module) -> list[torch.nn.Parameter]:
    """The pre-trained part of the network (what ``--freeze-encoder`` freezes)."""
    return _segnet(net).encoder_parameters()
