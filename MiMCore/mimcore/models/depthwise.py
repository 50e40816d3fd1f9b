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
