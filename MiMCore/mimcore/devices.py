"""Device choice shared by every command: ``auto|cuda|cpu|mps`` with clear messages."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mimcore.errors import MimError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if present, else Apple MPS, else the CPU; a named device that is
    missing raises MimError saying what was found instead."""
    import torch  # here, not at module level: `mim --help` stays fast

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MimError(f"--device {name} was asked for but PyTorch sees no CUDA GPU (CPU-only build or no driver); "
                       "use --device cpu (or auto)")
    if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise MimError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    if name == "mps" and not mps_available():
        raise MimError("--device mps was asked for but Apple's Metal backend is not available here; "
                       "use --device cpu (or auto)")
    if name.split(":")[0] not in DEVICE_CHOICES:
        raise MimError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    return torch.device(name)
