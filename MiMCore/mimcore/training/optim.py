"""AdamW with MiM's parameter groups and learning-rate scaling (methods.md, "Optimisation")."""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "position_embeddings", "mask_token")  # MONAI ViT: position_embeddings


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on weight matrices/kernels, none on biases, norms (all 1-D
    parameters), position embeddings and mask tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """``lr = base_lr * effective_batch / 256`` (effective batch = batch x accumulation x GPUs)."""
    return base_lr * effective_batch / 256


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def encoder_layer_id(name: str, vit_depth: int) -> int:
    """Depth of a parameter of :class:`~mimcore.models.segnet.MiMSegNet` for layer-wise lr decay.

    0 = stage 1 (patch embed + conv blocks), 1, 2 = stages 2, 3, 3 = token embedding,
    4 .. 3 + vit_depth = transformer blocks, 4 + vit_depth = the encoder's skips and final
    norm; everything outside the encoder (stage 5, decoder, head) is 5 + vit_depth.
    """
    top = 5 + vit_depth
    if not name.startswith("encoder."):
        return top
    rest = name[len("encoder."):]
    for i in range(3):
        if rest.startswith((f"embeds.{i}.", f"conv_stages.{i}.")):
            return i
    if rest.startswith(("embeds.3.", "token_proj.", "pos_embed")):
        return 3
    if rest.startswith("blocks."):
        return 4 + int(rest.split(".")[1])
    return top - 1


def finetune_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups for fine-tuning: (decay / no decay) x layer, lr scaled by
    ``layer_decay ** (top - layer)`` (``layer_decay = 1`` gives one lr everywhere).
    Frozen parameters (``requires_grad=False``) are left out."""
    vit_depth = model.cfg.vit_depth
    top = 5 + vit_depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = encoder_layer_id(name, vit_depth)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES)
        scale = layer_decay ** (top - layer)
        g = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                  "lr": lr * scale, "lr_scale": scale, "layer": layer})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
