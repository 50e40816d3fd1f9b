"""``python -m MiMStudio [--host H] [--port P] [--data-dir D ...] [--models-dir M] [--token T]``.

Starts the server (see :mod:`MiMStudio.config` for every option) and prints the address
to open, with the access token in it when one is required. Stop it with Ctrl+C; running
jobs are cancelled and uploads removed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _prepare_environment() -> None:
    """MiMSlicerLib importable (it sits beside this package), and VTK rendering offscreen
    through EGL where there is no display (a server)."""
    here = Path(__file__).resolve().parents[1]
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def main(argv: list[str] | None = None) -> int:
    _prepare_environment()
    from MiMStudio.config import config_from_args

    config = config_from_args(argv)
    from MiMStudio.app import StudioApp
    from MiMStudio.ui import build_ui

    app = StudioApp(config)
    build_ui(app)

    def announce(**_kwargs):
        port = app.server.port
        print(f"MiM Studio is ready: open {config.url(port)}", flush=True)
        if config.requires_token:
            print("An access token is required; it is in the address above. Share it only with your users.",
                  flush=True)

    app.server.controller.on_server_ready.add(announce)
    sys.argv = sys.argv[:1]  # trame parses sys.argv too: our options are already read
    try:
        app.server.start(host=config.host, port=config.port, open_browser=False, show_connection_info=False,
                         timeout=0)
    finally:
        app.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
