#!/usr/bin/env python
"""MiM Studio responsiveness, measured end to end with real components: a real
``python -m MiMStudio`` server (child process) and real headless Chromium (Playwright).

Figures (each repeat starts a fresh server and a fresh browser page; Chromium itself is
launched once, before the first server, so its start-up is not counted):

1. **Page ready after server start**
   * ``server start``: from spawning ``python -m MiMStudio`` (``--port 0``, a temporary
     ``--models-dir`` and ``--data-dir``, ``--device cpu``) to the line
     ``MiM Studio is ready: open <url>`` on its stdout;
   * ``page interactive``: from ``page.goto(url)`` to the page's controls in the DOM and
     visible (``#load-btn`` and ``#volume-select``) *and* the first image of the axial view
     received and decoded by the browser (its ``<img class="image-display-area">`` showing a
     ``blob:`` frame of non-zero size); the two sub-times are reported as well;
   * their sum.
2. **Load a sample CT** (the first volume offered, ``mim data samples``' ``example_ct_sm``,
   what ``Testing/studio`` loads): from the click on *Load* to the page's "Loaded …" message,
   and to the axial view's first new image.
3. **Slice scroll to new image**: with the mouse over the axial view (as a user's, so the
   view streams at its focus frame rate), the slice is moved ``--scrolls`` times by one slice
   (the slice step of the view, bouncing at the ends of the volume), waiting for the view to
   be quiet in between, either through the view's slice slider state (``--method slider``,
   default: exactly what dragging the slider of the view's gutter sends,
   ``trame.state.set('Red__SliderState__value', v)``) or by a mouse-wheel event over the view
   (``--method wheel``: the RCA event stream to the Slicer interactor). A ``MutationObserver``
   installed in the page timestamps (``performance.now()``) every new frame the view's
   ``<img>`` shows, and a pixel signature of each decoded frame tells when the image really
   changed; reported per scroll: ``first image`` (the first changed frame: the interactive-
   quality JPEG; when a frame is replaced before the browser decoded it, the next one
   counts), ``image decoded`` (that frame decoded, pixels read back) and ``settled`` (the last
   frame of the burst: the still-quality re-encode). ``frame at websocket`` is when the first
   image-sized websocket message after the scroll reached the page (a wrapper of the page's
   ``WebSocket`` timestamps them): up to there it is the server and the network, after it
   the browser. All are timed on the page's own clock (``performance.now()``) from just
   before the state change / wheel event.

Run (no GPU needed; the machine's load is printed with the figures - timings on a busy
machine are noisy)::

    .venv/bin/python Testing/benchmarks/bench_studio.py [--repeats 3] [--scrolls 10]
        [--method slider|wheel] [--json out.json]

The server and the browser are shut down on exit, also on Ctrl+C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLICER_DIR = REPO / "MiMSlicer"
CHROMIUM = os.environ.get("MIM_STUDIO_CHROMIUM", "/usr/bin/chromium")
READY_LINE = "MiM Studio is ready: open "
VIEW_IMG = ".layout-grid-item img.image-display-area"  # the first one is the axial view (Red)
SLIDER_KEY = "Red__SliderState__"  # trame-slicer's slider state of the axial view
SERVER_START_TIMEOUT_S = 180
QUIET_MS = 800  # no new frame of the view for this long: the view is idle
SCROLL_TIMEOUT_MS = 15_000
WS_IMAGE_BYTES = 8_000  # a websocket message this large carries a view's frame

# Installed in the page once the views exist: timestamps every frame the axial view's <img>
# shows, with a signature of its decoded pixels (a hash of a half-size copy).
INSTRUMENT_JS = """
(selector) => {
  const img = document.querySelector(selector);
  if (!img) return false;
  if (window.__bench) return true;
  const canvas = document.createElement('canvas');
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const signature = () => {
    const w = Math.max(1, img.naturalWidth >> 1), h = Math.max(1, img.naturalHeight >> 1);
    canvas.width = w; canvas.height = h;
    ctx.drawImage(img, 0, 0, w, h);
    const data = ctx.getImageData(0, 0, w, h).data;
    let hash = 2166136261 >>> 0;
    for (let i = 0; i < data.length; i += 1) { hash ^= data[i]; hash = Math.imul(hash, 16777619) >>> 0; }
    return `${img.naturalWidth}x${img.naturalHeight}:${hash}`;
  };
  const bench = window.__bench = {frames: [], signature: null, img};
  const record = () => {
    const entry = {t: performance.now(), src: img.src, sig: null, decoded: null};
    bench.frames.push(entry);
    img.decode().then(() => {
      if (img.src !== entry.src) return;  // already replaced by a newer frame
      entry.decoded = performance.now();
      entry.sig = signature();
      bench.signature = entry.sig;
    }).catch(() => {});
  };
  new MutationObserver(record).observe(img, {attributes: true, attributeFilter: ['src']});
  if (img.complete && img.naturalWidth) { bench.signature = signature(); }
  bench.currentSignature = () => (img.complete && img.naturalWidth ? signature() : null);
  return true;
}
"""

# Resolves with the first frame after t0 whose pixels differ from `before` (or null on timeout).
WAIT_CHANGE_JS = """
([t0, before, timeoutMs]) => new Promise(resolve => {
  const b = window.__bench;
  const check = () => {
    const hit = b.frames.find(f => f.t >= t0 && f.sig !== null && f.sig !== before);
    if (hit) return resolve({t: hit.t - t0, decoded: hit.decoded - t0});
    if (performance.now() - t0 > timeoutMs) return resolve(null);
    setTimeout(check, 2);
  };
  check();
})
"""

# Resolves once no frame arrived for quietMs; -> time of the last frame after t0 (or null).
WAIT_QUIET_JS = """
([t0, quietMs, timeoutMs]) => new Promise(resolve => {
  const b = window.__bench;
  const check = () => {
    const now = performance.now();
    const last = b.frames.length ? b.frames[b.frames.length - 1].t : -Infinity;
    if (now - Math.max(last, t0) >= quietMs || now - t0 > timeoutMs) {
      const after = b.frames.filter(f => f.t >= t0);
      return resolve({last: after.length ? after[after.length - 1].t - t0 : null, frames: after.length});
    }
    setTimeout(check, 10);
  };
  check();
})
"""

# Installed before the page's scripts: timestamps every websocket message of image size (the
# RCA frames; state updates are far smaller), to split the scroll latency into "server and
# network" (up to the message) and "browser" (message -> frame shown in the <img>).
WS_JS = """
(() => {
  const Native = window.WebSocket;
  window.__wsBig = [];
  window.WebSocket = function (...args) {
    const ws = new Native(...args);
    ws.addEventListener('message', (e) => {
      const size = e.data && (e.data.byteLength ?? e.data.size ?? e.data.length ?? 0);
      if (size >= %d) window.__wsBig.push(performance.now());
    });
    return ws;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
})();
""" % (WS_IMAGE_BYTES,)

FIRST_IMAGE_JS = """
(selector) => {
  const img = document.querySelector(selector);
  return !!img && img.src.startsWith('blob:') && img.complete && img.naturalWidth > 0;
}
"""


class Interrupted(Exception):
    pass


def _on_sigterm(_signum, _frame):
    raise Interrupted("SIGTERM")


# ---------------------------------------------------------------------------------- server

class Server:
    """``python -m MiMStudio`` in a child process (its own process group, so that it and its
    children are ended together), stdout read by a thread."""

    def __init__(self, models: Path, data: Path, extra: list[str]):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SLICER_DIR),
                                                                          os.environ.get("PYTHONPATH")])),
               "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("DISPLAY", None)
        self.command = [sys.executable, "-m", "MiMStudio", "--host", "127.0.0.1", "--port", "0",
                        "--models-dir", str(models), "--data-dir", str(data), "--device", "cpu", *extra]
        self.lines: list[str] = []
        self._ready: queue.Queue = queue.Queue()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(self.command, cwd=SLICER_DIR, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if READY_LINE in line:
                self._ready.put((time.perf_counter(), line.split(READY_LINE, 1)[1].strip()))
        self._ready.put((time.perf_counter(), None))

    def wait_url(self, timeout: float) -> tuple[float, str]:
        """-> (seconds from spawn to the ready line, url)."""
        try:
            at, url = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"MiM Studio printed no address in {timeout:.0f} s:\n" + "\n".join(self.lines[-30:]))
        if not url:
            raise RuntimeError("MiM Studio exited before it was ready:\n" + "\n".join(self.lines[-30:]))
        return at - self.started, url

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its group (e.g. a job it started)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


# ---------------------------------------------------------------------------------- one run

def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in [0, 100]) of the non-missing values."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    k = (len(values) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def one_repeat(browser, args, index: int, work: Path) -> dict:
    models, data = work / f"models-{index}", work / f"data-{index}"
    models.mkdir()
    data.mkdir()
    result: dict = {"repeat": index}
    server = Server(models, data, args.server_arg)
    context = None
    try:
        result["server_start_s"], url = server.wait_url(SERVER_START_TIMEOUT_S)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.add_init_script(WS_JS)
        page = context.new_page()

        # --- page ready
        t = time.perf_counter()
        page.goto(url, wait_until="commit")
        page.wait_for_selector("#load-btn", state="visible", timeout=120_000)
        page.wait_for_selector("#volume-select", state="visible", timeout=120_000)
        result["page_controls_s"] = time.perf_counter() - t
        page.wait_for_function(FIRST_IMAGE_JS, arg=VIEW_IMG, polling="raf", timeout=120_000)
        result["page_first_image_s"] = time.perf_counter() - t
        result["page_ready_s"] = max(result["page_controls_s"], result["page_first_image_s"])
        result["ready_total_s"] = result["server_start_s"] + result["page_ready_s"]

        # --- load the sample CT
        if not page.evaluate(INSTRUMENT_JS, VIEW_IMG):
            raise RuntimeError("no axial view image in the page")
        page.evaluate(WAIT_QUIET_JS, [0, QUIET_MS, 10_000])
        choice = page.locator("#volume-select").input_value()
        result["volume"] = choice
        before = page.evaluate("window.__bench.currentSignature()")
        t0 = page.evaluate("performance.now()")
        t = time.perf_counter()
        page.click("#load-btn")
        page.wait_for_function("document.querySelector('#alert').innerText.includes('Loaded')", polling="raf",
                               timeout=120_000)
        result["load_message_s"] = time.perf_counter() - t
        changed = page.evaluate(WAIT_CHANGE_JS, [t0, before, 60_000])
        result["load_image_s"] = changed["t"] / 1000.0 if changed else None
        page.evaluate(WAIT_QUIET_JS, [t0, QUIET_MS, 20_000])

        # --- slice scrolls
        box = page.locator(VIEW_IMG).first.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # focus frame rate
        page.evaluate(WAIT_QUIET_JS, [page.evaluate("performance.now()"), QUIET_MS, 10_000])
        lo, hi, step, value = (page.evaluate(f"window.trame.state.get('{SLIDER_KEY}{k}')")
                               for k in ("min_value", "max_value", "step", "value"))
        direction = 1
        scrolls = []
        for i in range(args.scrolls + 1):  # the first one warms up and is not counted
            if args.method == "slider":
                if not lo <= value + direction * step <= hi:
                    direction = -direction
                value = value + direction * step
            before = page.evaluate("window.__bench.currentSignature()")
            if args.method == "slider":
                t0 = page.evaluate(f"(v) => {{ const t = performance.now(); "
                                   f"window.trame.state.set('{SLIDER_KEY}value', v); return t; }}", value)
            else:
                if i and i % 8 == 0:
                    direction = -direction  # stay inside the volume
                t0 = page.evaluate("performance.now()")
                page.mouse.wheel(0, 100 * direction)
            changed = page.evaluate(WAIT_CHANGE_JS, [t0, before, SCROLL_TIMEOUT_MS])
            quiet = page.evaluate(WAIT_QUIET_JS, [t0, QUIET_MS, SCROLL_TIMEOUT_MS])
            ws = page.evaluate("(t0) => { const t = window.__wsBig.find(x => x >= t0); "
                               "return t === undefined ? null : t - t0; }", t0)
            entry = {"first_ws_frame_ms": ws if changed else None,
                     "first_image_ms": changed["t"] if changed else None,
                     "first_decoded_ms": changed["decoded"] if changed else None,
                     "settled_ms": quiet["last"] if changed else None, "frames": quiet["frames"],
                     "slice": value if args.method == "slider" else None}
            if i == 0:
                result["warmup_scroll"] = entry
                if not changed:
                    raise RuntimeError(f"the axial view's image did not change after a {args.method} scroll")
            else:
                scrolls.append(entry)
            if args.verbose:
                print(f"  repeat {index} scroll {i}: {entry}", flush=True)
        result["scrolls"] = scrolls
        result["scroll_missed"] = sum(1 for s in scrolls if s["first_image_ms"] is None)
        return result
    finally:
        if context is not None:
            try:
                context.close()
            except Exception:  # noqa: BLE001 (the browser may be gone after Ctrl+C)
                pass
        server.stop()


# ---------------------------------------------------------------------------------- report

def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None,) * 3
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "loadavg_1_5_15": [round(x, 2) for x in load],
            "python": platform.python_version()}


def summary(runs: list[dict]) -> dict:
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return {"n": 0}
        return {"n": len(values), "median": statistics.median(values), "p90": percentile(values, 90),
                "min": min(values), "max": max(values)}

    out = {k: stats([r.get(k) for r in runs]) for k in
           ("server_start_s", "page_controls_s", "page_first_image_s", "page_ready_s", "ready_total_s",
            "load_message_s", "load_image_s")}
    scrolls = [s for r in runs for s in r.get("scrolls", [])]
    for k in ("first_ws_frame_ms", "first_image_ms", "first_decoded_ms", "settled_ms"):
        out[f"scroll_{k}"] = stats([s[k] for s in scrolls])
    out["scroll_missed"] = sum(r.get("scroll_missed", 0) for r in runs)
    return out


def print_table(s: dict, args, info: dict) -> None:
    rows = [("server start: spawn -> URL printed", "server_start_s", 1, "s"),
            ("page: goto -> controls visible", "page_controls_s", 1, "s"),
            ("page: goto -> first axial image", "page_first_image_s", 1, "s"),
            ("page interactive (max of the two)", "page_ready_s", 1, "s"),
            ("server start + page interactive", "ready_total_s", 1, "s"),
            ("load sample CT: click -> message", "load_message_s", 1, "s"),
            ("load sample CT: click -> new image", "load_image_s", 1, "s"),
            (f"scroll ({args.method}) -> frame at websocket", "scroll_first_ws_frame_ms", 0, "ms"),
            (f"scroll ({args.method}) -> first new image", "scroll_first_image_ms", 0, "ms"),
            (f"scroll ({args.method}) -> image decoded", "scroll_first_decoded_ms", 0, "ms"),
            (f"scroll ({args.method}) -> settled (still)", "scroll_settled_ms", 0, "ms")]
    print()
    print(f"MiM Studio benchmark - {info['cpu']}, {info['cores']} cores, load average "
          f"{info['loadavg_1_5_15']} at the start (a loaded machine gives noisy, pessimistic figures)")
    print(f"{'measure':<40} {'n':>3} {'median':>9} {'p90':>9} {'min':>9} {'max':>9}")
    for label, key, _, unit in rows:
        st = s[key]
        if not st["n"]:
            print(f"{label:<40} {0:>3} {'-':>9}")
            continue
        fmt = (lambda v: f"{v:.2f} s") if unit == "s" else (lambda v: f"{v:.0f} ms")
        print(f"{label:<40} {st['n']:>3} {fmt(st['median']):>9} {fmt(st['p90']):>9} {fmt(st['min']):>9} "
              f"{fmt(st['max']):>9}")
    if s["scroll_missed"]:
        print(f"{s['scroll_missed']} scroll(s) showed no new image within {SCROLL_TIMEOUT_MS / 1000:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fresh server + page runs (default 3)")
    parser.add_argument("--scrolls", type=int, default=10, help="timed slice moves per run (default 10)")
    parser.add_argument("--method", choices=("slider", "wheel"), default="slider",
                        help="how the slice is moved: the view's slider state (default) or a mouse wheel event")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m MiMStudio (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="print every scroll")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.scrolls < 1:
        parser.error("--repeats and --scrolls must be at least 1")
    if not Path(CHROMIUM).is_file():
        parser.error(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MIM_STUDIO_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench-studio-"))
    runs: list[dict] = []
    code = 0
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                for index in range(args.repeats):
                    run = one_repeat(browser, args, index, work)
                    runs.append(run)
                    print(f"repeat {index + 1}/{args.repeats}: server {run['server_start_s']:.2f} s + page "
                          f"{run['page_ready_s']:.2f} s; scrolls (first image, ms): "
                          + " ".join("-" if x["first_image_ms"] is None else f"{x['first_image_ms']:.0f}"
                                     for x in run["scrolls"]), flush=True)
            finally:
                try:
                    browser.close()
                except Exception:  # noqa: BLE001 (gone already after Ctrl+C)
                    pass
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted: server and browser closed", file=sys.stderr)
        code = 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not runs:
        return code or 1
    info["loadavg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    s = summary(runs)
    print_table(s, args, info)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "method": args.method, "repeats": args.repeats,
                                               "scrolls": args.scrolls, "summary": s, "runs": runs}, indent=2))
        print(f"figures written to {args.json}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
