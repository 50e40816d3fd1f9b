"""Building blocks of the hybrid ConvViT3D backbone.

The convolutional stages keep activations *channels-last*, as (B, D, H, W, C)
tensors: LayerNorm over channels and the 1x1x1 convolutions (``nn.Linear``) then act
on the last axis without copies, and the depthwise 5x5x5 convolution sees a
channels-last (B, C, D, H, W) view, the layout PyTorch's CPU kernels run fastest.
Kernel = stride convolutions (patch embedding, skip paths) are computed as
space-to-depth + matmul, exactly equal to ``F.conv3d`` with the same weight.

Published numerics (METHODS.md section 1), so that an authors' checkpoint computes what
it computed for them: LayerNorm eps :data:`CONV_LN_EPS` (1e-5, PyTorch's default) in the
conv blocks and patch embeddings, :data:`VIT_LN_EPS` (1e-6) in the transformer blocks
and final norms; :func:`init_linears_published` for the initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from torch import nn

from mimcore.models.depthwise import DepthwiseConv3d

#: LayerNorm eps of the conv blocks and patch embeddings (the published ``nn.LayerNorm(dim)``).
CONV_LN_EPS = 1e-5
#: LayerNorm eps of the transformer blocks and the final norms (published ``norm_layer``).
VIT_LN_EPS = 1e-6


def space_to_depth(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, D/k, H/k, W/k, C*k*k*k), features ordered (C, kd, kh, kw).

    This is the ordering of ``conv.weight.flatten(1)`` for a Conv3d of kernel k, so
    ``space_to_depth(x, k) @ weight.flatten(1).T`` equals a kernel = stride = k conv.
    """
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // k, k, h // k, k, w // k, k, c)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, d // k, h // k, w // k, c * k**3)


class StridedConv3d(nn.Conv3d):
    """Conv3d with kernel = stride = k on channels-last input: (B, D, H, W, Cin) -> (B, D/k, H/k, W/k, Cout)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, k, stride=k)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.linear(space_to_depth(x, self.k), self.weight.flatten(1), self.bias)


class PatchEmbed(nn.Module):
    """Conv3d k2 s2, LayerNorm over channels, GELU. (B, D, H, W, Cin) -> (B, D/2, H/2, W/2, Cout)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = StridedConv3d(cin, cout, 2)
        self.norm = nn.LayerNorm(cout, eps=CONV_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.norm(self.proj(x)))


class ConvBlock(nn.Module):
    """ConvMAE conv block on channels-last input (B, D, H, W, C).

    ``x = x + pw_out(dw(mask * pw_in(LN(x))))``, then ``x = x + MLP(LN(x))`` where
    ``mask`` (B, D, H, W, 1) is 1 on visible voxels and 0 on hidden ones.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=CONV_LN_EPS)
        self.pw_in = nn.Linear(dim, dim)
        self.dw = DepthwiseConv3d(dim, 5)
        self.pw_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=CONV_LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act="GELU")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, spatial=None) -> torch.Tensor:
        """``spatial(dw, y)``, if given, runs the depthwise conv on y laid out some other way
        (the visible-token layout of :class:`~mimcore.models.convvit.ConvViT3D`)."""
        y = self.pw_in(self.norm1(x))
        if mask is not None:
            y = y * mask
        if spatial is not None:
            y = spatial(self.dw, y)
        else:
            y = self.dw(y.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        x = x + self.drop_path(self.pw_out(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    """Multi-head self-attention with ``F.scaled_dot_product_attention``. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: ``x + Attn(LN(x))``, ``x + MLP(LN(x))``. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act="GELU")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_linears_published(module: nn.Module) -> None:
    """The published initialisation of ``nn.Linear`` layers: xavier-uniform weight, zero bias.

    Applied to every ``nn.Linear`` in ``module`` except those inside a :class:`ConvBlock`:
    the conv blocks' pointwise layers are 1x1x1 ``nn.Conv3d`` in the published model, which
    its ``_init_weights`` does not touch, and PyTorch's default ``nn.Linear`` initialisation
    (kaiming-uniform, a = sqrt(5); bias U(+-1/sqrt(fan_in))) is exactly the ``nn.Conv3d``
    default for a 1x1x1 kernel, so they keep it.
    """
    inside_conv = {id(m) for blk in module.modules() if isinstance(blk, ConvBlock) for m in blk.modules()}
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m) not in inside_conv:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
