"""Fixtures of the MiM Studio tests: a tiny model and a 1-step pre-training run made by the
real ``mimcore`` CLI, a live MiM Studio server (``python -m MiMStudio`` in a child
process, on 127.0.0.1, with an access token), and headless Chromium (Debian's
``/usr/bin/chromium``, driven by Playwright).

One server and one browser per test session: the browser tests share them and run in
file order (segment, then preview, then fine-tune reuse what the earlier ones built).
Screenshots go to ``Testing/studio/screenshots/`` (the README shows them).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
SLICER_DIR = REPO / "MiMSlicer"
sys.path.insert(0, str(SLICER_DIR))  # MiMSlicerLib and MiMStudio, as `python -m MiMStudio` finds them

# Test modules import the helpers below as ``mimstudio_testing`` (every conftest.py is "conftest").
sys.modules["mimstudio_testing"] = sys.modules[__name__]

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
CHROMIUM = os.environ.get("MIM_STUDIO_CHROMIUM", "/usr/bin/chromium")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
LABELS = ["liver", "spleen", "kidney_left", "kidney_right"]
MAX_UPLOAD_MB = 1.0
SERVER_START_S = 120


def _poll(tasks, timeout: float) -> None:
    start = time.monotonic()
    while any([t.poll() for t in tasks]):
        assert time.monotonic() - start < timeout, f"still running after {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def studio_data(sample_datalist, tmp_path_factory) -> SimpleNamespace:
    """A data folder (the small sample CT, a 1-step ``tiny`` MiM pre-training run in
    ``runs/mim``) and a model library with a ``tiny`` 4-organ model trained 2 steps at 6 mm:
    real ``mim pretrain`` / ``mim finetune`` / ``mim models add`` child processes, the two
    trainings at once."""
    from MiMSlicerLib.jobs import Job  # the runner Studio uses; this process imports no slicer

    samples = Path(sample_datalist).parent
    data = tmp_path_factory.mktemp("studio-data")
    shutil.copy(samples / "example_ct_sm.nii.gz", data / "ct_small.nii.gz")
    models = tmp_path_factory.mktemp("studio-models")
    work = tmp_path_factory.mktemp("studio-work")
    datalist = work / "datalist.json"
    names = json.loads(Path(sample_datalist).read_text(encoding="utf-8"))["labels"]
    datalist.write_text(json.dumps({"labels": names, "training": [
        {"image": str(samples / "example_ct_sm.nii.gz"), "label": str(samples / "example_seg.nii.gz")}]}))

    finetune = Job(["finetune", "--datalist", str(datalist), "--output", str(work / "run"), "--steps", "2",
                    "--device", "cpu", "--progress", "json", "--name", "tiny-organs", "--preset", "tiny",
                    "--spacing", "6", "6", "6", "--no-tensorboard", "--labels", ",".join(LABELS),
                    "--samples-per-case", "1"], env=CHILD_ENV).start()
    pretrain = Job(["pretrain", "--datalist", str(datalist), "--preset", "tiny", "--steps", "1",
                    "--output", str(data / "runs" / "mim"), "--device", "cpu", "--progress", "json",
                    "--no-tensorboard"], env=CHILD_ENV).start()
    _poll([finetune, pretrain], timeout=300)
    for job in (finetune, pretrain):
        assert job.error is None and job.returncode == 0, job.error
    add = Job(["models", "add", str(work / "run" / "model"), "--library", str(models), "--name", "tiny-organs",
               "--quiet"], env=CHILD_ENV).start()
    assert add.wait(timeout=120) and add.returncode == 0, add.error
    return SimpleNamespace(data=data, models=models, model="tiny-organs", ct=data / "ct_small.nii.gz",
                           sample_cache=samples.parent)


def studio_command(data: Path, models: Path, port: int = 0, extra: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "MiMStudio", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
            "--models-dir", str(models), "--max-upload-mb", str(MAX_UPLOAD_MB), "--device", "cpu", *extra]


class StudioServer:
    """``python -m MiMStudio`` in a child process; ``url`` once it printed it is ready."""

    def __init__(self, command: list[str], env: dict):
        self.process = subprocess.Popen(command, cwd=SLICER_DIR, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._ready.get(timeout=SERVER_START_S)
        assert self.url, "MiM Studio exited before it was ready:\n" + "\n".join(self.lines[-40:])
        self.base = self.url.split("?")[0]

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if "MiM Studio is ready: open " in line:
                self._ready.put(line.split("open ", 1)[1].strip())
        self._ready.put(None)

    def log(self, contains: str, wait_s: float = 5.0) -> list[str]:
        """The server's output lines holding ``contains``, waiting up to ``wait_s`` for one
        (the server prints before it answers, but its output is read in another thread)."""
        deadline = time.monotonic() + wait_s
        while not (found := [line for line in self.lines if contains in line]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def studio(studio_data) -> StudioServer:
    """The live server, with an access token (so the token checks are real even on 127.0.0.1)."""
    token = secrets.token_urlsafe(24)
    env = {**os.environ, **CHILD_ENV, "MIM_DATA_DIR": str(studio_data.sample_cache),
           "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
    env.pop("DISPLAY", None)
    # "--token=...": a random token may start with "-", which argparse would take for an option
    server = StudioServer(studio_command(studio_data.data, studio_data.models, extra=(f"--token={token}",)), env)
    server.token = token
    assert f"secret={token}" in server.url
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's), through Playwright."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"No Chromium at {CHROMIUM}: `make test` installs it (apt-get install chromium) when run as "
                    "root; elsewhere install it, or set MIM_STUDIO_CHROMIUM.")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def page(browser, studio):
    """The page of the session, opened with the token, the drawer's widgets in place."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.goto(studio.url)
    page.wait_for_selector("#load-btn", timeout=60_000)
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def descendants(pid: int) -> list[int]:
    """PIDs of the live (not zombie) processes below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()  # state ppid ...
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def load_sample(page) -> None:
    """Load the first offered volume (the small sample CT) and wait until it is shown."""
    page.click("#load-btn")
    page.wait_for_function("document.querySelector('#alert').innerText.includes('Loaded example_ct_sm')",
                           timeout=30_000)


def wait_done(page, kind: str, timeout_s: float = 120) -> None:
    """Wait until the ``kind`` task's status says done (fail at once on an error message)."""
    try:
        page.wait_for_function(
            f"document.querySelector('#{kind}-status').innerText.startsWith('done') "
            "|| window.trame.state.get('alert_type') === 'error'", timeout=timeout_s * 1000)
    except Exception as e:
        raise AssertionError(f"{kind} did not end in {timeout_s} s: status {page.inner_text(f'#{kind}-status')!r}, "
                             f"message {page.inner_text('#alert')!r}") from e
    status = page.inner_text(f"#{kind}-status")
    assert status.startswith("done"), f"{kind}: {status} / {page.inner_text('#alert')}"


def download(page, button: str):
    """Click ``button`` and return the Playwright download it starts."""
    with page.expect_download(timeout=60_000) as info:
        page.click(button)
    return info.value


def visible_views(page) -> list:
    """The page's views as the user sees them (layouts not shown are kept hidden in the page)."""
    return [area for area in page.locator(".display-area").all() if area.is_visible()]


def wait_layout(page, views: int, timeout_s: float = 15) -> None:
    """Wait until the page shows ``views`` views. A layout switch reaches the page after a
    server round trip (about 2 s on a loaded 2-core machine): a stroke drawn before then
    lands on the previous layout's views."""
    deadline = time.monotonic() + timeout_s
    while len(visible_views(page)) != views or page.locator(".display-area").count() != views:
        assert time.monotonic() < deadline, f"the page shows {len(visible_views(page))} views, not {views}"
        page.wait_for_timeout(100)


def segment_sample(page) -> None:
    load_sample(page)
    page.click("#segment-btn")
    wait_done(page, "segment")


def trigger(page, name: str, *args):
    """Call a server action as a page's script can (what a modified client could send)."""
    return page.evaluate("([name, args]) => window.trame.trigger(name, args)", [name, list(args)])
