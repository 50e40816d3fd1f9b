"""Build the segmentation network for a fine-tuning run and initialise it (``--init``).

The network's kind follows what it starts from: a bundle's own architecture; a
pre-training checkpoint's backbone (ConvViT3D -> MiMSegNet, ViT -> UNETR, Swin ->
SwinUNETR; :data:`mimcore.methods.registry.SEGMENTATION_KIND`); an authors' MiM ``.pth``
-> MiMSegNet; nothing -> ``--backbone`` (default ConvViT3D, MiMSegNet) from random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mimcore.data.labels import Label
from mimcore.errors import MimError
from mimcore.methods.registry import ALL_BACKBONES, SEGMENTATION_KIND, checkpoint_method
from mimcore.models import segnet
from mimcore.training.encoder_init import (InitReport, check_report, init_from_bundle_weights, init_from_official,
                                         init_from_pretrain, source_kind)


def pretrain_backbone(init: str | None) -> str | None:
    """The backbone a ``--init`` pre-training checkpoint trained (None for other sources)."""
    from mimcore.models.checkpoint import find_checkpoint

    if not init or source_kind(init) != "pretrain":
        return None
    try:
        meta = json.loads(find_checkpoint(Path(init)).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MimError(f"cannot read the pre-training checkpoint {init}: {e}") from None
    return checkpoint_method(meta)[1]


def new_architecture(backbone: str, preset: str, out_channels: int) -> dict:
    """The ``architecture`` dict of a fresh segmentation network for ``backbone`` at ``preset``."""
    if backbone not in ALL_BACKBONES:
        raise MimError(f"unknown backbone {backbone!r}; choose one of: {', '.join(ALL_BACKBONES)}")
    kind = SEGMENTATION_KIND[backbone]
    if kind == "swinunetr":
        return segnet.swin_architecture(preset, out_channels)
    return {"kind": kind, "preset": preset, "out_channels": out_channels}


def _options(kind: str, args, notes: list[str]) -> dict:
    """Network options from ``args`` (``drop_path``, ``grad_checkpoint``) the kind supports."""
    if kind == "mim-seg":
        return {"drop_path": args.drop_path, "checkpointing": args.grad_checkpoint}
    if kind == "unetr":
        if args.grad_checkpoint:
            raise MimError("--grad-checkpoint is not available for UNETR (MONAI's UNETR has no checkpointing)")
        if args.drop_path:
            notes.append("UNETR (MONAI) has no stochastic depth: --drop-path is not used")
        return {}
    return {"dropout_path_rate": args.drop_path, "use_checkpoint": args.grad_checkpoint}  # SwinUNETR


def build_network(args, preset: str, out_channels: int, labels: list[Label],
                  bundle=None) -> tuple[nn.Module, InitReport | None, list[str]]:
    """-> (network with ``out_channels`` outputs, what the initialisation loaded or None, notes).

    ``preset`` is the model size (with a bundle, the bundle's). Options from ``args``:
    ``init``, ``backbone``, ``drop_path``, ``grad_checkpoint``, ``freeze_encoder``.
    """
    notes: list[str] = []
    backbone = getattr(args, "backbone", None)
    if bundle is not None:
        arch = dict(bundle.description["architecture"], out_channels=out_channels)
        if args.preset and arch.get("preset") and args.preset != arch["preset"]:
            raise MimError(f"--preset {args.preset} does not match the bundle's size '{arch['preset']}'; "
                           "leave --preset out when starting from a bundle")
        if backbone and SEGMENTATION_KIND.get(backbone) != arch.get("kind"):
            raise MimError(f"the bundle {bundle.path} is a {arch.get('kind')!r} network, not one for "
                           f"--backbone {backbone}; leave --backbone out when starting from a bundle")
        net = segnet.build(arch, **_options(arch.get("kind"), args, notes))
        same = [(lab["value"], lab["name"]) for lab in bundle.labels] == [(lab.value, lab.name) for lab in labels]
        report = check_report(init_from_bundle_weights(net, bundle.state_dict(), str(bundle.path), same))
    else:
        kind_of_init = source_kind(args.init) if args.init else None
        trained = pretrain_backbone(args.init) if kind_of_init == "pretrain" else \
            ("convvit" if kind_of_init == "official" else None)
        if backbone and trained and backbone != trained:
            raise MimError(f"--init {args.init} holds a pre-trained {trained} encoder; it cannot start a "
                           f"--backbone {backbone} network (leave --backbone out)")
        arch = new_architecture(trained or backbone or "convvit", preset, out_channels)
        net = segnet.build(arch, **_options(arch["kind"], args, notes))
        report = None
        if args.init:
            report = check_report(init_from_official(net, args.init) if kind_of_init == "official"
                                  else init_from_pretrain(net, args.init))
    if args.freeze_encoder:
        if report is None:
            raise MimError("--freeze-encoder keeps the encoder as it is: give the pre-trained weights with --init")
        for p in segnet.encoder_parameters(net):
            p.requires_grad_(False)
    return net, report, notes


def param_groups(net: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups for fine-tuning ``net``: MiMSegNet's layer-wise groups
    (:func:`mimcore.training.optim.finetune_param_groups`); for the other networks decay /
    no decay (biases, norms, position embeddings) at one learning rate."""
    from mimcore.training.optim import NO_DECAY_NAMES, finetune_param_groups

    if segnet.kind_of(net) == "mim-seg":
        return finetune_param_groups(net, lr, weight_decay, layer_decay)
    if layer_decay != 1.0:
        raise MimError(f"--layer-decay is implemented for the MiM network only, not for {segnet.kind_of(net)}")
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim <= 1 or name.endswith(".bias") or "position_embeddings" in name or \
            any(k in name for k in NO_DECAY_NAMES)
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [dict(g, lr=lr, lr_scale=1.0, layer=0) for g in groups if g["params"]]
