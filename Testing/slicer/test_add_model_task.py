"""Adding a model without freezing the GUI (issue 13, bug 3): ``MiMLogicCore.start_add_model``
runs the real ``mim models add`` in a child process, polled like the other tasks; a registry
download reports its progress and can be cancelled without leaving anything in the library.

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


def bundle_zip() -> bytes:
    """A valid mimcore bundle (model.json + a small safetensors file), zipped."""
    from safetensors.numpy import save

    weights = save({"w": np.arange(6, dtype=np.float32)})
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
    with zipfile.ZipFile(buffer, "w") as zf:
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


def test_a_registry_model_is_added_by_a_task_that_never_blocks(logic):
    events = []
    started = time.monotonic()
    task = logic.start_add_model("demo", on_event=events.append)
    assert time.monotonic() - started < 2.0, "starting the task must not wait for the child"
    assert task.poll() is True  # running: the GUI's timer keeps polling
    assert task.wait(timeout=60), "mim models add did not finish in 60 s"
    assert task.error is None, task.error
    assert task.result == "demo"
    assert [m["name"] for m in logic.models()] == ["demo"]
    assert task.job.argv[:3] == ["models", "add", "demo"] and "--json" in task.job.argv
    done = [e for e in events if e["event"] == "done"]
    assert done and done[-1]["name"] == "demo"  # the child's JSON event, parsed
    assert library.staging_dirs(logic.models_dir) == set()


def test_cancelling_a_download_leaves_no_library_entry(logic):
    events = []
    task = logic.start_add_model("stall", on_event=events.append)
    deadline = time.monotonic() + 60
    while not any(e["event"] == "progress" and e["step"] > 0 for e in events):
        assert task.poll(), f"the add ended early: {task.error}"
        assert time.monotonic() < deadline, "no download progress within 60 s"
        time.sleep(0.05)
    progress = [e for e in events if e["event"] == "progress"][-1]
    assert progress["total"] == STALL_SIZE // 1024 + 1 and 0 < progress["step"] <= STALL_BYTES // 1024 + 1
    assert progress["stage"].startswith("downloading stall (") and progress["stage"].endswith(" of 5.0 MB)")
    assert task.total == progress["total"]  # what a progress bar shows
    assert library.staging_dirs(logic.models_dir), "mim models add stages its copy in the library"
    pid = task.job.pid

    started = time.monotonic()
    task.cancel(wait=False)  # what the GUI's Cancel button does
    assert time.monotonic() - started < 0.5, "Cancel must return at once"
    assert task.done and task.cancelled and task.error == "Cancelled." and task.poll() is False
    assert task.wait_cleaned(timeout=10)
    assert logic.models() == []
    assert library.staging_dirs(logic.models_dir) == set(), "the killed child's staging folder is removed"
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_a_failed_add_says_mimcores_reason(logic, tmp_path):
    task = logic.start_add_model(str(tmp_path / "no-such-bundle.zip"))
    assert task.wait(timeout=60)
    assert task.result is None and task.error
    assert "no-such-bundle" in task.error and "not a file or folder" in task.error
    assert not task.error.startswith("The models job failed")  # mimcore's own sentence, not a log dump
