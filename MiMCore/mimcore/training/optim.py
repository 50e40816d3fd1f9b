"""AdamW with MiM's parameter groups and learning-rate scaling (methods.md, "Optimisation")."""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "mask_token")


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
