"""Token bookkeeping for masked image modeling on 3D volumes.

Conventions: a volume is (B, 1, S, S, S) with axes (d, h, w); tokens are p^3 blocks
(p = 16) in raster order over the (S/p)^3 grid, index ``(d * g + h) * g + w``; a
token's voxels are in raster order over (pd, ph, pw). ``hidden`` masks are bool
(B, L), True where a token is hidden.
"""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, p: int = 16) -> torch.Tensor:
    """(B, 1, S, S, S) -> (B, L, p^3) with L = (S/p)^3."""
    b, _, d, h, w = x.shape
    x = x.reshape(b, d // p, p, h // p, p, w // p, p)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, (d // p) * (h // p) * (w // p), p**3)


def unpatchify(t: torch.Tensor, p: int = 16) -> torch.Tensor:
    """(B, L, p^3) -> (B, 1, S, S, S), the inverse of :func:`patchify` (cubic grids)."""
    b, n, _ = t.shape
    g = round(n ** (1 / 3))
    x = t.reshape(b, g, g, g, p, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, 1, g * p, g * p, g * p)


def random_hidden(batch: int, n_tokens: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool (B, L): exactly ``L - int(L * (1 - ratio))`` tokens hidden per row, uniformly at random."""
    keep = int(n_tokens * (1 - ratio))
    noise = torch.rand(batch, n_tokens, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks >= keep


def split_by_mask(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, L) bool, same count per row -> (ids_keep (B, K), ids_restore (B, L)).

    ``ids_keep`` lists visible tokens in raster order; ``ids_restore`` puts the
    sequence [visible..., hidden...] back into raster order (MAE's convention).
    """
    ids_shuffle = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    n_keep = int((~hidden[0]).sum())
    return ids_shuffle[:, :n_keep], ids_restore


def token_octants(grid: int) -> torch.Tensor:
    """(L,) octant index (0..7, ``(od * 2 + oh) * 2 + ow``) of each token of a grid^3 token grid."""
    idx = torch.arange(grid)
    half = (idx >= grid // 2).long()
    od, oh, ow = torch.meshgrid(half, half, half, indexing="ij")
    return ((od * 2 + oh) * 2 + ow).reshape(-1)


def split_octants(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 2S, 2S, 2S) -> (B, 8, S, S, S), octant ``(od * 2 + oh) * 2 + ow``."""
    b, _, d, h, w = x.shape
    x = x.reshape(b, 2, d // 2, 2, h // 2, 2, w // 2)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, 8, d // 2, h // 2, w // 2)


def token_origin(ids: torch.Tensor, grid: int, p: int = 16) -> torch.Tensor:
    """Token indices (...) -> voxel offsets (..., 3) of their first voxel, axes (d, h, w)."""
    return torch.stack([ids // (grid * grid), (ids // grid) % grid, ids % grid], dim=-1) * p


def octant_origin(octant: torch.Tensor, size: int) -> torch.Tensor:
    """Octant indices (...) -> voxel offsets (..., 3) of their first voxel in a 2*size crop."""
    return torch.stack([octant // 4, (octant // 2) % 2, octant % 2], dim=-1) * size
