"""Zipped model bundles cannot fill the disk or leave folders behind (issue 15).

A 71 MB zip of 20,000 small files once unpacked 2 GB into the persistent cache and stayed
there. Refused now before anything is written: more entries than a bundle has, a total
that unpacks far beyond the zip's size; and every failed extraction (a damaged member
half-way, a full disk half-way, a bundle that does not verify) leaves nothing in the cache
or the library. Real zips, a real tmpfs for the full disk (root only; skipped otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from mimcore.bundles import bundle as bundle_module
from mimcore.bundles.bundle import extract_zip_bundle, load_bundle, save_bundle, write_zip
from mimcore.bundles.library import add_model
from mimcore.errors import MimError


def description() -> dict:
    return {"name": "zip-test", "architecture": {"kind": "mim-seg", "preset": "tiny"},
            "labels": [{"value": 1, "name": "liver", "color": [220, 100, 80]}],
            "preprocessing": {"hu_min": -175.0, "hu_max": 250.0}, "inference": {}, "training": {}}


def bundle_folder(path: Path, n_bytes: int = 4096) -> Path:
    """A valid bundle whose weights are ``n_bytes`` of random uint8 (plus the safetensors header)."""
    g = torch.Generator().manual_seed(0)
    return save_bundle(path, {"w": torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=g)}, description())


def zip_with_extras(folder: Path, zip_path: Path, extras: list[tuple[str, bytes]]) -> Path:
    """The bundle's files plus ``extras`` (name, content), extras deflated."""
    write_zip(folder, zip_path)
    with zipfile.ZipFile(zip_path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in extras:
            zf.writestr(name, data)
    return zip_path


def leftovers(folder: Path) -> list[str]:
    """Everything under ``folder`` (relative names), hidden entries included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_a_zip_of_thousands_of_files_is_refused_before_writing(tmp_path):
    """The reported case, scaled down: a valid bundle plus 2,000 small files."""
    folder = bundle_folder(tmp_path / "model")
    many = zip_with_extras(folder, tmp_path / "many.zip", [(f"junk/{i:05d}.bin", bytes(512)) for i in range(2000)])
    with pytest.raises(MimError, match=r"holds 2002 entries.*at most 64"):
        load_bundle(many, cache_dir=tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == ["bundles"]
    # one entry over the cap is refused, at the cap it is a bundle
    at_cap = zip_with_extras(folder, tmp_path / "cap.zip", [(f"doc{i}.txt", b"x") for i in range(62)])
    assert load_bundle(at_cap, cache_dir=tmp_path / "cache").name == "zip-test"
    over = zip_with_extras(folder, tmp_path / "over.zip", [(f"doc{i}.txt", b"x") for i in range(63)])
    with pytest.raises(MimError, match="holds 65 entries"):
        load_bundle(over, cache_dir=tmp_path / "cache2")


def test_a_zip_unpacking_far_beyond_its_size_is_refused(tmp_path):
    """12 members of 6 MiB zeros: each under the per-member ratio rule's 8 MiB, together
    72 MiB from a zip of about 100 KiB (some 700 times): the total ratio rule refuses it."""
    folder = bundle_folder(tmp_path / "model")
    bomb = zip_with_extras(folder, tmp_path / "bomb.zip", [(f"pad{i}.bin", bytes(6 << 20)) for i in range(12)])
    assert bomb.stat().st_size < (1 << 20)
    with pytest.raises(MimError, match=r"would unpack to 72 MiB, \d+ times its own size.*at most 20 times"):
        load_bundle(bomb, cache_dir=tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == ["bundles"]
    # the same content, barely compressible (random bytes), is a (large) bundle like any other
    rng = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=rng).numpy().tobytes()
    fine = zip_with_extras(folder, tmp_path / "fine.zip", [(f"pad{i}.bin", noise) for i in range(3)])
    assert load_bundle(fine, cache_dir=tmp_path / "cache").name == "zip-test"


def damaged_zip(folder: Path, zip_path: Path) -> Path:
    """The bundle's zip with one byte of the (stored) weights changed: its CRC fails when the
    member has been read to its end, i.e. after model.json and most of it were written."""
    write_zip(folder, zip_path)
    data = bytearray(zip_path.read_bytes())
    weights = (folder / "weights.safetensors").read_bytes()
    at = data.index(weights[-64:]) + 32
    data[at] ^= 0xFF
    zip_path.write_bytes(bytes(data))
    return zip_path


def test_a_failure_half_way_leaves_nothing_behind(tmp_path):
    folder = bundle_folder(tmp_path / "model", 1 << 20)
    bad = damaged_zip(folder, tmp_path / "bad.zip")
    with pytest.raises(MimError, match=r"cannot be extracted \(Bad CRC-32.*nothing was kept"):
        load_bundle(bad, cache_dir=tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == ["bundles"]

    dest = tmp_path / "dest"  # extracting into a given folder: what was written is removed again
    dest.mkdir()
    (dest / "mine.txt").write_text("kept")
    with pytest.raises(MimError, match="cannot be extracted"):
        extract_zip_bundle(bad, dest)
    assert leftovers(dest) == ["mine.txt"]

    library = tmp_path / "library"
    with pytest.raises(MimError, match="cannot be extracted"):
        add_model(bad, library=library)
    assert leftovers(library) == []  # no staging folder, no half model


def test_a_zip_that_is_not_a_valid_bundle_is_not_kept_in_the_cache(tmp_path):
    """It extracts, but its weights do not match model.json: refused, and not cached (else
    every later use would find the damaged copy, and its bytes would stay on disk)."""
    folder = bundle_folder(tmp_path / "model")
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    zipped = tmp_path / "tampered.zip"
    write_zip(folder, zipped)
    with pytest.raises(MimError, match="is damaged, nothing was kept.*does not match model.json"):
        load_bundle(zipped, cache_dir=tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == ["bundles"]


def test_extractions_left_by_a_killed_process_are_removed(tmp_path):
    """A temporary extraction folder older than STALE_EXTRACTION_S goes at the next
    extraction; a recent one (perhaps another process's, under way) stays. Likewise the
    library's staging folders at the next `mim models add`."""
    root = tmp_path / "cache" / "bundles"
    stale, live = root / ".0123456789abcdef.k1ll3d_x.tmp", root / ".fedcba9876543210.runn1ng.tmp"
    for orphan in (stale, live):
        orphan.mkdir(parents=True)
        (orphan / "weights.safetensors").write_bytes(bytes(1000))
    old = time.time() - bundle_module.STALE_EXTRACTION_S - 60
    os.utime(stale, (old, old))
    zipped = tmp_path / "ok.zip"
    write_zip(bundle_folder(tmp_path / "model"), zipped)
    bundle = load_bundle(zipped, cache_dir=tmp_path / "cache")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, bundle.path.name])
    assert json.loads((bundle.path / "model.json").read_text())["name"] == "zip-test"

    library = tmp_path / "library"  # the same for the library's staging folders
    staged = library / ".add-.k1ll3d_x.tmp"
    (staged / "unzipped").mkdir(parents=True)
    os.utime(staged, (old, old))
    add_model(zipped, library=library)
    assert sorted(p.name for p in library.iterdir()) == ["zip-test"]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def leave_free(disk: Path, keep: int) -> None:
    """Fill ``disk`` so that exactly ``keep`` bytes (a multiple of 4 KiB) stay free."""
    with open(disk / "filler", "ab") as f:
        f.write(bytes(max(shutil.disk_usage(disk).free - keep, 0)))
    assert shutil.disk_usage(disk).free == keep


