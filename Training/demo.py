"""The main job (`make demo`): fetch the sample CTs, pre-train the `small` MiM for a short
fixed budget, show the mask-in-mask levels on a held-aside CT, then fine-tune the
pre-trained encoder for segmentation on the sample CT series (liver, spleen), segment the
other sample CT, evaluate it against its reference labels and draw the result.

Fine-tuning runs at 6 x 6 x 4 mm with lr 3e-3: at that spacing the network's window sees
enough of the abdomen to tell liver from spleen in a few dozen steps (the same choice as
Testing/core/test_finetune_real.py and the comparison study).

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
    ap.add_argument("--finetune-steps", type=int, default=60, help="Fine-tuning steps.")
    ap.add_argument("--organs", default="liver,spleen", help="Labels to fine-tune on (TotalSegmentator names).")
    args = ap.parse_args()
    out = Path(args.output).resolve()
    t0 = time.perf_counter()

    datalist = Path(mim("data", "samples", capture=True).strip().splitlines()[-1])
    held_out = json.loads(datalist.read_text(encoding="utf-8"))["held_out"][0]["image"]
    run = out / "pretrain"
    resume = ["--resume"]  # an interrupted demo continues (a run with no checkpoint yet starts afresh)
    mim("pretrain", "--datalist", str(datalist), "--preset", args.preset, "--steps", str(args.steps),
        "--warmup-steps", str(max(1, args.steps // 5)), "--lr", "3e-4", "--output", str(run),
        "--save-every", str(max(1, args.steps // 2)), *resume)
    recon = out / "reconstruct"
    mim("reconstruct", "--checkpoint", str(run), "--image", str(datalist.parent / held_out), "--output", str(recon))

    # --- segmentation: fine-tune on the CT series, segment and evaluate the other CT
    data = json.loads(datalist.read_text(encoding="utf-8"))
    base = datalist.parent
    series = next(e for e in data["training"] if "dicom" in e["image"])
    other = next(e for e in data["training"] if "dicom" not in e["image"])
    ft_list = out / "finetune_datalist.json"
    ft_list.parent.mkdir(parents=True, exist_ok=True)
    ft_list.write_text(json.dumps({"labels": data["labels"], "validation": [],
                                   "training": [{"image": str(base / series["image"]),
                                                 "label": str(base / series["label"])}]}, indent=1))
    ft = out / "finetune"
    mim("finetune", "--datalist", str(ft_list), "--labels", args.organs, "--init", str(run),
        "--spacing", "6", "6", "4", "--steps", str(args.finetune_steps), "--lr", "3e-3",
        "--val-every", str(max(1, args.finetune_steps // 2)), "--save-every", str(max(1, args.finetune_steps // 2)),
        "--output", str(ft), "--name", "demo-" + args.organs.replace(",", "-"), *resume)
    seg_dir = out / "segment"
    seg_file = seg_dir / "other_ct_labels.nii.gz"
    mim("segment", str(base / other["image"]), "--model", str(ft / "model"), "--output", str(seg_file),
        "--seg-nrrd", "--png")
    name_to_value = {n: int(k) for k, n in data["labels"].items()}
    organs = args.organs.split(",")
    ref_map = ",".join(f"{name_to_value[o]}:{i}" for i, o in enumerate(organs, start=1))
    mim("evaluate", "--pred", str(seg_file), "--ref", str(base / other["label"]), "--ref-map", ref_map,
        "--labels", str(ft / "model"), "--out", str(seg_dir))

    minutes = (time.perf_counter() - t0) / 60
    last = json.loads((run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    print("\n=== MiM demo done in %.1f min ===" % minutes)
    print(f"sample data:        {datalist.parent}")
    print(f"pre-training run:   {run}  ({last['step']} steps, final loss {last['loss']:.4f})")
    print(f"loss curve (PNG):   {run / 'loss_curve.png'}")
    print(f"level sheet (PNG):  {recon / 'levels.png'}")
    print(f"level volumes:      {recon}/level1, level2, level3 (NIfTI, placed in the patient)")
    evaluation = json.loads((seg_dir / "evaluation.json").read_text(encoding="utf-8"))
    val = [json.loads(ln) for ln in (ft / "validation.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    print(f"fine-tuning run:    {ft}  ({args.finetune_steps} steps on the CT series, "
          f"Dice on it {val[-1]['dice']:.3f}; curves {ft / 'curves.png'})")
    print(f"model bundle:       {ft / 'model'}  (use it with `mim segment --model`)")
    print(f"segmentation:       {seg_file} and .seg.nrrd (opens in 3D Slicer with names and colours)")
    print(f"overlay (PNG):      {seg_file.with_name('other_ct_labels.png')}")
    dice = ", ".join(f"{row['name']} {row['dice']['mean']:.3f}" if row.get("dice", {}).get("mean") is not None
                     else f"{row['name']} n/a" for row in evaluation.get("summary", []))
    print(f"Dice on the other CT against its reference: {dice}  (table: {seg_dir / 'evaluation.csv'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
