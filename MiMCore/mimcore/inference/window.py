"""Sliding-window segmentation of a whole preprocessed volume with bounded memory.

MONAI's ``sliding_window_inference`` (Gaussian blending) runs slab by slab along the
longest axis: each slab carries ``roi/2`` voxels of context on both sides, and only its
core is kept, turned into labels at once. So the class probabilities exist for one slab
at a time (on the CPU), never for the whole volume; the network runs on ``device``.

On CUDA out-of-memory the window batch is halved and the slab retried; at batch 1 the
network moves to the CPU. Each fallback is reported through ``on_event``.

Hooks are constructor arguments (as MONAI's inferers take theirs), so that progress bars
and benchmarks observe a run without patching it: ``on_windows`` counts network passes,
``on_slab`` is told where each slab starts, ``forward`` runs the network on one window batch.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

TTA_FLIPS = ((2,), (3,), (4,))  # spatial axes of a (B, C, X, Y, Z) batch


def count_windows(shape: tuple[int, ...], roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window visits over a (X, Y, Z) volume."""
    size = [max(s, roi) for s in shape]
    interval = _get_scan_interval(size, (roi,) * 3, 3, (overlap,) * 3)
    return len(dense_patch_slices(size, (roi,) * 3, interval))


class WindowSegmenter:
    """Label a preprocessed (1, X, Y, Z) volume with a segmentation network of input size ``roi``.

    ``__call__(image, n_classes, mask=None) -> (X, Y, Z) uint8/uint16`` (argmax of the blended
    softmax). With a ``mask`` (X, Y, Z) bool (:func:`~mimcore.inference.body_region.body_mask`),
    a window holding no mask voxel is not computed: it gives background (probability 1),
    and every window that holds one runs as without the mask.
    ``slab_budget_bytes`` bounds the probability buffer of one slab (C x X x Y x slab x 4).

    Hooks (all optional):
        on_event: ``on_event(event, **fields)`` receives the out-of-memory fallbacks (``"warning"``).
        on_windows: ``on_windows(n)`` after every n network passes (progress).
        on_slab: ``on_slab(start, stop)`` before each slab, with the range of its core along
            the slab axis (voxels).
        forward: ``forward(net, x) -> logits`` runs the network on a window batch
            x (n, 1, R, R, R); default ``net(x)``.

    Precision and layout: ``amp_dtype`` is the autocast dtype while the network is on CUDA,
    ``cpu_amp_dtype`` while it is on the CPU (also after an out-of-memory fallback; None:
    fp32); ``channels_last`` hands the network its windows as ``channels_last_3d`` (the caller
    converts the weights). Probabilities and blending are always float32.
    """

    def __init__(self, net: torch.nn.Module, roi: int, device: torch.device, overlap: float = 0.5,
                 sw_batch: int = 2, tta: bool = False, amp_dtype: torch.dtype | None = None,
                 slab_budget_bytes: int = 1 << 30, on_event: Callable[..., None] | None = None,
                 on_windows: Callable[[int], None] | None = None,
                 on_slab: Callable[[int, int], None] | None = None,
                 forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 cpu_amp_dtype: torch.dtype | None = None, channels_last: bool = False):
        self.net, self.roi, self.device = net, roi, device
        self.overlap, self.sw_batch, self.tta, self.amp_dtype = overlap, sw_batch, tta, amp_dtype
        self.cpu_amp_dtype, self.channels_last = cpu_amp_dtype, channels_last
        self.slab_budget = slab_budget_bytes
        self.on_event = on_event or (lambda *a, **k: None)
        self.on_windows = on_windows or (lambda n: None)
        self.on_slab = on_slab or (lambda start, stop: None)
        self.forward = forward or (lambda net, x: net(x))

    # ------------------------------------------------------------------ network
    @torch.no_grad()
    def predict(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, 1, R, R, R) -> softmax probabilities (n, C, R, R, R) float32 (flip-averaged with TTA).

        ``condition`` (n, 1, R, R, R): the mask's windows (MONAI slices it along with x); windows
        without a mask voxel are not run and get background."""
        if condition is not None:
            keep = condition.flatten(1).any(1).bool().cpu()
            if not keep.all():
                self.on_windows(int((~keep).sum()) * (1 + len(TTA_FLIPS) if self.tta else 1))
                p = torch.zeros((x.shape[0], self.n_classes) + tuple(x.shape[2:]))
                p[:, 0] = 1
                if keep.any():
                    p[keep] = self.predict(x[keep.to(x.device)]).cpu()
                return p.to(x.device)
        dev = next(self.net.parameters()).device
        x = x.to(dev)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        amp = self.amp_dtype if dev.type == "cuda" else self.cpu_amp_dtype

        def probs(inp):
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                return F.softmax(self.forward(self.net, inp).float(), dim=1)

        p = probs(x)
        if self.tta:
            for dims in TTA_FLIPS:
                p += probs(x.flip(dims)).flip(dims)
            p /= 1 + len(TTA_FLIPS)
        self.on_windows(x.shape[0] * (1 + len(TTA_FLIPS) if self.tta else 1))  # network passes
        return p

    # ------------------------------------------------------------------ slabs
    def slabs(self, shape: tuple[int, int, int], n_classes: int) -> tuple[int, list[tuple[int, int]]]:
        """(axis, [(start, stop) of each slab core]) for a volume of ``shape``."""
        axis = int(np.argmax(shape))
        plane = math.prod(shape) // shape[axis]
        per_voxel = 4 * (n_classes + 2)  # probabilities + MONAI's count map and weights
        thick = max(self.roi, int(self.slab_budget // (per_voxel * plane)) - self.roi)
        n = max(1, math.ceil(shape[axis] / thick))
        step = math.ceil(shape[axis] / n)
        return axis, [(s, min(s + step, shape[axis])) for s in range(0, shape[axis], step)]

    def total_windows(self, shape: tuple[int, int, int], n_classes: int) -> int:
        axis, cores = self.slabs(shape, n_classes)
        total = 0
        for a, b in cores:
            lo, hi = max(0, a - self.roi // 2), min(shape[axis], b + self.roi // 2)
            sub = list(shape)
            sub[axis] = hi - lo
            total += count_windows(tuple(sub), self.roi, self.overlap)
        return total * (1 + len(TTA_FLIPS) if self.tta else 1)

    def __call__(self, image: torch.Tensor, n_classes: int, mask: torch.Tensor | None = None) -> np.ndarray:
        """image (1, X, Y, Z) float (CPU), mask (X, Y, Z) bool or None -> labels (X, Y, Z)."""
        shape = tuple(image.shape[1:])
        self.n_classes = n_classes
        axis, cores = self.slabs(shape, n_classes)
        out = np.zeros(shape, dtype=np.uint8 if n_classes <= 256 else np.uint16)
        half = self.roi // 2
        for a, b in cores:
            lo, hi = max(0, a - half), min(shape[axis], b + half)
            slab = image.narrow(axis + 1, lo, hi - lo)[None].float()  # (1, 1, ..)
            self.on_slab(a, b)
            cond = None if mask is None else mask.narrow(axis, lo, hi - lo)[None, None].to(torch.uint8)
            probs = self._run_slab(slab, cond)  # (1, C, ..) on the CPU
            core = probs[0].narrow(axis + 1, a - lo, b - a).argmax(0)
            index = [slice(None)] * 3
            index[axis] = slice(a, b)
            out[tuple(index)] = core.numpy().astype(out.dtype)
            del probs, core
        return out

    def _run_slab(self, slab: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        while True:
            dev = next(self.net.parameters()).device
            try:
                return sliding_window_inference(
                    slab, (self.roi,) * 3, self.sw_batch, self.predict, overlap=self.overlap, mode="gaussian",
                    sw_device=dev, device=torch.device("cpu"), condition=condition)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if self.sw_batch > 1:
                    self.sw_batch //= 2
                    self.on_event("warning", message=f"GPU out of memory: retrying with window batch {self.sw_batch}")
                else:
                    self.net.to("cpu")
                    self.on_event("warning", message="GPU out of memory even with one window: "
                                                     "continuing on the CPU (slower)")
