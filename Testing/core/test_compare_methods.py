"""The comparison study script (Training/experiments/compare_methods.py) at micro scale on
the sample CTs: two arms (scratch and MAE on the ViT), one seed, 2 pre-training and 2
fine-tuning steps. Checks the table against the per-run evaluation files, the curves, and
that a second run skips what is finished. About a minute on a 2-core CPU (seven `mim`
commands, each a few seconds of start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "Training" / "experiments" / "compare_methods.py"
MICRO = ("--scale", "small", "--methods", "scratch,mae", "--seeds", "1", "--pretrain-steps", "2",
         "--finetune-steps", "2", "--val-every", "1")
COLUMNS = ["method", "network", "pre-training steps", "pre-training wall", "fine-tuning wall", "seeds",
           "liver Dice", "spleen Dice", "mean Dice", "mean Dice per seed (min–max)"]


def study(out: Path, datalist: Path, *extra: str, expect: int = 0, base: tuple = MICRO) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *base, "--output", str(out), "--datalist", str(datalist),
                           *extra], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def table(md: str, first_column: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Markdown table whose first column is ``first_column``."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_column} |"))
    cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(cells(ln))
    return cells(lines[start]), rows


@pytest.fixture(scope="module")
def micro(sample_datalist, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return {"out": out, "first": study(out, sample_datalist), "datalist": sample_datalist}


def test_table_curves_and_provenance(micro):
    out = micro["out"]
    md = (out / "results.md").read_text(encoding="utf-8")
    header, rows = table(md, "method")
    assert header == COLUMNS
    assert [r[0] for r in rows] == ["scratch (vit)", "MAE (vit)"]
    for row, arm in zip(rows, ("scratch-vit", "mae-vit")):
        run = out / "finetune" / arm / "seed0"
        evaluation = json.loads((run / "eval" / "evaluation.json").read_text())
        dice = {item["name"]: item["dice"]["mean"] for item in evaluation["summary"]}
        assert set(dice) == {"liver", "spleen"}
        assert row[1] == "ViT → UNETR" and row[5] == "1"
        assert row[6] == f"{dice['liver']:.3f}" and row[7] == f"{dice['spleen']:.3f}"  # one seed: no ± sd
        mean = f"{(dice['liver'] + dice['spleen']) / 2:.3f}"
        assert row[8] == mean and row[9] == f"{mean} ({mean}–{mean})"  # the seed spread
        assert row[4].endswith(" s")
        # the bundle stays for `mim segment`; the checkpoints (resume only) are gone
        assert (run / "model" / "model.json").is_file() and not list(run.glob("checkpoint_*"))
    assert rows[0][2] == "0" and rows[1][2] == "2"  # pre-training steps: scratch none, MAE the budget
    assert rows[0][3] == "–" and rows[1][3].endswith(" s")

    # the end of pre-training: the last 10 % of metrics.jsonl (of 2 steps: the last one)
    header, end_rows = table(md, "method | pre-training seed")
    assert header == ["method", "pre-training seed", "loss"] and [r[0] for r in end_rows] == ["MAE (vit)"]
    last = json.loads((out / "pretrain" / "mae-vit" / "seed0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert end_rows[0][1:] == ["0", f"{last['loss']:.4g}"]

    # validation Dice per step, from the `--progress json` events of each fine-tuning run
    header, curve_rows = table(md, "method | 1")
    assert header == ["method", "1", "2"] and [r[0] for r in curve_rows] == ["scratch (vit)", "MAE (vit)"]
    results = json.loads((out / "results.json").read_text())
    for arm, row in zip(results["arms"], curve_rows):
        curve = arm["seeds"]["0"]["curve"]
        assert sorted(map(int, curve)) == [1, 2]
        assert row[1:] == [f"{curve[s]['dice']:.3f}" for s in ("1", "2")]
        assert set(curve["1"]["per_class"]) == {"liver", "spleen"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # command line, machine, date and versions are recorded
    for text in ("--methods scratch,mae", "**Machine:**", "logical CPUs", "**Date:**", "torch ", "monai ",
                 "mimcore "):
        assert text in md, text
    assert results["machine"]["logical_cpus"] == os.cpu_count()
    # pre-training data: never the evaluated patient (example_ct.nii.gz holds example_ct_sm's voxels)
    volumes = json.loads((out / "data" / "pretrain.json").read_text())["pretraining"]
    names = sorted(Path(v["image"]).relative_to(micro["datalist"].parent).as_posix() for v in volumes)
    assert names == ["aorta_report/example_ct.nii.gz", "example_ct_dicom"]


def test_resume_skips_finished_runs(micro):
    out, datalist = micro["out"], micro["datalist"]
    markers = {p: p.stat().st_mtime_ns for p in out.rglob("study_*.json")}
    assert len(markers) == 7  # 1 pre-training + 2 x (fine-tune, segment, evaluate)
    dropped = out / "finetune" / "mae-vit" / "seed0" / "study_evaluate.json"
    dropped.unlink()  # as if the study had been interrupted before this step finished
    second = study(out, datalist)
    assert "[run] evaluate MAE (vit), seed 0" in second.stdout
    assert "[run] pre-train" not in second.stdout and "[run] fine-tune" not in second.stdout
    assert "[run] segment" not in second.stdout
    assert "ran 1 step(s), skipped 6 finished step(s)" in second.stdout
    for path, mtime in markers.items():
        if path != dropped:
            assert path.stat().st_mtime_ns == mtime, path
    assert dropped.is_file() and (out / "results.md").is_file()
    # the same folder with other settings is refused rather than mixed
    refused = study(out, datalist, "--finetune-steps", "3", expect=2)
    assert "other settings" in refused.stderr


def test_dry_run_prints_commands_and_writes_nothing(sample_datalist, tmp_path):
    out = tmp_path / "dry"
    timed = ("--scale", "small", "--methods", "scratch,mae", "--seeds", "1", "--finetune-steps", "2")
    proc = study(out, sample_datalist, "--dry-run", "--pretrain-time", "60", base=timed)
    assert not out.exists()
    assert "-m mimcore pretrain" in proc.stdout and "--method mae --backbone vit" in proc.stdout
    assert "steps = 60.0 s / seconds per step" in proc.stdout  # the time budget's probe
    assert proc.stdout.count("-m mimcore finetune") == 2 and "--backbone vit --steps 2" in proc.stdout