def test_a_full_disk_before_or_during_extraction_leaves_nothing(tmp_path, small_disk):
    page = 4096
    folder = bundle_folder(tmp_path / "model", 2 * page)
    header = (folder / "weights.safetensors").stat().st_size - 2 * page
    folder = bundle_folder(tmp_path / "model", 300 * page + 100 - header)  # 300 pages + 100 bytes
    zipped = tmp_path / "model.zip"
    write_zip(folder, zipped)
    json_size = (folder / "model.json").stat().st_size
    weights_size = (folder / "weights.safetensors").stat().st_size
    assert weights_size % page == 100 and json_size + 100 < page
    cache = small_disk / "cache"
    (cache / "bundles").mkdir(parents=True)

    # free space below the total: refused before anything is written
    leave_free(small_disk, 200 * page)
    with pytest.raises(MimError, match=r"only 0\.8 MiB are free.*free some space"):
        load_bundle(zipped, cache_dir=cache)
    assert leftovers(cache) == ["bundles"]

    # enough bytes free, one page too few: the disk fills half-way through the weights
    (small_disk / "filler").unlink()
    pages = -(-weights_size // page) + -(-json_size // page)
    leave_free(small_disk, (pages - 1) * page)
    assert (pages - 1) * page >= weights_size + json_size  # so the up-front check lets it start
    with pytest.raises(MimError, match=r"disk filled up while extracting .*no space left.*nothing was kept"):
        load_bundle(zipped, cache_dir=cache)
    assert leftovers(cache) == ["bundles"]
    assert shutil.disk_usage(small_disk).free == (pages - 1) * page  # every byte given back
