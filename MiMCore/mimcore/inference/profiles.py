"""Named inference profiles (``mim segment --fast``) and the precision a run uses.

=============  =====================================================================
profile        what changes against the bundle's own settings
=============  =====================================================================
``reference``  nothing: fp32 on the CPU, bf16/fp16 autocast on CUDA, every window.
``fast``       windows of up to 64^3 (``small``) in OpenVINO in fp32 where it is installed
               (``mimcore[fast]``; :mod:`mimcore.inference.openvino_net`; see
               :func:`choose_runtime`): the reference path's labels, faster; otherwise (no
               OpenVINO, or larger windows) bf16 autocast where the CPU has native bf16
               (AVX-512 BF16 / AMX; oneDNN says so) and fp32 elsewhere, in PyTorch with
               channels-last (``channels_last_3d``) weights and windows so that oneDNN's
               convolutions skip their layout copies; windows that
               hold only air (body mask found at low resolution,
               :mod:`mimcore.inference.body_region`) not computed: background; slabs of
               up to 2 GiB of probabilities instead of 1 GiB, so that a 512x512 CT at
               1.5 mm is one slab (each slab border costs ``roi/2`` of context windows:
               480 instead of 384 windows of 64^3 at overlap 0.5).
=============  =====================================================================

Both keep the bundle format, the preprocessing, the window size, overlap and batch (unless
given), the Gaussian blending, the slab-by-slab memory bound, the geometry of the output
and the out-of-memory fallback. Measured on a 2-core Xeon with AVX-512 BF16 (shared,
noisy): bf16 autocast 0.52x the fp32 time of a ``small`` window batch, channels-last on
top 0.57x instead of 0.64x (oneDNN's 3D convolutions); skipping air saves the windows around
the patient. Inside the body mask the skipped windows change nothing (every window that covers
a body voxel runs), so in fp32 the labels are the reference path's and in bf16 what remains is
bf16's rounding; the benchmark prints the per-class Dice of fast against reference
(``Testing/benchmarks/bench_segment.py``). Why fp32 in OpenVINO comes first (measured on a
2-core AMD EPYC with AVX-512 BF16, 2026-12-02): bf16 flips the near-tied voxels of whatever
class a model is least sure of -- Dice against the reference 0.988-0.989 for the spleen and a
kidney of a ``small`` trained 1200 steps at 1.5 mm, whichever layers are kept in fp32 short of
nearly all of them -- while OpenVINO fp32 gives the reference labels in 165 s on a
512x512x400 CT (bf16: see the README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimcore.errors import MimError

PRECISIONS = ("auto", "fp32", "bf16")
RUNTIMES = ("auto", "torch", "openvino")
#: ``--runtime auto`` runs OpenVINO for fp32 windows up to this edge. OpenVINO keeps its
#: intermediate buffers between calls (dynamic batch): +2.3 GB for two 96^3 windows of ``base``
#: in bf16, which put ``base --fast`` on a 512x512x400 CT at 6.4 GB peak RSS (target < 6 GB);
#: for 64^3 windows (``small``) the peak stays at 4.0-4.3 GB.
OPENVINO_AUTO_MAX_ROI = 64


@dataclass(frozen=True)
class Profile:
    """How a segmentation run trades exactness for speed (see the module's table)."""

    name: str
    cpu_bf16: bool  #: bf16 autocast on a CPU with native bf16 (``--precision auto``, windows in PyTorch)
    channels_last: bool  #: channels_last_3d weights and windows
    skip_air: bool  #: windows without body voxels are not computed (background)
    slab_budget_bytes: int | None = None  #: probability buffer of one slab (None: the caller's, 1 GiB)
    cpu_fp32_runtime: str = "torch"  #: ``--runtime auto`` for fp32 windows on the CPU: ``torch`` or ``openvino``


PROFILES = {
    "reference": Profile("reference", cpu_bf16=False, channels_last=False, skip_air=False),
    "fast": Profile("fast", cpu_bf16=True, channels_last=True, skip_air=True, slab_budget_bytes=2 << 30,
                    cpu_fp32_runtime="openvino"),
}


def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        return name
    if name not in PROFILES:
        raise MimError(f"unknown inference profile {name!r}: one of {', '.join(PROFILES)}")
    return PROFILES[name]


def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX-512 BF16 or AMX), so bf16 autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: str, profile: Profile) -> torch.dtype | None:
    """The autocast dtype of the windows on ``device`` (None: fp32).

    ``precision``: ``auto`` (CUDA: bf16 where supported, else fp16; CPU: bf16 with the fast
    profile on a CPU with native bf16, else fp32), ``fp32`` or ``bf16`` (on any device).
    """
    if precision not in PRECISIONS:
        raise MimError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and profile.cpu_bf16 and cpu_has_bf16():
        return torch.bfloat16
    return None


def choose_runtime(runtime: str, device: torch.device, profile: Profile, roi: int = 64,
                   amp_dtype: torch.dtype | None = None) -> str:
    """Which runtime runs the network of ``roi``^3 windows: ``torch`` or ``openvino`` (CPU only).

    ``amp_dtype``: the precision OpenVINO would run them in (:func:`openvino_dtype`; None: fp32).
    ``runtime``: ``auto``, ``torch``, or ``openvino`` (an error off the CPU). ``auto`` runs the
    profile's ``cpu_fp32_runtime`` on the CPU for fp32 windows up to
    :data:`OPENVINO_AUTO_MAX_ROI`, and PyTorch for everything else. Measured
    (``bench_export.py``, ``bench_segment.py``, 2-core Xeon and AMD EPYC): OpenVINO fp32 gives
    PyTorch fp32's labels (Dice 1.000) in 0.67-0.80x PyTorch fp32's time per window (on a
    512x512x400 CT 165-191 s instead of 273 s), so ``auto`` prefers it to PyTorch's bf16
    (faster still, but labels that differ from fp32's: Dice of a trained ``small`` 0.987-0.999
    per class); OpenVINO's bf16 agrees less (0.981-0.999) and runs only when asked for
    (``--runtime openvino --precision bf16``). Whether OpenVINO is installed is checked when
    the network is compiled (:func:`mimcore.inference.openvino_net.compile_openvino`)."""
    if runtime not in RUNTIMES:
        raise MimError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "openvino" and device.type != "cpu":
        raise MimError(f"--runtime openvino runs on the CPU only; this run is on {device} "
                       "(use --device cpu, or --runtime torch)")
    if runtime == "auto":
        fits = device.type == "cpu" and amp_dtype is None and roi <= OPENVINO_AUTO_MAX_ROI
        return profile.cpu_fp32_runtime if fits else "torch"
    return runtime


def openvino_dtype(precision: str, cpu_amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The precision OpenVINO runs the windows in (None: fp32): fp32 for ``--precision auto``
    (the reference labels), else the asked-for ``cpu_amp_dtype``."""
    return None if precision == "auto" else cpu_amp_dtype


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``fp32`` (None), ``bf16`` or ``fp16``: what the events and messages call an autocast dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
