"""bench_segment's compute yardsticks: FLOPs of one network window and this machine's own
dense matmul rate (fp32 and bf16), measured in the same child as the run it is compared with
(as ``bench_pretrain.py`` does for training)."""

from __future__ import annotations

from bench_common import matmul_rate  # noqa: F401  (re-exported: segment_runs, segment_nnunet)


def window_flops(net, roi, device) -> float:
    """FLOPs of one forward of a (1, 1, roi, roi, roi) window -- ``roi`` an int, or a tuple of
    three for a non-cubic patch -- (``torch.utils.flop_counter``: matmuls, convolutions,
    attention; elementwise work is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench_pretrain import _register_cpu_sdpa_flops

    _register_cpu_sdpa_flops()
    size = (roi,) * 3 if isinstance(roi, int) else tuple(roi)
    x = torch.zeros(1, 1, *size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return float(counter.get_total_flops())


def achieved(flops_per_window: float, windows_real: int, net_s: float, mm: dict) -> dict:
    """Achieved network FLOP/s over the windows really computed, and its share of the matmul rate."""
    rate = flops_per_window * windows_real / net_s if net_s > 0 else 0.0
    return {"gflop_per_window": flops_per_window / 1e9, "achieved_gflops": rate / 1e9,
            "matmul_gflops": mm["flops_per_s"] / 1e9, "matmul_dtype": mm["dtype"],
            "pct_of_matmul": 100 * rate / mm["flops_per_s"]}
