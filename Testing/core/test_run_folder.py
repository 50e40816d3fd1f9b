"""The run folder of `mim pretrain` / `mim finetune` (issue 15): a used folder is refused
unless --resume or --overwrite, one run at a time (a lock naming the holder), a full disk is a
clear error that keeps the last checkpoint, --resume before any checkpoint starts afresh,
--keep-checkpoints with exact resume; and the small CLI items (datalist message, broken pipe,
--config precedence)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from mimcore.cli.main import main
from mimcore.models.checkpoint import find_checkpoint, read_checkpoint
from mimcore.training.run_folder import HOLDER_FILE, checkpoint_steps, other_entries, prune_checkpoints, run_files

TINY = ["--preset", "tiny", "--warmup-steps", "2", "--lr", "1e-3", "--progress", "json", "--no-tensorboard"]


def pretrain(out, data, *extra):
    return main(["pretrain", "--data-dir", str(data), "--output", str(out), *TINY, *extra])


def finetune(out, data, *extra):
    """A fine-tuning command line that fails only at the run folder or later (``data`` has no labels)."""
    return main(["finetune", "--images", str(data), "--label-dir", str(data), "--label-names", "1:liver",
                 "--output", str(out), "--steps", "1", "--progress", "json", "--device", "cpu", *extra])


def events(out: str, kind: str | None = None) -> list[dict]:
    found = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"event"')]
    return [e for e in found if kind is None or e["event"] == kind]


def fake_checkpoint(folder, step: int, files=(".json", ".safetensors", ".optim.safetensors")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in files:
        (folder / f"checkpoint_{step:08d}{suffix}").write_text("{}")


def steps_present(folder) -> list[int]:
    return sorted({int(p.name[11:19]) for p in folder.glob("checkpoint_*")})


def test_what_belongs_to_a_run_and_retention(tmp_path):
    """run_files: only what a run writes (a bundle folder only with its model.json; hidden names
    and links never); prune_checkpoints: the N latest complete ones + protected, never newer."""
    for step in (1, 2, 3, 4, 5, 9):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 0, files=(".safetensors",))  # a save interrupted before its JSON
    for name in ("metrics.jsonl", "validation.jsonl", "loss_curve.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    for folder in ("tensorboard", "model", "mine", "model_old"):
        (tmp_path / folder).mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")
    (tmp_path / "model_old" / "model.json").write_text("{}")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "metrics_link.jsonl").symlink_to(tmp_path / "notes.txt")
    own = {p.name for p in run_files(tmp_path)}
    assert {"metrics.jsonl", "validation.jsonl", "loss_curve.png", "tensorboard", "model",
            "checkpoint_00000000.safetensors", "checkpoint_00000009.optim.safetensors"} <= own
    assert not own & {"notes.txt", "mine", "model_old", ".hidden", "metrics_link.jsonl"}
    assert {p.name for p in other_entries(tmp_path)} == {"notes.txt", "mine", "model_old", "metrics_link.jsonl"}

    assert checkpoint_steps(tmp_path) == [1, 2, 3, 4, 5, 9]
    assert prune_checkpoints(tmp_path, 2, newest=5, protect={1}) == [0, 2, 3]
    assert steps_present(tmp_path) == [1, 4, 5, 9]  # 9 is newer than the one just written: untouched
    assert prune_checkpoints(tmp_path, 0, newest=9) == [] and steps_present(tmp_path) == [1, 4, 5, 9]


def test_a_used_folder_is_refused_and_overwrite_replaces_only_the_run(tmp_path, ct_folder, capsys):
    run = tmp_path / "run"
    fake_checkpoint(run, 4)
    (run / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out").write_text("x")
    (run / "notes.txt").write_text("the user's own file")
    orphan = run / ".checkpoint_00000005.safetensors.abcd1234.tmp"  # a save killed midway
    orphan.write_text("partial")

    for command in (pretrain, finetune):
        assert command(run, ct_folder, "--steps", "1") == 2
        captured = capsys.readouterr()
        assert "already holds a run (its last checkpoint is step 4)" in captured.err
        assert "--resume" in captured.err and "--overwrite" in captured.err and "notes.txt" in captured.err
        assert "Traceback" not in captured.err
        assert "already holds a run" in events(captured.out, "error")[0]["message"]
    assert steps_present(run) == [4] and (run / "metrics.jsonl").read_text().startswith('{"step": 4')
    assert not orphan.exists()  # orphaned temporary files go as soon as the folder is locked

    assert pretrain(run, ct_folder, "--steps", "1", "--resume", "--overwrite") == 2
    assert "give one of them" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    assert pretrain(other, ct_folder, "--steps", "1") == 2
    assert "is not empty: it holds data.csv" in capsys.readouterr().err

    with_tensorboard = [a for a in TINY if a != "--no-tensorboard"]
    assert main(["pretrain", "--data-dir", str(ct_folder), "--output", str(run), *with_tensorboard, "--steps", "1",
                 "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert any("--overwrite: deleted the previous run" in e["message"] for e in events(out, "note"))
    assert events(out, "done")[0]["checkpoint"] == str(run / "checkpoint_00000001.json")
    assert steps_present(run) == [1] and not (run / "tensorboard" / "events.out").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # the new run's log, not deleted with the old
    assert (run / "notes.txt").read_text() == "the user's own file"
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / HOLDER_FILE).exists()  # the lock's description goes with the run
    # a run that fails before writing leaves no folder behind
    assert pretrain(tmp_path / "never", ct_folder, "--steps", "1", "--spacing", "1", "0", "1") == 2
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def fresh_start(tmp_path_factory, ct_folder):
    """(folder, its events): 3 steps run with --resume into a folder that a crash before the
    first checkpoint left (a metrics line cut short): it starts at step 0. The reference run
    that the exact-resume tests compare with."""
    a = tmp_path_factory.mktemp("fresh") / "a"
    a.mkdir()
    (a / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pretrain(a, ct_folder, "--steps", "3", "--resume") == 0
    return a, out.getvalue()


def assert_same_run(a, b, step: int) -> None:
    """Bitwise equal weights at ``step`` and equal metrics logs."""
    wa = load_file(a / f"checkpoint_{step:08d}.safetensors")
    wb = load_file(b / f"checkpoint_{step:08d}.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


def test_resume_before_a_checkpoint_starts_afresh_and_retention_resumes_exactly(tmp_path, ct_folder, capsys,
                                                                                 fresh_start):
    """--resume without a checkpoint yet: step 0, said in a note; a checkpoint path given must
    exist; --keep-checkpoints keeps the latest N, and a resume from the one left is bit for bit."""
    a, out = fresh_start
    assert events(out, "start")[0]["step"] == 0 and not events(out, "resume")
    assert any("no checkpoint" in e["message"] and "starting from step 0" in e["message"]
               for e in events(out, "note"))
    assert [json.loads(ln)["step"] for ln in (a / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert pretrain(tmp_path / "c", ct_folder, "--steps", "3", "--resume", str(a / "checkpoint_00000002.json")) == 2
    assert "checkpoint_00000002.json not found" in capsys.readouterr().err

    b = tmp_path / "b"
    assert pretrain(b, ct_folder, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "2") == 0
    assert steps_present(b) == [2, 3]
    for f in b.glob("checkpoint_00000003*"):
        f.unlink()  # killed right after step 2
    assert pretrain(b, ct_folder, "--steps", "3", "--resume", "--keep-checkpoints", "1") == 0
    assert events(capsys.readouterr().out, "resume")[0]["step"] == 2
    assert steps_present(b) == [3]  # step 2 went only once step 3 was complete
    assert_same_run(a, b, 3)
    assert pretrain(b, ct_folder, "--steps", "3", "--keep-checkpoints", "-1", "--resume") == 2
    assert "--keep-checkpoints must be 0" in capsys.readouterr().err


def test_finetune_keeps_the_latest_and_the_best_checkpoint(tmp_path, capsys):
    """Fine-tuning with --resume before any checkpoint (a note, step 0) and --keep-checkpoints 1:
    the last checkpoint and the best-validated step's remain, and the model bundle."""
    from mimcore.data.volume_io import save_volume

    rng = np.random.default_rng(0)
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (36, 32, 20)], indexing="ij")
    ball = x**2 + y**2 + z**2 < 0.3
    save_volume(tmp_path / "images" / "case.nii.gz", (np.where(ball, 60.0, -100.0) + 10 * rng.standard_normal(
        ball.shape)).astype(np.float32), np.diag([1.5, 1.6, 2.5, 1.0]))
    save_volume(tmp_path / "labels" / "case.nii.gz", ball.astype(np.uint8), np.diag([1.5, 1.6, 2.5, 1.0]),
                dtype=np.uint8)
    run = tmp_path / "run"
    rc = main(["finetune", "--images", str(tmp_path / "images"), "--label-dir", str(tmp_path / "labels"),
               "--label-names", "1:liver", "--preset", "tiny", "--spacing", "3", "3", "3", "--output", str(run),
               "--lr", "1e-1", "--warmup-steps", "1", "--progress", "json", "--no-tensorboard", "--device", "cpu",
               "--steps", "3", "--val-every", "1", "--save-every", "1", "--keep-checkpoints", "1", "--resume"])
    out = capsys.readouterr().out
    assert rc == 0 and any("starting from step 0" in e["message"] for e in events(out, "note"))
    best = events(out, "done")[0]["best_step"]
    assert best < 3  # lr 1e-1 collapses the model after step 1: the best step is not the last one
    assert steps_present(run) == [best, 3] and (run / "model" / "model.json").is_file()


