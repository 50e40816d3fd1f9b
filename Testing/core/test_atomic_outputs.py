"""Every output is written atomically: a full disk is a clear error (exit 2) with nothing
left at the final name and no temporary file, permissions follow the umask, and the
temporary files of a killed save are cleaned up (issue 15).

The full-disk tests mount a small tmpfs (root, as in CI); they are skipped, saying why,
where mounting is not permitted."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mimcore.cli.main import main as mim_main
from mimcore.data.volume_io import load_volume, save_volume
from mimcore.errors import OutputError
from mimcore.files import atomic_dir, atomic_write, atomic_write_text, clean_orphans

PREP = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "hu_min": -175.0, "hu_max": 250.0}


def tiny_bundle_at(folder: Path, overlap: float = 0.25, name: str = "tiny-test") -> Path:
    """The tiny 2-label (liver, spleen) model bundle the segmentation tests use: 32^3 windows,
    random weights (seed 0), :data:`PREP` preprocessing, ``overlap`` as its inference default."""
    from mimcore.bundles.bundle import save_bundle
    from mimcore.data.labels import labels_from_names
    from mimcore.models.convvit import preset as convvit_preset
    from mimcore.models.mim_segnet import MiMSegNet, architecture_dict

    torch.manual_seed(0)
    net = MiMSegNet(convvit_preset("tiny"), 3)
    labels = labels_from_names({1: "liver", 2: "spleen"})
    desc = {"name": name, "architecture": architecture_dict(net, "tiny"),
            "labels": [lab.to_dict() for lab in labels], "preprocessing": PREP,
            "inference": {"overlap": overlap, "sw_batch_size": 2}, "training": {}}
    return save_bundle(folder / "tiny", net.state_dict(), desc)


def ct_volume(path: Path, shape=(40, 36, 30)) -> Path:
    """A small CT-like volume in HU (air around a soft-tissue ellipsoid)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = np.where(x**2 + y**2 + z**2 < 0.6, 60.0, -1000.0).astype(np.float32)
    return save_volume(path, hu, np.diag([1.5, 1.5, 2.5, 1.0]))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle_at(tmp_path_factory.mktemp("bundle"))


def leftovers(folder: Path) -> list[str]:
    """Temporary names (ours start with a dot) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- the writer itself ------------------------------------------------------------------

def test_a_failed_write_leaves_nothing_and_says_no_space(tmp_path):
    target = tmp_path / "labels.nii.gz"

    def write(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="no space left on device") as info:
        atomic_write(target, write)
    assert info.value.no_space and info.value.path == target
    assert not target.exists() and leftovers(tmp_path) == []


def test_a_file_that_does_not_verify_keeps_the_previous_one(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def verify(tmp):
        raise ValueError("stream ends early")

    with pytest.raises(OutputError, match="stream ends early.*existing report.json was left unchanged"):
        atomic_write(target, lambda tmp: Path(tmp).write_text("new"), verify)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_a_programming_error_in_the_writer_propagates(tmp_path):
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "x", lambda tmp: 1 + "a")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_silently_truncated_volume_does_not_verify(tmp_path, suffix):
    """What a writer leaves when it stops half-way and returns normally (NIfTI on a full
    disk): ITK alone reads such a .nii/.nii.gz with zeros; the verifier refuses it."""
    from mimcore.data.volume_io import verify_volume_file

    rng = np.random.default_rng(0)
    path = save_volume(tmp_path / f"l{suffix}", rng.integers(0, 255, (30, 30, 30)).astype(np.uint8), np.eye(4))
    verify_volume_file(path, (30, 30, 30))
    with pytest.raises(OSError, match="size"):
        verify_volume_file(path, (30, 30, 31))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(OSError, match="incomplete|does not read back"):
        verify_volume_file(path, (30, 30, 30))


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_permissions_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        text = atomic_write_text(tmp_path / "a.json", "{}")
        label = save_volume(tmp_path / "l.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
        with atomic_dir(tmp_path / "bundle") as folder:
            (folder / "model.json").write_text("{}")
    finally:
        os.umask(old)
    for path in (text, label, tmp_path / "bundle" / "model.json"):
        assert (path.stat().st_mode & 0o777) == file_mode, path
    assert ((tmp_path / "bundle").stat().st_mode & 0o777) == dir_mode


def test_atomic_dir_replaces_only_when_asked_and_cleans_up(tmp_path):
    dest = tmp_path / "b"
    with atomic_dir(dest) as folder:
        (folder / "x").write_text("1")
    with pytest.raises(OutputError, match="exists"):
        with atomic_dir(dest) as folder:
            (folder / "x").write_text("2")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest, replace=True) as folder:
            (folder / "x").write_text("3")
            raise RuntimeError("failed half-way")
    with atomic_dir(dest, replace=True) as folder:
        (folder / "x").write_text("4")
    assert (dest / "x").read_text() == "4" and leftovers(tmp_path) == []


def test_clean_orphans_removes_a_killed_save_and_nothing_else(tmp_path):
    """A real writer is killed (SIGKILL) mid-save; its temporary file is the orphan."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mimcore.files import atomic_write
        def write(tmp):
            Path(tmp).write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(tmp_path / 'checkpoint_00000010.safetensors')!r}, write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = leftovers(tmp_path)
    assert len(killed) == 1 and killed[0].startswith(".checkpoint_00000010.safetensors.")
    (tmp_path / ".x.nii.gz.abcd_123.tmp.nii.gz").write_bytes(b"")  # a temporary with a format suffix
    (tmp_path / ".bundle.k2j4h5g6.tmp").mkdir()  # an atomic_dir temporary folder
    keep = ["keep.tmp", ".hidden", ".bundle.k2j4h5g6.old", "notes.txt", ".x.toolong123.tmp"]
    for name in keep:
        (tmp_path / name).write_text("mine")
    (tmp_path / ".link.abcdefgh.tmp").symlink_to(tmp_path / "notes.txt")
    fresh = tmp_path / ".y.json.zzzzzzzz.tmp"
    fresh.write_text("a live writer's")
    old = time.time() - 3600
    for name in killed + [".x.nii.gz.abcd_123.tmp.nii.gz", ".bundle.k2j4h5g6.tmp"]:
        os.utime(tmp_path / name, (old, old))
    removed = clean_orphans(tmp_path, min_age_s=600)
    assert sorted(p.name for p in removed) == sorted(killed + [".bundle.k2j4h5g6.tmp",
                                                               ".x.nii.gz.abcd_123.tmp.nii.gz"])
    assert all((tmp_path / name).exists() for name in keep) and fresh.exists()
    assert (tmp_path / ".link.abcdefgh.tmp").is_symlink() and (tmp_path / "notes.txt").read_text() == "mine"
    assert [p.name for p in clean_orphans(tmp_path)] == [fresh.name]  # age 0: the caller holds the lock
    assert clean_orphans(tmp_path / "missing") == []


