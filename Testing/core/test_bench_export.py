"""Smoke test of ``Testing/benchmarks/bench_export.py`` (PyTorch, ONNX Runtime and OpenVINO on
CT windows) in a child process with the smallest settings: the ``tiny`` network, two windows,
one round. The rows must say what the runtimes did: PyTorch fp32 is the reference (ratio 1,
no difference), OpenVINO's fp32 logits match it; ONNX Runtime needs the ``bench`` extra and is
reported as skipped without it."""

import json
import subprocess
import sys
from pathlib import Path

from mimcore.data.datalist import datalist_entries
from mimcore.inference.profiles import cpu_has_bf16

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_export_prints_a_row_per_runtime(tmp_path, sample_datalist):
    ct = str(datalist_entries(sample_datalist, "held_out")[0]["image"])
    out = tmp_path / "export.json"
    cmd = [sys.executable, str(BENCH / "bench_export.py"), "--models", "tiny", "--windows", "2", "--repeats", "1",
           "--ct", ct, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"][0]
    rows = {(r["runtime"], r["precision"]): r for r in res["runtimes"]}
    assert res["ct"] == ct and res["roi"] == 32
    ref = rows[("PyTorch", "fp32")]
    assert ref["over_torch_fp32"] == 1.0 and ref["max_abs_diff_over_std"] == 0 and ref["s_per_batch"] > 0
    ov = rows[("OpenVINO", "fp32")]
    assert ov["max_abs_diff_over_std"] < 1e-3 and ov["labels_changed"] < 1e-3 and ov["setup_s"] > 0
    if cpu_has_bf16():
        assert ("PyTorch --fast", "bf16 + channels-last") in rows and ("OpenVINO", "bf16") in rows
        assert 0 < rows[("OpenVINO", "bf16")]["max_abs_diff_over_std"] < 0.5
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        assert ("ONNX Runtime", "fp32") in rows and rows[("ONNX Runtime", "fp32")]["max_abs_diff_over_std"] < 1e-3
    except ImportError:
        assert any("ONNX" in s for s in res["skipped"]), res["skipped"]
    assert "OpenVINO" in proc.stdout and "x torch fp32" in proc.stdout
