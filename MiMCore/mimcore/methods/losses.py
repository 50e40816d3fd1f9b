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

    Stop-gradient, where the alignment wants it, is the caller's (detached features).
    """
    return (2 - 2 * F.cosine_similarity(child.float(), parent.float(), dim=-1)).mean()


def cosine_logits(child: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Cosine of every child with every candidate of its group, in float32.

    child (G, K, C), candidates (G, M, C) -> (G * K, M): row ``g * K + k`` holds
    cos(child[g, k], candidates[g, m]) for m < M.
    """
    c = F.normalize(child.float(), dim=-1)
    m = F.normalize(candidates.float(), dim=-1)
    return torch.einsum("gkc,gmc->gkm", c, m).reshape(-1, candidates.shape[1])


def pair_cosines(child: torch.Tensor, parent: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse monitor of ``2 - 2 cos`` alignment, detached: child, parent (N, C) ->
    (mean cos of the matched pairs, mean cos of child i with parent i - ``shift``, another pair's)."""
    with torch.no_grad():
        c, p = child.float(), parent.float()
        return (F.cosine_similarity(c, p, dim=-1).mean(),
                F.cosine_similarity(c, p.roll(shift, dims=0), dim=-1).mean())
