"""AdamW with parameter groups, learning-rate scaling and the warm-up + cosine schedule
(METHODS.md, "Optimisation"; each method's numbers: :mod:`mimcore.methods.recipes`)."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "position_embeddings", "mask_token")  # MONAI ViT: position_embeddings


def param_groups(model: nn.Module, weight_decay: float, exempt: tuple[str, ...] = NO_DECAY_NAMES) -> list[dict]:
    """Two groups: weight decay on weight matrices/kernels, none on biases, norms (all 1-D
    parameters) and parameters whose name contains one of ``exempt`` (default: position
    embeddings and mask tokens; MiM's published recipe exempts nothing more, as timm's
    ``add_weight_decay``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in exempt):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then a cosine from each group's lr down to ``floor`` (absolute,
    e.g. 1e-4) at ``total_steps``: the schedule of MONAI's ``WarmupCosineSchedule`` with
    ``eta_min`` as in PyTorch's ``CosineAnnealingLR`` (a floor equal to the peak keeps the
    rate constant after warm-up). Factor at step t (``scheduler.step()`` called t times):
    t / warmup while t < warmup, else r + (1 - r) * (1 + cos(pi * progress)) / 2 with
    progress = (t - warmup) / (total - warmup) and r = floor / the group's lr."""
    ratios = [min(1.0, floor / g["lr"]) if g["lr"] > 0 else 0.0 for g in optimizer.param_groups]

    def factor(ratio: float):
        def f(step: int) -> float:
            if step < warmup_steps:
                return step / max(1, warmup_steps)
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return ratio + (1 - ratio) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(r) for r in ratios])


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """``lr = base_lr * effective_batch / 256`` (effective batch = batch x accumulation x GPUs)."""
    return base_lr * effective_batch / 256


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                   betas: tuple[float, float] = (0.9, 0.95), exempt: tuple[str, ...] = NO_DECAY_NAMES
                   ) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, weight_decay, exempt), lr=lr, betas=tuple(betas))


def encoder_layer_id(name: str, vit_depth: int) -> int:
    """Depth of a parameter of :class:`~mimcore.models.mim_segnet.MiMSegNet` for layer-wise lr decay.

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
