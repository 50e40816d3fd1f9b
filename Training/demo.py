"""The main job (`make demo`): fetch the sample CTs, pre-train the `small` MiM for a short
fixed budget, and show the mask-in-mask levels on a held-aside CT.

Every step runs the real `mim` command line in a child process, as a user would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def mim(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "mimcore", *args]
    print("$ mim " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: `mim {args[0]}` failed with exit code {proc.returncode}")
    return proc.stdout or ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", default="demo_output", help="Folder for everything the demo writes.")
    ap.add_argument("--steps", type=int, default=80, help="Pre-training steps (the fixed budget).")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    out = Path(args.output).resolve()
    t0 = time.perf_counter()

    datalist = Path(mim("data", "samples", capture=True).strip().splitlines()[-1])
    held_out = json.loads(datalist.read_text())["held_out"][0]["image"]
    run = out / "pretrain"
    resume = ["--resume"] if list(run.glob("checkpoint_*.json")) else []  # an interrupted demo continues
    mim("pretrain", "--datalist", str(datalist), "--preset", args.preset, "--steps", str(args.steps),
        "--warmup-steps", str(max(1, args.steps // 5)), "--lr", "3e-4", "--output", str(run),
        "--save-every", str(max(1, args.steps // 2)), *resume)
    recon = out / "reconstruct"
    mim("reconstruct", "--checkpoint", str(run), "--image", str(datalist.parent / held_out), "--output", str(recon))

    minutes = (time.perf_counter() - t0) / 60
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    print("\n=== MiM demo done in %.1f min ===" % minutes)
    print(f"sample data:        {datalist.parent}")
    print(f"pre-training run:   {run}  ({last['step']} steps, final loss {last['loss']:.4f})")
    print(f"loss curve (PNG):   {run / 'loss_curve.png'}")
    print(f"level sheet (PNG):  {recon / 'levels.png'}")
    print(f"level volumes:      {recon}/level1, level2, level3 (NIfTI, placed in the patient)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
