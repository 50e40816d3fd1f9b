"""The segmentation network run by OpenVINO on the CPU (the fast profile's runtime).

Measured on a 2-core Xeon with AVX-512 BF16 (``Testing/benchmarks/bench_export.py``): one
batch of two CT windows takes, in bf16, 0.59x (``small``, 64^3) and 0.41x (``base``, 96^3)
the time of PyTorch's own bf16 path (autocast + channels-last), 0.28x / 0.23x of PyTorch fp32;
in fp32 0.80x / 0.58x of PyTorch fp32 with the same labels. The network goes to OpenVINO
through ``torch.export`` (its PyTorch frontend reads the ExportedProgram) with a dynamic
window batch: with a static batch (which would keep 0.7 GB less of buffers for ``base``), and
through an ONNX file, OpenVINO 2026.4 gives wrong logits for this network from the third
decoder stage on (each stage alone is right); the tests compare against PyTorch for batches
of 1, 2 and 3 windows.

The converted model (OpenVINO IR, fp32 weights, any window batch) is cached per weights,
architecture, window size and library versions under ``$MIM_OPENVINO_CACHE`` or the
per-user cache ``.../mimcore/openvino``, written atomically; a later run reads it instead of
exporting again (seconds instead of ~10 s for ``small``).

OpenVINO is optional (``pip install "mimcore[fast]"``): :func:`compile_openvino` raises
:class:`OpenVINOUnavailable` with the reason when a network cannot run there (not installed,
not convertible); :class:`~mimcore.inference.segment.Segmenter` then stays with PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import platformdirs
import torch
from torch import nn

from mimcore.files import atomic_dir

#: OpenVINO inference precisions by the autocast dtype the profile chose (None: fp32)
_HINTS = {None: "f32", torch.bfloat16: "bf16"}


class OpenVINOUnavailable(RuntimeError):
    """The network cannot run in OpenVINO here (not installed, not convertible): the message says why."""


def cache_dir() -> Path:
    """Where converted networks are kept: ``$MIM_OPENVINO_CACHE`` or the per-user cache."""
    env = os.environ.get("MIM_OPENVINO_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("mimcore")) / "openvino"


class OpenVINONet(nn.Module):
    """``forward(x (n, 1, R, R, R) float) -> logits (n, C, R, R, R) float32`` computed by an
    OpenVINO model compiled for the CPU (any n). The PyTorch network stays a submodule, so its
    parameters still say where "the network" lives and how many classes it has; autocast and
    the input's memory layout do not matter (OpenVINO has its own precision and layout)."""

    def __init__(self, net: nn.Module, compiled, precision: str):
        super().__init__()
        self.net, self.compiled, self.precision = net, compiled, precision
        self.request = compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.request.infer([arr])[0].copy())


def _cache_key(ov, weights_sha256: str, architecture: dict, roi: int) -> str:
    blob = json.dumps({"weights": weights_sha256, "architecture": architecture, "roi": roi,
                       "openvino": ov.__version__, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


#: OpenVINO's converter modules that hold the telemetry module as ``tm``
_OVC_TELEMETRY_USERS = ("openvino.tools.ovc.convert_impl", "openvino.tools.ovc.telemetry_utils",
                        "openvino.tools.ovc.utils")


def import_openvino():
    """The ``openvino`` module, with its usage reports off.

    ``import openvino`` and ``ov.convert_model`` report usage to Google Analytics
    (``openvino_telemetry``, a dependency of openvino) unless the user has opted out: without a
    consent file it counts as consent. Nothing of a clinical workstation's use may leave it,
    so in this process ``openvino_telemetry`` cannot be imported (set before openvino's first
    import: openvino then uses its own no-op stub) and, if openvino was imported earlier by
    someone else, its converter's modules get that stub. The user's consent file is left alone.
    Raises ImportError when openvino is not installed."""
    if "openvino" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # "import of ... halted"
    try:
        import openvino
    except ImportError as err:  # optional (mimcore[fast]); not a requirement inside Slicer
        raise ImportError(f"OpenVINO is not installed ({err})") from None
    _no_telemetry()
    return openvino


def _no_telemetry() -> None:
    """OpenVINO's converter modules get its no-op telemetry stub (see :func:`import_openvino`)."""
    import importlib

    stub = importlib.import_module("openvino.tools.ovc.telemetry_stub")
    for name in _OVC_TELEMETRY_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "tm"):
            module.tm = stub


def _convert(ov, net: nn.Module, roi: int):
    """torch.export (batch size dynamic) -> OpenVINO model (``ov``: :func:`import_openvino`)."""
    x = torch.zeros((2, 1, roi, roi, roi))
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    return ov.convert_model(program)


def _cached_model(core, folder: Path):
    """The cached OpenVINO model in ``folder``, or None (absent or unreadable: converted again)."""
    xml = folder / "net.xml"
    if not xml.is_file():
        return None
    try:
        return core.read_model(str(xml))
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
        return None


def _save_cache(ov, model, folder: Path) -> None:
    """Keep the converted model (fp32 weights) for later runs; a cache that cannot be written
    only costs the next run the conversion."""
    try:
        with atomic_dir(folder, replace=True, what="OpenVINO cache folder") as tmp:
            ov.save_model(model, str(Path(tmp) / "net.xml"), compress_to_fp16=False)
    except Exception:  # noqa: BLE001
        pass


def compile_openvino(net: nn.Module, roi: int, amp_dtype: torch.dtype | None, weights_sha256: str,
                     architecture: dict, threads: int | None = None) -> OpenVINONet:
    """``net`` (eval mode, fp32, on the CPU) compiled by OpenVINO for windows of ``roi``^3 in the
    precision matching ``amp_dtype`` (bf16 or None: fp32), with ``threads`` inference threads
    (default: torch's). Raises :class:`OpenVINOUnavailable` when it cannot be done."""
    if amp_dtype not in _HINTS:
        raise OpenVINOUnavailable(f"OpenVINO runs fp32 or bf16 here, not {amp_dtype}")
    try:
        ov = import_openvino()
    except ImportError as err:
        raise OpenVINOUnavailable("OpenVINO is not installed (pip install openvino, or mimcore[fast]; in 3D Slicer "
                                  "slicer.util.pip_install('openvino'): fp32 windows take 0.7x the time)") from None
    folder = cache_dir() / _cache_key(ov, weights_sha256, architecture, roi)
    core = ov.Core()
    try:
        model = _cached_model(core, folder)
        if model is None:
            model = _convert(ov, net.float().to(memory_format=torch.contiguous_format), roi)
            _save_cache(ov, model, folder)
        hint = _HINTS[amp_dtype]
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                     "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
                                                     "PERFORMANCE_HINT": "LATENCY"})
    except Exception as err:  # noqa: BLE001 - export/convert/compile errors of any kind: stay with PyTorch
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise OpenVINOUnavailable(f"OpenVINO could not take this network ({type(err).__name__}: {first})") from None
    return OpenVINONet(net, compiled, {"f32": "fp32", "bf16": "bf16"}[hint])
