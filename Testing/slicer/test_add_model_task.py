"""Adding a model without freezing the GUI (issue 13, bug 3): ``MiMLogicCore.start_add_model``
runs the real ``mim models add --progress json`` in a child process, polled like the other
tasks; a registry download's progress comes from the child's own ``progress`` events (bytes,
shown in KiB), and the download can be cancelled without leaving anything in the library.

A real HTTP server thread on 127.0.0.1 serves a real bundle zip and, for the cancel, a
download that stalls half-way; no mocks.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from mimslicer_testing import CHILD_ENV

from MiMSlicerLib import library
from MiMSlicerLib.logic import MiMLogicCore

STALL_BYTES = 300_000  # the stalling download sends this much, then waits
STALL_SIZE = 5_000_000  # ... of a file this large
WEIGHTS = 100_000  # float32 values: a 400 kB bundle, several 64 KiB chunks, so several progress events


def bundle_zip() -> bytes:
    """A valid mimcore bundle (model.json + a small safetensors file), zipped."""
    from safetensors.numpy import save

    weights = save({"w": np.arange(WEIGHTS, dtype=np.float32)})
    description = {
        "format": "mimcore.bundle.v1", "name": "demo liver", "architecture": {"kind": "mim-seg", "preset": "tiny"},
        "labels": [{"value": 1, "name": "liver", "color": [220, 100, 80],
                    "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                                    "type": ["SCT", "10200004", "Liver"]}}],
        "preprocessing": {"spacing": [1.5, 1.5, 2.0]}, "inference": {"roi_size": [32, 32, 32]},
        "training": {"data": "test"},
        "weights": {"file": "weights.safetensors", "sha256": hashlib.sha256(weights).hexdigest(),
                    "size": len(weights)},
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:  # stored, not compressed: the download has its full size
        zf.writestr("demo/model.json", json.dumps(description))
        zf.writestr("demo/weights.safetensors", weights)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    payload = bundle_zip()
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/demo.zip":
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            elif self.path == "/stall.zip":
                self.send_response(200)
                self.send_header("Content-Length", str(STALL_SIZE))
                self.end_headers()
                self.wfile.write(b"x" * STALL_BYTES)
                self.wfile.flush()
                release.wait(30)  # the client is killed meanwhile
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "payload": payload}
    release.set()
    httpd.shutdown()


@pytest.fixture()
def logic(slicer_app, server, tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": [
        {"name": "demo", "url": f"{server['url']}/demo.zip", "sha256": hashlib.sha256(server["payload"]).hexdigest(),
         "size": len(server["payload"])},
        {"name": "stall", "url": f"{server['url']}/stall.zip", "sha256": "ab" * 32, "size": STALL_SIZE},
    ]}))
    env = dict(CHILD_ENV, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    return MiMLogicCore(scene=slicer_app.scene, models_dir=str(tmp_path / "models"), registry=str(registry), env=env)


def test_a_registry_model_is_added_by_a_task_that_never_blocks(logic, server):
    events = []
    started = time.monotonic()
    task = logic.start_add_model("demo", on_event=events.append)
    assert time.monotonic() - started < 2.0, "starting the task must not wait for the child"
    assert task.poll() is True  # running: the GUI's timer keeps polling
    assert task.wait(timeout=60), "mim models add did not finish in 60 s"
    assert task.error is None, task.error
    assert task.result == "demo"
    assert [m["name"] for m in logic.models()] == ["demo"]
    argv = task.job.argv
    assert argv[:3] == ["models", "add", "demo"] and argv[argv.index("--progress") + 1] == "json"
    done = [e for e in events if e["event"] == "done"]
    assert done and done[-1]["name"] == "demo"  # the child's JSON event, parsed
    assert library.staging_dirs(logic.models_dir) == set()

    # the progress is the child's: each download event it printed, and only those, reached the GUI
    size = len(server["payload"])  # the file the HTTP server sends
    sent = [e for e in task.job.events if e["event"] == "progress"]
    assert sent and all(e["stage"] == "download" and e["total"] == size for e in sent)
    shown = [e for e in events if e["event"] == "progress"]
    assert [e["bytes"] for e in shown] == [e["step"] for e in sent]
    assert len(shown) >= 4, shown  # 400 kB in 64 KiB chunks
    fractions = [e["bytes"] / e["total_bytes"] for e in shown]
    assert fractions == sorted(set(fractions)) and fractions[0] < 0.5 and fractions[-1] == 1.0
    assert all(e["total_bytes"] == size and e["total"] == (size + 1023) // 1024 for e in shown)
    assert shown[-1]["step"] == shown[-1]["total"] and shown[-1]["stage"].startswith("downloading demo (")
    assert all(e["eta_s"] is None or e["eta_s"] >= 0 for e in shown)
    start = next(e for e in events if e["event"] == "start")
    assert start["stage"] == "adding demo to the library" and start["source"] == "demo"
    assert task.step == task.total == (size + 1023) // 1024  # what the progress bar shows at the end


def test_cancelling_a_download_leaves_no_library_entry(logic):
    events = []
    task = logic.start_add_model("stall", on_event=events.append)
    deadline = time.monotonic() + 60
    while not any(e["event"] == "progress" and e["bytes"] > 0 for e in events):
        assert task.poll(), f"the add ended early: {task.error}"
        assert time.monotonic() < deadline, "no download progress within 60 s"
        time.sleep(0.05)
    progress = [e for e in events if e["event"] == "progress"][-1]
    assert progress["total_bytes"] == STALL_SIZE and 0 < progress["bytes"] <= STALL_BYTES  # the child's count
    assert progress["total"] == STALL_SIZE // 1024 + 1 and progress["step"] == progress["bytes"] // 1024
    assert progress["stage"].startswith("downloading stall (") and progress["stage"].endswith(" of 5.0 MB)")
    assert task.total == progress["total"]  # what a progress bar shows
    raw = [e for e in task.job.events if e["event"] == "progress"]
    assert raw[-1]["step"] == progress["bytes"] and raw[-1]["total"] == STALL_SIZE
    assert library.staging_dirs(logic.models_dir), "mim models add stages its copy in the library"
    pid = task.job.pid

    started = time.monotonic()
    task.cancel(wait=False)  # what the GUI's Cancel button does
    assert time.monotonic() - started < 0.5, "Cancel must return at once"
    assert task.done and task.cancelled and task.error == "Cancelled." and task.poll() is False
    assert task.wait_cleaned(timeout=10)
    assert logic.models() == []
    assert library.staging_dirs(logic.models_dir) == set(), "the killed child's staging folder is removed"
    assert sorted(p.name for p in logic.models_dir.iterdir()) == [".cache"]  # only the resumable download
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_a_failed_add_says_mimcores_reason(logic, tmp_path):
    task = logic.start_add_model(str(tmp_path / "no-such-bundle.zip"))
    assert task.wait(timeout=60)
    assert task.result is None and task.error
    assert "no-such-bundle" in task.error and "not a file or folder" in task.error
    assert not task.error.startswith("The models job failed")  # mimcore's own sentence, not a log dump


def test_download_events_become_kib_with_a_readable_stage():
    raw = {"event": "progress", "stage": "download", "step": 3 << 30, "total": 5 << 30, "eta_s": 12.5, "metrics": {}}
    shown = library.add_model_event(raw, "big")
    assert shown["step"] == 3 << 20 and shown["total"] == 5 << 20 < 2**31  # a Qt progress bar's int range
    assert (shown["bytes"], shown["total_bytes"], shown["eta_s"]) == (3 << 30, 5 << 30, 12.5)
    assert shown["stage"] == "downloading big (3221.2 of 5368.7 MB)"
    unknown = library.add_model_event(dict(raw, step=2_500_000, total=None, eta_s=None), "big")
    assert unknown["total"] == 0 and unknown["total_bytes"] is None and unknown["stage"] == "downloading big (2.5 MB)"
    other = {"event": "progress", "stage": "segment", "step": 1, "total": 2}
    assert library.add_model_event(other, "big") is other
