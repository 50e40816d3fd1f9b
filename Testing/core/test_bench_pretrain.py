"""Smoke test of ``Testing/benchmarks/bench_pretrain.py``: every pre-training method gets a row
with positive timings, FLOPs and memory (smallest settings: ``tiny``, one timed step, the
reference configurations left out, a small reference matmul). Each configuration is a child
process that imports torch and MONAI (a few seconds each on a 2-core machine), so the run
times one backbone each for MAE (vit) and SimMIM (convvit): all four methods and all three
backbones in four children; that ``mae`` and ``simmim`` expand to both backbones is checked
without running them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
CONFIGS = ["mim:tiny", "mae/vit:tiny", "mae/convvit:tiny", "simmim/vit:tiny", "simmim/convvit:tiny", "gmim:tiny"]
RUN = ["mim:tiny", "mae/vit:tiny", "simmim/convvit:tiny", "gmim:tiny"]


def test_method_list_expands_to_every_backbone():
    sys.path.insert(0, str(BENCH))
    try:
        from bench_pretrain_methods import method_configs, parse_config
    finally:
        sys.path.remove(str(BENCH))
    assert method_configs(["gmim", "mae", "mim", "simmim"], ["tiny"]) == CONFIGS
    assert method_configs(["mae/convvit", "mim"], ["tiny", "small"]) == [
        "mim:tiny", "mae/convvit:tiny", "mim:small", "mae/convvit:small"]
    assert parse_config("simmim/vit:base") == ("simmim", "vit", "base")
    assert parse_config("gmim:small") == ("gmim", None, "small")
    for bad in (["byol"], ["gmim/vit"]):
        with pytest.raises(ValueError):
            method_configs(bad, ["tiny"])


def test_bench_pretrain_prints_a_row_per_method(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH / "bench_pretrain.py"), "--presets", "tiny", "--methods", "mim,mae/vit,simmim/convvit,gmim",
           "--repeats", "1", "--skip", "four96", "monai-mae", "--matmul-size", "256", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    table = proc.stdout.split("== results", 1)[1].split("load average at start", 1)[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:] if line.strip()}
    assert sorted(rows) == sorted(RUN), table
    for config, cells in rows.items():
        # s/sample best, median, fwd+bwd, AdamW, GFLOP/sample, GFLOP/s, % matmul, peak RSS MiB, wall s
        numbers = [float(x) for x in cells[-9:]]
        assert all(x > 0 for x in numbers[:3] + numbers[4:8]), (config, cells)

    res = json.loads(out.read_text())
    assert [r["config"] for r in res["results"]] == RUN
    for r in res["results"]:
        assert "error" not in r, r
        assert r["samples"] == 1 and len(r["step_times_s"]) == 1
        assert r["median_s_per_sample"] > 0 and r["gflop_per_step"] > 0 and r["peak_rss_mib"] > 0
        assert r["fwd_bwd_median_s"] <= r["median_s"]
    assert res["matmul_peak_flops_per_s"] > 0
    assert {r["method"] for r in res["results"]} == {"mim", "mae", "simmim", "gmim"}
    assert {r["backbone"] for r in res["results"]} == {"convvit", "vit", "swin"}