def test_a_second_run_is_refused_and_a_kill_9_resumes_exactly(tmp_path, ct_folder, capsys, fresh_start):
    """A real first run holds the folder: a second one (pretrain or finetune, --resume or
    --overwrite) stops at once naming the first run's process. The first run is then killed
    (kill -9) after its first checkpoint: the lock is free, and --resume (which removes what an
    interrupted save left) ends bit for bit where an uninterrupted run ends."""
    run = tmp_path / "run"
    # The child computes with as many threads as this process does: a reduction split over
    # another number of threads rounds differently, and the comparison below is bitwise.
    import torch
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    first = subprocess.Popen([sys.executable, "-m", "mimcore", "pretrain", "--data-dir", str(ct_folder), "--output",
                              str(run), *TINY, "--steps", "3", "--save-every", "1"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / HOLDER_FILE).is_file():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run did not take its folder"
            time.sleep(0.05)
        for command, flag in ((pretrain, "--resume"), (pretrain, "--overwrite"), (finetune, "--resume")):
            assert command(run, ct_folder, "--steps", "3", flag) == 2
            captured = capsys.readouterr()
            assert f"another run is writing into {run}: process {first.pid} on host" in captured.err
            assert "pretrain" in captured.err and "Traceback" not in captured.err
            assert events(captured.out, "error")
        assert first.poll() is None  # the first run was not disturbed
        while not (run / "checkpoint_00000001.json").is_file():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        first.stderr.close()
    assert pretrain(run, ct_folder, "--steps", "3", "--save-every", "1", "--resume") == 0
    capsys.readouterr()
    assert_same_run(fresh_start[0], run, 3)
    assert not list(run.glob(".*.tmp*")) and not (run / HOLDER_FILE).exists()


def test_a_full_disk_is_a_clear_error_and_the_last_checkpoint_stays_valid(tmp_path, ct_folder, capsys):
    """Pre-training on a 10 MB file system: checkpoint 1 (6.6 MB) fits, checkpoint 2 does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10M", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        run = disk / "run"
        assert pretrain(run, ct_folder, "--steps", "3", "--save-every", "1") == 2
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and "SafetensorError" not in captured.err
        message = events(captured.out, "error")[0]["message"]
        assert "the checkpoint of step 2 could not be saved" in message and "no space left" in message
        assert f"still {run / 'checkpoint_00000001.json'} (step 1)" in message and "--resume" in message
        assert [e["step"] for e in events(captured.out, "checkpoint")] == [1]
        assert find_checkpoint(run) == run / "checkpoint_00000001.json"
        meta = read_checkpoint(run, with_optimizer=True)[0]  # sha256-verified (tensors dropped: no mmap left)
        assert meta["step"] == 1
        assert steps_present(run) == [1] and not list(run.glob(".*.tmp*"))  # nothing half-written stays
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_datalist_section_that_is_not_a_list(tmp_path, capsys):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": "oops"}))
    assert main(["pretrain", "--datalist", str(datalist), "--output", str(tmp_path / "run"), "--steps", "1",
                 "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "section 'training'" in err and "is not a list of entries: it is a string" in err
    assert "it has: none" not in err and "Traceback" not in err


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`mim ... | head`: the reader is gone before mim writes; no traceback, exit code 141."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "mimcore", "models", "list", "--library", str(tmp_path)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


def test_options_on_the_command_line_win_over_the_config_file(tmp_path):
    """--config fills only the options not given; one given with its default value still wins."""
    from mimcore.cli import pretrain_cmd

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"effective_batch": 8, "args": {"workers": 2, "seed": 5, "preset": "tiny",
                                                                 "progress": "none", "batch": 2}}))
    parser = pretrain_cmd.add_parser(argparse.ArgumentParser().add_subparsers())

    def resolved(*argv):
        args = parser.parse_args(["--output", "x", "--config", str(recipe), *argv])
        pretrain_cmd.resolve_options(args, parser.built_in_defaults)
        return args

    args = resolved("--workers", "0", "--seed", "0", "--progress", "bar")
    assert (args.workers, args.seed, args.progress) == (0, 0, "bar")  # the defaults' values, given
    assert (args.preset, args.batch, args.accum, args.device) == ("tiny", 2, 4, "auto")
    args = resolved("--accum", "1")
    assert (args.workers, args.seed, args.progress, args.accum) == (2, 5, "none", 1)