# --- a full disk, for real --------------------------------------------------------------

class SmallDisk(type(Path())):
    """A mounted tmpfs folder that can be filled up."""

    def fill(self, keep: int) -> None:
        """Leave exactly ``keep`` bytes free (a multiple of the 4 KiB page)."""
        free = shutil.disk_usage(self).free
        with open(self / "filler", "ab") as f:
            f.write(b"\0" * max(free - keep, 0))
        assert shutil.disk_usage(self).free == keep


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs, unmounted afterwards."""
    mount = SmallDisk(tmp_path / "disk")
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def outputs_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


def test_reports_and_folders_on_a_full_disk(small_disk):
    """Reports (text) and bundle folders: a real ENOSPC, nothing left, the old file kept."""
    atomic_write_text(small_disk / "report.csv", "old\n")
    small_disk.fill(0)
    with pytest.raises(OutputError, match="no space left on device.*existing report.csv was left unchanged"):
        atomic_write_text(small_disk / "report.csv", "x" * 100_000)
    with pytest.raises(OutputError, match="no space left on device.*nothing was written") as info:
        with atomic_dir(small_disk / "bundle") as folder:
            (folder / "weights.safetensors").write_bytes(b"w" * 100_000)
    assert info.value.no_space
    assert outputs_in(small_disk) == ["report.csv"] and (small_disk / "report.csv").read_text() == "old\n"


def test_mim_segment_on_a_full_disk_nii(tmp_path, small_disk, bundle):
    """``.nii``: the NIfTI library prints an error and returns; without verification this was
    exit 0 and a truncated file. A real ``mim`` subprocess, the disk 8 KiB short of full."""
    src = ct_volume(tmp_path / "ct.nrrd")
    small_disk.fill(8192)
    out = small_disk / "ct_seg.nii"  # 40*36*30 bytes + header: does not fit in 8 KiB
    proc = subprocess.run([sys.executable, "-m", "mimcore", "segment", src, "--model", bundle, "--output", out,
                           "--device", "cpu", "--progress", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"Could not write label map {out}: no space left on device" in proc.stderr, proc.stderr
    assert f"nothing was written at {out}" in proc.stderr
    assert "Traceback" not in proc.stderr and "NWAD" not in proc.stderr
    assert outputs_in(small_disk) == []


@pytest.mark.parametrize("name", ["ct_seg.nii.gz", "ct_seg.nrrd", "ct_seg.mha"])
def test_mim_segment_on_a_full_disk_other_formats(tmp_path, small_disk, bundle, capsys, name):
    """The same through the CLI entry point in-process (no interpreter start-up per format)."""
    src = ct_volume(tmp_path / "ct.nii.gz")
    small_disk.fill(0)
    code = mim_main(["segment", str(src), "--model", str(bundle), "--output", str(small_disk / name),
                     "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left on device" in err and name in err
    assert outputs_in(small_disk) == []


def test_seg_nrrd_that_does_not_fit_after_the_label_map(tmp_path, small_disk, bundle, capsys):
    """The label map fits, the ``.seg.nrrd`` then does not: exit 2, the label map is complete,
    nothing at the ``.seg.nrrd`` name."""
    src = ct_volume(tmp_path / "ct.nii.gz")
    small_disk.fill(12288)
    out = small_disk / "ct_seg.nii.gz"
    code = mim_main(["segment", str(src), "--model", str(bundle), "--output", str(out), "--seg-nrrd",
                     "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left on device" in err and "ct_seg.seg.nrrd" in err, err
    assert outputs_in(small_disk) == ["ct_seg.nii.gz"]
    assert load_volume(out).shape == (40, 36, 30)
