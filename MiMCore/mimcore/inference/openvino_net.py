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
architecture, window size and library versions (:mod:`mimcore.inference.openvino_cache`:
written atomically, kept within a size budget); a later run reads it instead of exporting
again (seconds instead of ~10 s for ``small``).

OpenVINO is optional (``pip install "mimcore[fast]"``): :func:`compile_openvino` raises
:class:`OpenVINOUnavailable` with the reason when a network cannot run there (not installed,
not convertible); :class:`~mimcore.inference.segment.Segmenter` then stays with PyTorch.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from mimcore.inference.openvino_cache import budget_bytes, cache_dir, entry_key, read_entry, write_entry

#: OpenVINO inference precisions by the autocast dtype the profile chose (None: fp32)
_HINTS = {None: "f32", torch.bfloat16: "bf16"}


class OpenVINOUnavailable(RuntimeError):
    """The network cannot run in OpenVINO here (not installed, not convertible): the message says why."""


class OpenVINONet(nn.Module):
    """``forward(x (n, 1, R, R, R) float) -> logits (n, C, R, R, R) float32`` computed by an
    OpenVINO model compiled for the CPU (any n). The PyTorch network stays a submodule, so its
    parameters still say where "the network" lives and how many classes it has; autocast and
    the input's memory layout do not matter (OpenVINO has its own precision and layout).

    With ``streams`` > 1 (``compiled`` has that many CPU streams) a batch is split into up to
    ``streams`` parts run at once, each on its share of the threads: on a 2-core AMD EPYC
    (AVX2, fp32) two windows as two requests of one thread took 0.71 s per 64^3 window of
    ``small`` instead of 0.78 s as one request of two threads, with the same logits (a
    512x512x400 CT end to end: 306 s instead of 314 s)."""

    def __init__(self, net: nn.Module, compiled, precision: str, streams: int = 1):
        super().__init__()
        self.net, self.compiled, self.precision, self.streams = net, compiled, precision, streams
        self.requests = [compiled.create_infer_request() for _ in range(streams)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        parts = np.array_split(arr, min(self.streams, len(arr)))  # contiguous runs of windows, none empty
        if len(parts) == 1:
            return torch.from_numpy(self.requests[0].infer([arr])[0].copy())
        for req, part in zip(self.requests, parts):
            req.start_async([part])
        outs = []
        for req in self.requests[:len(parts)]:
            req.wait()
            outs.append(req.get_output_tensor(0).data.copy())
        return torch.from_numpy(np.concatenate(outs))


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


def compile_openvino(net: nn.Module, roi: int, amp_dtype: torch.dtype | None, weights_sha256: str,
                     architecture: dict, threads: int | None = None, streams: int | None = None) -> OpenVINONet:
    """``net`` (eval mode, fp32, on the CPU) compiled by OpenVINO for windows of ``roi``^3 in the
    precision matching ``amp_dtype`` (bf16 or None: fp32), with ``threads`` inference threads
    (default: torch's) shared by ``streams`` requests run at once (default: 2 where there are 2
    threads or more, the window batch's default size; see :class:`OpenVINONet`). Raises
    :class:`OpenVINOUnavailable` when it cannot be done."""
    if amp_dtype not in _HINTS:
        raise OpenVINOUnavailable(f"OpenVINO runs fp32 or bf16 here, not {amp_dtype}")
    try:
        ov = import_openvino()
    except ImportError as err:
        raise OpenVINOUnavailable("OpenVINO is not installed (pip install openvino, or mimcore[fast]; in 3D Slicer "
                                  "slicer.util.pip_install('openvino'): fp32 windows take 0.7x the time)") from None
    budget = budget_bytes()
    folder = cache_dir() / entry_key(ov.__version__, weights_sha256, architecture, roi)
    core = ov.Core()
    try:
        model = read_entry(core, folder)
        if model is None:
            model = _convert(ov, net.float().to(memory_format=torch.contiguous_format), roi)
            write_entry(ov, model, folder, budget)
        hint = _HINTS[amp_dtype]
        threads = int(threads or torch.get_num_threads())
        streams = max(1, min(int(streams or 2), threads))
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                                                     "NUM_STREAMS": streams})
    except Exception as err:  # noqa: BLE001 - export/convert/compile errors of any kind: stay with PyTorch
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise OpenVINOUnavailable(f"OpenVINO could not take this network ({type(err).__name__}: {first})") from None
    return OpenVINONet(net, compiled, {"f32": "fp32", "bf16": "bf16"}[hint], streams)
