"""What both benchmark scripts share: the machine's description and device sync.

The scripts run as ``python Testing/benchmarks/bench_*.py``, so this folder is on
``sys.path`` and ``import bench_common`` finds this file.
"""

from __future__ import annotations

import os
import platform


def sync(device) -> None:
    """Wait for queued CUDA work (timings); nothing to do on the CPU."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def machine_info() -> dict:
    """CPU model, cores, memory, library versions and the GPU, for the printed report."""
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


RESULT_TAG = "@@BENCH_RESULT@@ "


def spawn_child(cmd: list[str], ident: dict, timeout: float) -> dict:
    """Run one measurement in a child process; -> the dict it printed after RESULT_TAG, with
    ``process_wall_s`` added, or ``ident`` plus an ``error`` when it timed out or crashed."""
    import json
    import subprocess
    import time

    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**ident, "error": f"over --child-timeout {timeout:g} s", "process_wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "process_wall_s": wall}
    return {**ident, "error": f"child exited with {proc.returncode}", "process_wall_s": wall}


def matmul_rate(device: str, dtype_name: str | None = None, n: int = 2048, repeats: int = 5) -> dict:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul in ``dtype_name`` ("float32" or
    "bfloat16"; default: bf16 on CUDA, fp32 elsewhere), the reference rate the benchmarks
    report achieved FLOP/s against."""
    import statistics
    import time

    import torch

    if dtype_name is None:
        dtype_name = "bfloat16" if str(device).startswith("cuda") else "float32"
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    best = min(times)
    return {"n": n, "dtype": dtype_name, "best_s": best, "median_s": statistics.median(times),
            "flops_per_s": 2 * n**3 / best}
