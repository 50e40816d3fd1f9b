"""Losses of masked image modeling, vectorised over the batch (no Python loops over samples)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def norm_pix_target(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise each token by its own mean and variance: (B, L, P) -> (B, L, P).

    ``(t - mean) / sqrt(var + eps)`` with the unbiased variance over the token's P
    voxels, as MAE's published ``forward_loss`` computes it.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden tokens only.

    pred, target (B, L, P); hidden (B, L) bool. Each hidden token's MSE over its P
    voxels, averaged over all hidden tokens of the batch. Returns a scalar.
    """
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    w = hidden.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the hidden tokens only (shapes as :func:`masked_mse`)."""
    per_token = (pred.float() - target.float()).abs().mean(dim=-1)
    w = hidden.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def alignment_loss(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(child, parent)`` averaged over pairs: child, parent (N, C) -> scalar.

    The caller passes ``parent`` computed from detached features (stop-gradient).
    """
    return (2 - 2 * F.cosine_similarity(child.float(), parent.float(), dim=-1)).mean()
