"""bench_segment's measuring tools: peak memory, a timing (and stubbing) network probe,
progress lines, the time guard's decision and the result record of one measurement."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time

from bench_common import sync

MIB = 2**20


def _status_kib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Probe:
    """A network forward hook, ``probe(net, x) -> net(x)`` (WindowSegmenter's ``forward``): times
    every forward; in a memory-only run returns zeros (of the real output's shape and dtype)
    once ``real_left`` real calls are spent."""

    def __init__(self, device):
        self.device = device
        self.real_left = None  # None: always real
        self.out_dtype = self.out_channels = None
        self.reset_stats()

    def reset_stats(self):
        self.times, self.windows_real, self.windows_stub = [], 0, 0

    def __call__(self, net, x):
        import torch

        if self.real_left is None or self.real_left > 0 or self.out_dtype is None:
            if self.real_left is not None:
                self.real_left -= 1
            sync(self.device)
            t0 = time.perf_counter()
            y = net(x)
            sync(self.device)
            self.times.append(time.perf_counter() - t0)
            self.windows_real += x.shape[0]
            self.out_dtype, self.out_channels = y.dtype, y.shape[1]
            return y
        self.windows_stub += x.shape[0]
        return torch.zeros((x.shape[0], self.out_channels) + tuple(x.shape[2:]), dtype=self.out_dtype,
                           device=x.device)


def stage_timer(parts: dict, device):
    """A ``timer(stage)`` hook (Segmenter's): adds each stage's seconds to ``parts[stage + "_s"]``."""
    @contextlib.contextmanager
    def timer(stage: str):
        t = time.perf_counter()
        yield
        sync(device)
        parts[f"{stage}_s"] += time.perf_counter() - t

    return timer


class Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.t0, self.next = label, max(1, total), 0, time.perf_counter(), 0.1

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done / self.total >= self.next or self.done == self.total:
            el = time.perf_counter() - self.t0
            eta = el / self.done * max(0, self.total - self.done)
            print(f"[{self.label}] {self.done}/{self.total} windows, {el:.0f} s, ~{eta:.0f} s left",
                  file=sys.stderr, flush=True)
            while self.done / self.total >= self.next:
                self.next += 0.1


def mem_before_run(device) -> dict:
    import torch

    out = {"setup_peak_rss_mib": _maxrss_mib(), "rss_before_mib": (_status_kib("VmRSS") or 0) / 1024}
    out["hwm_reset"] = _reset_peak_rss()
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return out


def mem_after_run(device, before: dict) -> dict:
    import torch

    out = dict(before)
    if before["hwm_reset"]:
        out["inference_peak_rss_mib"] = _status_kib("VmHWM") / 1024
        out["peak_rss_mib"] = max(before["setup_peak_rss_mib"], out["inference_peak_rss_mib"])
    else:  # no reset possible: the whole process's peak only
        out["inference_peak_rss_mib"] = None
        out["peak_rss_mib"] = max(before["setup_peak_rss_mib"], _maxrss_mib())
    if str(device).startswith("cuda"):
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
    return out


def decide_mode(label: str, windows: int, warm_s_per_window: float, args) -> tuple[str, float]:
    est = windows * warm_s_per_window
    memory_only = args.memory_only or (args.max_minutes > 0 and est > args.max_minutes * 60)
    why = ("--memory-only" if args.memory_only else f"over --max-minutes {args.max_minutes:g}") if memory_only else ""
    print(f"[{label}] {windows} windows x {warm_s_per_window:.2f} s/window (warm-up) ~ {est / 60:.1f} min"
          + (f" -> memory-only run ({why})" if memory_only else " -> full run"), file=sys.stderr, flush=True)
    return ("memory-only" if memory_only else "full"), est


def result(label, model, case, device, mode, roi, n_params, warmup_s, est, e2e, parts, probe, windows,
           windows_planned, mem, vol, shapes, warnings, extra) -> dict:
    import torch

    net_s = sum(probe.times)
    per_window_net = net_s / max(1, probe.windows_real)
    skipped = probe.windows_stub * per_window_net  # memory-only: network time not spent
    res = {
        "label": label, "model": model, "case": case, "device": device, "mode": mode, "roi": roi,
        "threads": torch.get_num_threads(), "params_m": n_params / 1e6,
        "input_shape": list(vol.shape), "input_spacing": [float(s) for s in vol.spacing], **shapes,
        "windows": windows, "windows_planned": windows_planned,
        "windows_real": probe.windows_real, "windows_stubbed": probe.windows_stub,
        "warmup_s": warmup_s, "estimate_from_warmup_s": est,
        "prep_s": parts["prep_s"], "sw_s": parts["sw_s"] + skipped, "post_s": parts["post_s"],
        "e2e_s": e2e + skipped, "net_s": net_s + skipped, "net_s_per_window": per_window_net,
        "measured_e2e_s": e2e, "measured_sw_s": parts["sw_s"], "estimated": probe.windows_stub > 0,
        **mem, "warnings": warnings, **extra, "load_average_end": os.getloadavg(),
    }
    res["s_per_window"] = res["sw_s"] / max(1, windows)
    return res
