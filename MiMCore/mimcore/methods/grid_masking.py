"""GMIM's grid masking (Qi et al. 2024; METHODS.md section 3), vectorised in torch.

1. **Grid choice** (per image): split the (S, S, S) image into g^3 cells for each
   candidate g (4, 8, 16 for ``base``), compute each cell's Shannon entropy (bits) of
   its intensity histogram, and keep the g maximising ``g^-0.1 * std / mean`` of the
   cell entropies (population std; a score of 0 when the mean is 0).
2. **Adaptive ratios**: the distinct entropy values are ranked and get ratios spread
   linearly over [0.35, 0.65]; a cell takes the ratio of its entropy (higher entropy,
   more masking; equal entropies, equal ratios; a single distinct value gets 0.35) —
   the published ``get_dynamic_mask_ratio``.
3. **Token masks**: on a (t, t, t) token map, each cell (of (t/g)^3 tokens) hides
   ``ratio * (t/g)^3`` tokens at random positions (set to zero by the caller). When the
   map is coarser than the grid (t < g) the cells merge to one token each, with the mean
   ratio of the cells it covers. A fractional count is rounded stochastically (floor,
   plus one with probability equal to the fraction) so the expected hidden fraction is
   the ratio even for one-token cells (the published code truncates, which at one token
   per cell would hide nothing).
4. **Hierarchical re-masking**: after the first mask (after patch embedding), each
   later masking point re-masks with probability 0.3; the ratio is halved at every
   point whether or not the previous one re-masked (the published ``GridMaskLayer``).

Histogram: ``entropy_bins`` equal bins over [0, 1] (intensities are windowed to [0, 1]
before), values outside clamped to the end bins. The published code counts distinct
float values (skimage ``shannon_entropy``), which on continuous data only measures the
cell's size; fixed bins measure the intensity spread. Counts are sorted before summing
so that cells with the same histogram up to a permutation get bit-identical entropies.
Cells are in raster order ``(cd * g + ch) * g + cw`` over axes (d, h, w).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cell_view(volume: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 1, S, S, S) -> (B, g^3, (S/g)^3): each cell's voxels, cells in raster order."""
    b, _, d, h, w = volume.shape
    if d % grid or h % grid or w % grid:
        raise ValueError(f"a {grid}^3 grid does not divide a {tuple(volume.shape[2:])} volume")
    x = volume.reshape(b, grid, d // grid, grid, h // grid, grid, w // grid)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, grid**3, -1)


def cell_entropy(volume: torch.Tensor, grid: int, bins: int = 256) -> torch.Tensor:
    """Shannon entropy (bits) of each cell's ``bins``-bin histogram over [0, 1].

    volume (B, 1, S, S, S) -> (B, g^3) float64.
    """
    cells = cell_view(volume.detach(), grid).float()
    idx = (cells * bins).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(*idx.shape[:2], bins, dtype=torch.float64, device=idx.device)
    counts.scatter_add_(2, idx, torch.ones_like(idx, dtype=torch.float64))
    p = counts.sort(dim=2).values / idx.shape[2]
    return -torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(2)


def grid_score(entropy: torch.Tensor, grid: int, exponent: float = 0.1) -> torch.Tensor:
    """``g^-exponent * std / mean`` of the cell entropies: (B, g^3) -> (B,), 0 where mean is 0."""
    mean = entropy.mean(1)
    std = entropy.std(1, unbiased=False)
    return torch.where(mean > 0, grid ** (-exponent) * std / mean.clamp_min(1e-300), torch.zeros_like(mean))


def adaptive_ratios(entropy: torch.Tensor, low: float = 0.35, high: float = 0.65) -> torch.Tensor:
    """(G,) cell entropies -> (G,) float64 mask ratios, linear in the rank of the distinct values."""
    uniq, rank = torch.unique(entropy, sorted=True, return_inverse=True)
    n = uniq.numel()
    if n == 1:
        return torch.full(entropy.shape, float(low), dtype=torch.float64, device=entropy.device)
    return low + (high - low) * rank.to(torch.float64) / (n - 1)


@dataclass
class GridPlan:
    """Grid choice and per-cell ratios of a batch of B images.

    grids: cells per axis chosen for each image (len B).
    entropy: per image, (g_b^3,) float64 cell entropies in raster order.
    ratios: per image, (g_b^3,) float64 mask ratios in [low, high].
    scores: (B, n_candidates) float64, the criterion of each candidate grid.
    """

    grids: list[int]
    entropy: list[torch.Tensor]
    ratios: list[torch.Tensor]
    scores: torch.Tensor


def plan_grid_masks(volume: torch.Tensor, grids: Sequence[int] = (4, 8, 16), bins: int = 256,
                    ratio_range: tuple[float, float] = (0.35, 0.65), exponent: float = 0.1) -> GridPlan:
    """Choose each image's grid and its cells' mask ratios: volume (B, 1, S, S, S) -> :class:`GridPlan`."""
    entropies = [cell_entropy(volume, g, bins) for g in grids]
    scores = torch.stack([grid_score(e, g, exponent) for e, g in zip(entropies, grids)], dim=1)
    best = scores.argmax(1).tolist()  # first maximum on ties (numpy's argmax convention)
    chosen = [entropies[k][b] for b, k in enumerate(best)]
    return GridPlan(
        grids=[int(grids[k]) for k in best],
        entropy=chosen,
        ratios=[adaptive_ratios(e, *ratio_range) for e in chosen],
        scores=scores,
    )


def _hide_in_cells(ratio: torch.Tensor, per_cell: int, generator: torch.Generator | None) -> torch.Tensor:
    """ratio (G,) -> bool (G, per_cell): ``ratio * per_cell`` hidden per row (stochastic rounding)."""
    want = ratio.cpu().clamp(0, 1) * per_cell
    base = want.floor()
    k = base + (torch.rand(want.shape, generator=generator, dtype=torch.float64) < (want - base)).to(base.dtype)
    ranks = torch.rand(ratio.numel(), per_cell, generator=generator).argsort(1).argsort(1)
    return ranks < k[:, None]


def token_hidden(plan: GridPlan, tokens: int, scale: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool (B, t, t, t), True on hidden tokens of a t^3 token map, ratios times ``scale``.

    Random draws on the CPU from ``generator``; the result is on the CPU.
    """
    out = []
    for g, ratio in zip(plan.grids, plan.ratios):
        r = ratio.reshape(1, 1, g, g, g) * scale
        if tokens < g:
            if g % tokens:
                raise ValueError(f"a {tokens}^3 token map cannot merge {g}^3 cells")
            r, g = F.avg_pool3d(r, g // tokens), tokens
        elif tokens % g:
            raise ValueError(f"a {g}^3 grid does not divide a {tokens}^3 token map")
        c = tokens // g
        hid = _hide_in_cells(r.reshape(-1), c**3, generator)  # (g^3, c^3)
        hid = hid.reshape(g, g, g, c, c, c).permute(0, 3, 1, 4, 2, 5).reshape(tokens, tokens, tokens)
        out.append(hid)
    return torch.stack(out)


def voxel_hidden(hidden: torch.Tensor, patch: int) -> torch.Tensor:
    """Token mask (B, t, t, t) -> voxel mask (B, 1, t*p, t*p, t*p) (each token covers p^3 voxels)."""
    x = hidden[:, None]
    for dim in (2, 3, 4):
        x = x.repeat_interleave(patch, dim=dim)
    return x


def hierarchical_scales(points: int, prob: float = 0.3, factor: float = 0.5,
                        generator: torch.Generator | None = None) -> list[float | None]:
    """Re-masking after the first mask: for masking points k = 1..points, the ratio scale
    ``factor**k`` where that point re-masks (probability ``prob``), else None."""
    draws = torch.rand(points, generator=generator, dtype=torch.float64).tolist()
    return [factor ** (k + 1) if u < prob else None for k, u in enumerate(draws)]
