"""Depthwise 3D convolution with a fast backward pass on the CPU.

PyTorch's CPU backward of a grouped (depthwise) ``conv3d`` is several times slower
than its forward. Both gradients of a depthwise convolution are themselves
convolutions that PyTorch runs fast:

- input gradient: the same depthwise convolution of the output gradient with the
  kernel flipped in all three axes;
- weight gradient: for each channel, the correlation of the padded input with the
  output gradient, i.e. a grouped convolution with one group per (channel, sample)
  whose "kernel" is the output gradient, summed over samples.

The results equal autograd's to float32 rounding (tests compare at rtol 1e-4).
On CUDA, cuDNN's own backward is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _DepthwiseConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        p = ctx.padding
        channels = x.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=p, groups=channels)
        if ctx.needs_input_grad[1]:
            b, c, d, h, w = x.shape
            xp = F.pad(x, (p,) * 6).transpose(0, 1).reshape(1, c * b, d + 2 * p, h + 2 * p, w + 2 * p)
            kernel = grad.transpose(0, 1).reshape(c * b, 1, *grad.shape[2:])
            corr = F.conv3d(xp, kernel.to(xp.dtype), groups=c * b)  # (1, C*B, k, k, k)
            grad_w = corr.reshape(c, b, *corr.shape[2:]).sum(1, keepdim=True).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


class DepthwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(dim, dim, k, padding=k // 2, groups=dim)`` with the fast CPU backward.

    Input and output: (B, C, D, H, W), any memory format (channels-last is fastest).
    """

    def __init__(self, dim: int, kernel_size: int = 5):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or not torch.is_grad_enabled():
            return super().forward(x)
        return _DepthwiseConv3d.apply(x, self.weight, self.bias, self.padding[0])


def tokens_to_grid(tokens: torch.Tensor, rows: torch.Tensor, b: int, g: int) -> torch.Tensor:
    """Visible tokens (N, t, t, t, C) at ``rows`` of the B*g^3 token list -> zero-filled grid (B, g*t, g*t, g*t, C)."""
    t, c = tokens.shape[1], tokens.shape[-1]
    full = tokens.new_zeros(b * g**3, t, t, t, c).index_copy(0, rows, tokens)
    full = full.reshape(b, g, g, g, t, t, t, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return full.reshape(b, g * t, g * t, g * t, c)


def grid_to_tokens(grid: torch.Tensor, rows: torch.Tensor, g: int) -> torch.Tensor:
    """(B, g*t, g*t, g*t, C) -> the tokens at ``rows``: (N, t, t, t, C). Inverse of :func:`tokens_to_grid`."""
    b, d, _, _, c = grid.shape
    t = d // g
    grid = grid.reshape(b, g, t, g, t, g, t, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return grid.reshape(b * g**3, t, t, t, c).index_select(0, rows)


def _conv_grid(grid: torch.Tensor, weight: torch.Tensor, bias, padding: int) -> torch.Tensor:
    """Depthwise conv of a channels-last grid (B, D, H, W, C) -> same shape."""
    out = F.conv3d(grid.permute(0, 4, 1, 2, 3), weight, bias, padding=padding, groups=grid.shape[-1])
    return out.permute(0, 2, 3, 4, 1)


TOKEN_CHUNK = 64  # tokens per grouped correlation in the weight gradient (measured fastest here)


class _VisibleTokensDepthwise(torch.autograd.Function):
    """Depthwise conv of a grid that is zero outside the visible tokens, read at the visible tokens.

    Both the input and the output gradient vanish outside the visible tokens, so the weight
    gradient is a sum over visible tokens of the correlation of the token's output gradient
    (t^3) with its input window (t + 2p)^3: a grouped conv with small kernels, run only
    where there is data.
    """

    @staticmethod
    def forward(ctx, tokens, weight, bias, rows, b: int, g: int):
        ctx.save_for_backward(tokens, weight, rows)
        ctx.b, ctx.g, ctx.has_bias = b, g, bias is not None
        p = weight.shape[-1] // 2
        return grid_to_tokens(_conv_grid(tokens_to_grid(tokens, rows, b, g), weight, bias, p), rows, g)

    @staticmethod
    def backward(ctx, grad):
        tokens, weight, rows = ctx.saved_tensors
        b, g = ctx.b, ctx.g
        p = weight.shape[-1] // 2
        grad = grad.contiguous()
        grad_tokens = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_grid = tokens_to_grid(grad, rows, b, g)
            grad_tokens = grid_to_tokens(_conv_grid(grad_grid, weight.flip(2, 3, 4), None, p), rows, g)
        if ctx.needs_input_grad[1]:
            n, t, c = tokens.shape[0], tokens.shape[1], tokens.shape[-1]
            w = t + 2 * p
            padded = F.pad(tokens_to_grid(tokens, rows, b, g), (0, 0, p, p, p, p, p, p))
            windows = padded.unfold(1, w, t).unfold(2, w, t).unfold(3, w, t)  # (B, g, g, g, C, w, w, w) view
            bi, rest = rows // g**3, rows % g**3
            win = windows[bi, rest // (g * g), (rest // g) % g, rest % g]  # (N, C, w, w, w)
            kernel = grad.permute(0, 4, 1, 2, 3)  # (N, C, t, t, t)
            grad_w = weight.new_zeros(weight.shape)
            for i in range(0, n, TOKEN_CHUNK):  # oneDNN's grouped conv slows down with very many groups
                m = min(TOKEN_CHUNK, n - i)
                corr = F.conv3d(win[i:i + m].reshape(1, m * c, w, w, w),
                                kernel[i:i + m].reshape(m * c, 1, t, t, t), groups=m * c)  # (1, m*C, k, k, k)
                grad_w += corr.reshape(m, c, 1, *corr.shape[2:]).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 1, 2, 3))
        return grad_tokens, grad_w, grad_b, None, None, None


def depthwise_on_tokens(dw: nn.Conv3d, tokens: torch.Tensor, rows: torch.Tensor, b: int, g: int) -> torch.Tensor:
    """Depthwise conv ``dw`` over visible tokens only: tokens (N, t, t, t, C) at ``rows`` of the
    B*g^3 token list (all other tokens zero) -> the conv output at the same tokens, (N, t, t, t, C)."""
    if tokens.is_cuda or not torch.is_grad_enabled():
        grid = tokens_to_grid(tokens, rows, b, g)
        return grid_to_tokens(dw(grid.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1), rows, g)
    return _VisibleTokensDepthwise.apply(tokens, dw.weight, dw.bias, rows, b, g)
