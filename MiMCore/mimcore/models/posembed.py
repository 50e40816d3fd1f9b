"""Fixed 3D sin-cos position embeddings (MONAI's builder, as a plain tensor)."""

from __future__ import annotations

import warnings

import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding


def sincos_3d(grid: int, dim: int) -> torch.Tensor:
    """(1, grid^3, dim) fixed sin-cos embedding, tokens in raster order over (d, h, w)."""
    with warnings.catch_warnings():  # MONAI calls torch.meshgrid without `indexing` (its default is "ij")
        warnings.simplefilter("ignore", UserWarning)
        pos = build_sincos_position_embedding(grid, dim, spatial_dims=3).data
    return pos.reshape(1, grid**3, dim).clone()
