"""MiM Studio's settings: where it listens, who may connect, which folders a client may use.

Safety rules (issue 14) live here as data, enforced by :mod:`MiMStudio.access`:

* it listens on ``127.0.0.1`` unless told otherwise;
* bound to any other address it requires an access token on every connection: a random
  one (printed at start) unless one is given (``--token`` or ``$MIM_STUDIO_TOKEN``);
* a client reads only from the data folders and the sample CTs, reads and writes models
  only in the model library, and uploads (size-limited) go to a private temporary
  folder of this server.
"""

from __future__ import annotations

import argparse
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_MB = 512.0
ENV_TOKEN = "MIM_STUDIO_TOKEN"
PUBLIC_SECRET = "wslink-secret"  # what a page sends when no token is in its URL


@dataclass
class StudioConfig:
    """host, port: where to listen. data_dirs: server folders whose volumes and checkpoints a
    client may open. models_dir: the model library (None: mimcore's default). token: None
    unless required (see :func:`resolve_token`). max_upload_mb: largest accepted upload.
    samples: offer the sample CTs (``mim data samples``). device: for every job.
    env: extra environment variables for the child jobs."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dirs: list[Path] = field(default_factory=list)
    models_dir: Path | None = None
    token: str | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    samples: bool = True
    device: str = "auto"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def requires_token(self) -> bool:
        return self.token is not None

    def url(self, port: int | None = None) -> str:
        """The address to open (with the token when one is required)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        query = f"?secret={self.token}" if self.token else ""
        return f"http://{host}:{port or self.port}/{query}"


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to require: the given one; else a random one when ``host`` is not a local
    address; else None (a localhost server trusts its machine's users, like Jupyter without
    a password would not - so pass ``--token`` on a shared machine)."""
    if token:
        if len(token) < 16:
            raise ValueError("An access token needs at least 16 characters.")
        return token
    if host not in LOCAL_HOSTS:
        return secrets.token_urlsafe(24)
    return None


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m MiMStudio",
                                     description="MiM Studio: segment, preview and fine-tune in a web browser.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other requires an access token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--data-dir", action="append", default=[], metavar="FOLDER",
                        help="server folder of volumes and pre-training runs a client may open (repeatable)")
    parser.add_argument("--models-dir", default=None, help="model library folder (default: mimcore's)")
    parser.add_argument("--token", default=os.environ.get(ENV_TOKEN) or None,
                        help=f"access token to require (default ${ENV_TOKEN}; random when --host is not local)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--no-samples", action="store_true", help="do not offer the sample CTs")
    parser.add_argument("--device", default="auto", help="device of the jobs: auto, cpu, cuda, cuda:1 ...")
    return parser


def config_from_args(argv: list[str] | None = None) -> StudioConfig:
    args = argument_parser().parse_args(argv)
    try:
        token = resolve_token(args.host, args.token)
    except ValueError as e:
        argument_parser().error(str(e))
    data_dirs = []
    for folder in args.data_dir:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            argument_parser().error(f"--data-dir {folder}: no such folder")
        data_dirs.append(path)
    models = Path(args.models_dir).expanduser().resolve() if args.models_dir else None
    if args.max_upload_mb <= 0:
        argument_parser().error("--max-upload-mb must be positive")
    return StudioConfig(host=args.host, port=args.port, data_dirs=data_dirs, models_dir=models, token=token,
                        max_upload_mb=args.max_upload_mb, samples=not args.no_samples, device=args.device)
