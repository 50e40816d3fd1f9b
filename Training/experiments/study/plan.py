"""The study's plan: the pre-training budget of each method, then for every arm and seed
pre-training, fine-tuning, segmentation of the test cases and their evaluation."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from study.commands import finetune_command, flags, mim, pretrain_command, shell
from study.data import prepare_data
from study.events import read_events
from study.runner import Runner, now, read_json, run_cli, write_json
from study.settings import PROBE_VOLUMES, Arm, StudyError


def plan_pretraining(cfg: dict, data: dict, out: Path, runner: Runner) -> dict:
    """Steps of each method's pre-training: the budget's steps, or (time budget) measured by a
    probe run and kept in plan.json so a resumed study uses the same numbers."""
    budget = cfg["pretrain"]["budget"]
    plan_path = out / "plan.json"
    plan = read_json(plan_path) or {}
    steps = {}
    for arm in [a for a in cfg["arms"] if a.pretrained]:
        if budget["mode"] == "steps":
            steps[arm.key] = {"steps": int(budget["steps"]), "mode": "steps"}
            continue
        if arm.key in plan:
            steps[arm.key] = plan[arm.key]
            continue
        n_probe = int(budget.get("probe_steps", 4))
        probe_dir = out / "probe" / arm.key
        cmd = pretrain_command(cfg, data, arm, cfg["pretrain"].get("seed", 0), n_probe, probe_dir, probe=True)
        cmd.append("--overwrite")  # the probe always starts afresh (its folder holds this runner's logs)
        volumes = data["pretrain_volumes"]
        if len(volumes) > PROBE_VOLUMES:  # seconds per step do not depend on how many volumes there are
            probe_list = out / "data" / "probe.json"
            if not runner.dry_run:
                write_json(probe_list, {"pretraining": [{"image": v} for v in volumes[:PROBE_VOLUMES]]})
            i = cmd.index("--datalist")
            cmd[i + 1] = str(probe_list)
            if "--section" in cmd:
                cmd[cmd.index("--section") + 1] = "pretraining"
        if runner.dry_run:
            print(f"[dry-run] probe {arm.title}: seconds per step over {n_probe} steps; then "
                  f"steps = {budget['seconds']} s / seconds per step\n$ {shell(cmd)}", flush=True)
            steps[arm.key] = {"steps": None, "mode": "time"}
            continue
        print(f"[run] probe {arm.title}: {n_probe} steps to measure seconds per step\n$ {shell(cmd)}", flush=True)
        if probe_dir.exists():
            shutil.rmtree(probe_dir)
        result = run_cli(cmd, probe_dir, "probe")
        ticks = [(e["step"], e["t"]) for e in read_events(probe_dir / "study_probe.events.jsonl", "progress")]
        if len(ticks) < 2:
            raise StudyError(f"the probe of {arm.title} reported fewer than 2 steps; see {probe_dir}")
        (s0, t0), (s1, t1) = ticks[0], ticks[-1]
        per_step = (t1 - t0) / (s1 - s0)
        n = max(int(budget.get("min_steps", 1)), int(budget["seconds"] / per_step))
        steps[arm.key] = {"steps": n, "mode": "time", "seconds_per_step": round(per_step, 4),
                          "budget_s": budget["seconds"], "probe_steps": n_probe,
                          "probe_wall_s": round(result["wall_s"], 1), "measured": now()}
        plan[arm.key] = steps[arm.key]
        write_json(plan_path, plan)
        shutil.rmtree(probe_dir, ignore_errors=True)
        if probe_dir.parent.is_dir() and not any(probe_dir.parent.iterdir()):
            probe_dir.parent.rmdir()
        print(f"      {per_step:.3f} s per step -> {n} steps in {budget['seconds']} s", flush=True)
    return steps


def pretrain_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / "pretrain" / arm.key / f"seed{seed}"


def finetune_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / "finetune" / arm.key / f"seed{seed}"


def pretrain_seed(cfg: dict, seed: int) -> int:
    return int(cfg["pretrain"].get("seed", 0)) if cfg["pretrain"].get("shared_across_seeds", True) else seed


def ref_map(bundle_dir: Path, names: dict[str, str], dry_run: bool) -> str | None:
    """``old:new`` pairs that renumber the reference to the model's labels (by name)."""
    model = read_json(bundle_dir / "model.json")
    if model is None:
        if dry_run:
            return "<from the model's labels>"
        raise StudyError(f"no model bundle in {bundle_dir}")
    by_name = {v: k for k, v in names.items()}
    pairs = [f"{by_name[lab['name']]}:{lab['value']}" for lab in model.get("labels", []) if lab["name"] in by_name]
    return ",".join(pairs) or None


