"""Fixed 3D sin-cos position embeddings, laid out as the published MiM code lays them out.

The published ``get_3d_sincos_pos_embed`` (MiM ``Pretrain/utils/pos_embed.py``, MAE's 2D
builder extended to 3D) gives each token of a g^3 grid, tokens in raster order over the
grid axes (a0, a1, a2) (our (d, h, w): a0 slowest), the columns

    [sin(a0 w), cos(a0 w) | sin(a1 w), cos(a1 w) | sin(a2 w), cos(a2 w)],
    w_i = 10000^(-i / (dim/6)), i = 0 .. dim/6 - 1,

each block dim/6 wide. MONAI's ``build_sincos_position_embedding`` (used here before
2026-12) puts the a1 block first: [a1 | a0 | a2]. Checkpoints store the embedding as a
buffer, so a model saved with the old layout keeps it when loaded (its weights were
trained with it); an authors' checkpoint brings its own (published) one.
"""

from __future__ import annotations

import torch

TEMPERATURE = 10000.0


def sincos_3d(grid: int, dim: int) -> torch.Tensor:
    """(1, grid^3, dim) float32 fixed sin-cos embedding in the published column order (see module doc)."""
    if dim % 6:
        raise ValueError(f"a 3D sin-cos position embedding needs a width divisible by 6, got {dim}")
    k = dim // 6
    omega = TEMPERATURE ** (-torch.arange(k, dtype=torch.float64) / k)  # (k,)
    pos = torch.arange(grid, dtype=torch.float64)
    coords = torch.stack(torch.meshgrid(pos, pos, pos, indexing="ij"), dim=-1).reshape(-1, 3)  # (L, 3) raster
    angles = coords[:, :, None] * omega  # (L, 3, k)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (L, 3, 2k): per axis [sin | cos]
    return emb.reshape(1, grid**3, dim).float()
