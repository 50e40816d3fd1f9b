"""MiM Studio's rules without a browser: token, path confinement, uploads, progress text,
curves. Fast, and each fails on its own when a rule breaks."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.progress import curves, format_seconds, progress_fraction, progress_text
from MiMStudio.access import AccessGuard, confine
from MiMStudio.cases import CaseList, cases_text
from MiMStudio.catalog import Catalog
from MiMStudio.config import config_from_args, resolve_token
from MiMStudio.uploads import MB, UploadFolder, safe_name


def test_a_token_is_required_off_localhost_only():
    assert resolve_token("127.0.0.1", None) is None
    assert resolve_token("localhost", None) is None
    a, b = resolve_token("0.0.0.0", None), resolve_token("192.168.1.5", None)
    assert a and b and a != b and len(a) >= 24
    assert resolve_token("127.0.0.1", "x" * 20) == "x" * 20
    with pytest.raises(ValueError):
        resolve_token("0.0.0.0", "short")
    config = config_from_args(["--host", "0.0.0.0", "--port", "9000"])
    assert config.requires_token and f"?secret={config.token}" in config.url()
    assert config_from_args([]).url() == "http://127.0.0.1:8765/"


def _run(coroutine):
    """Run a coroutine that never waits (the browser tests' Playwright owns this thread's loop)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited")


def test_the_guard_checks_the_token_and_holds_one_page():
    guard = AccessGuard("the-right-token-123")
    check = lambda token, client: _run(guard.validateToken(token, client))  # noqa: E731
    assert not check("wrong", "a") and not check(None, "a") and not check("wslink-secret", "a")
    assert check("the-right-token-123", "a")
    assert not check("the-right-token-123", "b")  # a second page
    guard.onClose("a")
    assert check("the-right-token-123", "b")
    assert guard.refused == ["wrong or missing access token"] * 3 + ["another page holds this MiM Studio session"]
    local = AccessGuard(None)  # localhost without token: what a page sends by default
    assert _run(local.validateToken("wslink-secret", "c"))


def test_paths_are_confined_to_the_shared_folders(tmp_path):
    shared, other = tmp_path / "shared", tmp_path / "other"
    (shared / "sub").mkdir(parents=True)
    other.mkdir()
    (shared / "sub" / "ct.nii.gz").write_bytes(b"x")
    (other / "secret.nii.gz").write_bytes(b"x")
    os.symlink(other / "secret.nii.gz", shared / "link.nii.gz")
    assert confine("sub/ct.nii.gz", [shared]) == shared / "sub" / "ct.nii.gz"
    assert confine(str(shared / "sub" / "ct.nii.gz"), [shared]) == shared / "sub" / "ct.nii.gz"
    for bad in ("../other/secret.nii.gz", str(other / "secret.nii.gz"), "link.nii.gz", "/etc/passwd",
                "sub/../../other/secret.nii.gz"):
        with pytest.raises(MiMSlicerError, match="outside the folders"):
            confine(bad, [shared])
    with pytest.raises(MiMSlicerError):
        confine("", [shared])

    uploads = tmp_path / "up"
    uploads.mkdir()
    catalog = Catalog([shared], None, uploads)
    assert catalog.resolve("data:sub/ct.nii.gz") == shared / "sub" / "ct.nii.gz"
    assert [v["value"] for v in catalog.volumes()] == ["data:sub/ct.nii.gz"]  # not the link leading out
    for bad in ("data:../other/secret.nii.gz", "sample:ct.nii.gz", "upload:../shared/sub/ct.nii.gz", "ct.nii.gz"):
        with pytest.raises(MiMSlicerError, match="Refused"):
            catalog.resolve(bad)


def test_uploads_have_a_size_limit_and_safe_names():
    folder = UploadFolder(max_bytes=MB)
    try:
        assert oct(folder.path.stat().st_mode & 0o777) == "0o700"
        with pytest.raises(MiMSlicerError, match=r"'big.nii.gz' is 1.5 MB; this server accepts uploads up to 1.0 MB"):
            folder.save({"name": "big.nii.gz", "content": b"\0" * (3 * MB // 2)})
        with pytest.raises(MiMSlicerError, match="not a volume file"):
            folder.save({"name": "notes.txt", "content": b"hello"})
        path = folder.save({"name": "../../evil dir/ct.nii.gz", "content": b"\0" * 10})
        assert path.parent == folder.path and path.name == "ct.nii.gz"
        assert safe_name("..\\..\\x y.nrrd") == "x_y.nrrd" and safe_name("") == "upload"
    finally:
        folder.remove()
    assert not folder.path.exists()


def _task(**kw):
    base = dict(stage="fine-tuning", step=3, total=10, eta_s=75.0, last_metrics={"loss": 0.51234, "lr": 1e-4},
                history=[(1, {"loss": 1.0}), (2, {"loss": 0.8}), (2, {"dice": 0.4}), (3, {"loss": 0.51234})],
                done=False, error=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_progress_text_fraction_and_curves():
    assert format_seconds(42) == "42 s" and format_seconds(185) == "3 min 05 s"
    assert format_seconds(3720) == "1 h 02 min" and format_seconds(None) == "" and format_seconds(-1) == ""
    assert format_seconds(float("nan")) == ""
    assert progress_text(_task()) == "fine-tuning - 3/10 - about 1 min 15 s left - loss 0.5123"
    assert progress_text(_task(done=True, stage="done", step=10)) == "done - 10/10 - loss 0.5123"
    assert progress_fraction(_task()) == pytest.approx(0.3)
    assert progress_fraction(_task(total=0)) == 0.0
    assert progress_fraction(_task(done=True)) == 1.0
    assert curves(_task()) == {"loss": [(1, 1.0), (2, 0.8), (3, 0.51234)], "dice": [(2, 0.4)]}


def _node(name):
    return SimpleNamespace(GetName=lambda: name)


def test_the_fine_tuning_case_list():
    cases = CaseList()
    ct1, seg1, ct2, seg2 = _node("ct1"), _node("ct1 - tiny"), _node("ct2"), _node("ct2 - tiny")
    assert len(cases) == 0 and cases.rows() == [] and cases_text(0).startswith("No case added")
    assert cases.add(ct1, seg1) == 1 and cases_text(1) == "1 case: Fine-tune trains on this one."
    with pytest.raises(MiMSlicerError, match="'ct1 - tiny' is already case 1"):
        cases.add(ct1, seg1)
    with pytest.raises(MiMSlicerError, match="Nothing to add"):
        cases.add(ct2, None)
    assert cases.add(ct2, seg2) == 2 and cases_text(2) == "2 cases: Fine-tune trains on these."
    assert cases.rows() == [{"index": 0, "volume": "ct1", "segmentation": "ct1 - tiny"},
                            {"index": 1, "volume": "ct2", "segmentation": "ct2 - tiny"}]
    assert cases.holds(ct1) and cases.holds(seg2) and not cases.holds(_node("ct1"))  # the node, not its name
    for bad in (2, -1, "x", None, True):
        with pytest.raises(MiMSlicerError, match="no case"):
            cases.remove(bad)
    assert cases.remove(0) == (ct1, seg1) and not cases.holds(ct1)
    assert cases.pairs == [(ct2, seg2)] and cases.rows()[0]["index"] == 0