def link_reference(ref: Path, folder: Path, case: str) -> Path:
    """``folder/<case><suffix>``, named like the prediction so that `mim evaluate` pairs them: a
    link to the reference ``ref`` (a copy in NIfTI for the two-file formats .nhdr/.mhd, whose
    data file would not follow a link; Slicer's ``.seg.nrrd`` keeps its suffix, so that its
    segments are read as such). `mim evaluate --resample-ref` then puts it on the
    prediction's grid where the grids differ (the CT series' reference is stored with its
    rows flipped)."""
    name = ref.name.lower()
    suffix = next((s for s in (".nii.gz", ".seg.nrrd") if name.endswith(s)), ref.suffix.lower())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{case}.*"):
        old.unlink()
    if suffix in (".nhdr", ".mhd"):
        import SimpleITK as sitk

        dst = folder / f"{case}.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(ref)), str(dst), True)
        return dst
    dst = folder / f"{case}{suffix}"
    try:
        dst.symlink_to(ref.resolve())
    except OSError:
        shutil.copyfile(ref, dst)
    return dst


def run_arm(cfg: dict, data: dict, out: Path, runner: Runner, arm: Arm, seed: int) -> None:
    folder = finetune_dir(out, arm, seed)
    init = pretrain_dir(out, arm, pretrain_seed(cfg, seed)) if arm.pretrained else None
    tag = f"{arm.title}, seed {seed}"
    runner.step(folder, "finetune", finetune_command(cfg, data, arm, seed, init, folder), f"fine-tune {tag}",
                resume_flag=["--resume"])
    if not runner.dry_run and not cfg.get("keep_checkpoints") and runner.done(folder, "finetune"):
        for path in folder.glob("checkpoint_*"):  # only for resuming; the model bundle stays in model/
            path.unlink()
    if runner.done(folder, "segment") is None:
        if runner.dry_run:
            for case in data["test"]:
                cmd = mim("segment", case["image"], "--model", folder / "model", "--output",
                          folder / "pred" / f"{case['case']}.nii.gz", "--device", cfg.get("device", "auto"),
                          "--progress", "json", *flags(cfg.get("segment", {}).get("args", {})))
                print(f"[dry-run] segment {case['case']} ({tag})\n$ {shell(cmd)}", flush=True)
        else:
            t0, walls = time.perf_counter(), []
            for case in data["test"]:
                pred = folder / "pred" / f"{case['case']}.nii.gz"
                cmd = mim("segment", case["image"], "--model", folder / "model", "--output", pred,
                          "--device", cfg.get("device", "auto"), "--progress", "json",
                          *flags(cfg.get("segment", {}).get("args", {})))
                print(f"[run] segment {case['case']} ({tag})\n$ {shell(cmd)}", flush=True)
                walls.append(run_cli(cmd, folder, "segment")["wall_s"])
            for c in data["test"]:
                link_reference(Path(c["label"]), folder / "ref", c["case"])
            write_json(folder / "study_segment.json", {"stage": "segment", "wall_s": round(sum(walls), 2),
                                                       "finished": now(),
                                                       "total_s": round(time.perf_counter() - t0, 2)})
    else:
        runner.skipped.append(("segment", str(folder)))
        print(f"[skip] segment ({tag}): done", flush=True)
    mapping = ref_map(folder / "model", data["names"], runner.dry_run)
    cmd = mim("evaluate", "--pred", folder / "pred", "--ref", folder / "ref", "--labels", folder / "model",
              "--out", folder / "eval", "--resample-ref", *(["--ref-map", mapping] if mapping else []))
    runner.step(folder, "evaluate", cmd, f"evaluate {tag}")


def run_study(cfg: dict, out: Path, runner: Runner) -> dict:
    data = prepare_data(cfg, out, runner.dry_run)
    steps = plan_pretraining(cfg, data, out, runner)
    seeds = cfg["seeds"]
    for arm in [a for a in cfg["arms"] if a.pretrained]:
        for pseed in dict.fromkeys(pretrain_seed(cfg, s) for s in seeds):
            folder = pretrain_dir(out, arm, pseed)
            n = steps[arm.key]["steps"]
            cmd = pretrain_command(cfg, data, arm, pseed, n if n is not None else "<budget>", folder)
            runner.step(folder, "pretrain", cmd, f"pre-train {arm.title}, seed {pseed} ({n or '?'} steps)",
                        resume_flag=["--resume"], extra={"steps": n, "plan": steps[arm.key]})
    for seed in seeds:
        for arm in cfg["arms"]:
            run_arm(cfg, data, out, runner, arm, seed)
    return data
