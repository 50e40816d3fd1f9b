"""The CUDA check script's CPU dry run: every check runs (tiny sizes, simulated out-of-memory
errors), none fails, and the table it prints has the rows a GPU run fills in."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_check_cuda_dry_run_prints_a_passing_table(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(["bash", str(ROOT / "Testing" / "gpu" / "check_cuda.sh"), "--device", "cpu", "--tiny",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("== check_cuda"):]
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"]}
    for method in ("mim", "mae", "simmim", "gmim"):
        assert rows[f"pretrain {method} fp32"]["result"] == "PASS"
        assert f"pretrain {method} fp32" in table
    assert rows["finetune fp32"]["result"] == "PASS"
    assert rows["pretrain mim fp16 + GradScaler"]["result"] == "SKIP"  # CUDA only
    assert rows["OOM -> smaller window batch"]["result"] == "PASS"
    assert rows["OOM -> CPU"]["result"] == "PASS"
    assert "window batch 1" in rows["OOM -> smaller window batch"]["note"]  # halved down from 4
    assert rows["tiny inference 48x48x40 CT (fast)"]["result"] == "PASS"
    assert {"bench_pretrain.py --device cuda", "bench_segment.py --device cuda"} <= set(rows)
    assert all(r["result"] in ("PASS", "SKIP") for r in rows.values())
    for head in ("check", "result", "precision", "s/step", "peak GPU MiB", "seconds"):
        assert head in table.splitlines()[1]
