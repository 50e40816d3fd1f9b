"""``mim models list|add|remove|export|show``: the local model library (:mod:`mimcore.bundles.library`).

Every sub-command takes ``--library DIR`` (default ``$MIM_MODELS_DIR``, else the user data
folder); ``list`` and ``show`` take ``--json`` for machine-readable output (the Slicer
module reads it). ``add`` takes ``--progress bar|json|none`` like the other commands:
``json`` prints ``start``, download ``progress`` (stage ``download``, step/total in
bytes), ``done`` and ``error`` events (:mod:`mimcore.events`); ``--quiet`` is
``--progress none``; ``--json`` alone prints only the result (``done``) and a failure
(``error``) as events, as it always did.
"""

from __future__ import annotations

import argparse
import json
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``models`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "models", help="Manage the local model library (list, add, remove, export, show).",
        description="The local model library: trained models (model bundles: model.json + "
                    "weights.safetensors) that every command can use by name.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--library", metavar="DIR",
                        help="Library folder (default: $MIM_MODELS_DIR, else the user data folder).")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", parents=[common], help="List the models in the library.")
    p.add_argument("--json", action="store_true", help="Print a JSON list instead of a table.")
    p.set_defaults(func=_list)

    p = sub.add_parser("add", parents=[common], help="Add a model bundle to the library.",
                       description="Copy a model bundle (folder, model.json or .zip) into the library, or "
                                   "download a model listed in a registry. The copy is verified (sha256) first.")
    p.add_argument("source", metavar="SOURCE", help="Bundle folder, model.json, .zip, or a model name in --registry.")
    p.add_argument("--name", help="Library name (default: the registry name or the model's name).")
    p.add_argument("--registry", metavar="FILE_OR_URL",
                   help="Registry JSON to look SOURCE up in (default: $MIM_MODEL_REGISTRY).")
    p.add_argument("--overwrite", action="store_true", help="Replace a model of the same name.")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                       help="Download progress: bar (default, on stderr), json (one event per line on stdout: "
                            "start, progress in bytes, done, error) or none.")
    shown.add_argument("--quiet", action="store_true", help="No download progress bar (--progress none).")
    p.add_argument("--json", action="store_true",
                   help="Print the result as one JSON line {\"event\": \"done\", \"name\", \"path\"} (for programs); "
                        "with --progress json the download's events come too.")
    p.set_defaults(func=_add)

    p = sub.add_parser("remove", parents=[common], help="Delete a model from the library.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_remove)

    p = sub.add_parser("export", parents=[common], help="Export a model as a .zip, a bundle folder or a MONAI bundle.")
    p.add_argument("name", metavar="NAME", help="Library name (or a bundle path).")
    p.add_argument("dest", metavar="DEST", help="Target file/folder (inside it, if it is an existing folder).")
    p.add_argument("--format", dest="fmt", choices=("zip", "dir", "monai"), default="zip",
                   help="zip (default): one .zip file; dir: a bundle folder; monai: a MONAI bundle folder "
                        "(runs with `python -m monai.bundle run`, which needs fire and pytorch-ignite).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing DEST.")
    p.set_defaults(func=_export)

    p = sub.add_parser("show", parents=[common], help="Show a model's labels, preprocessing and provenance.")
    p.add_argument("name", metavar="NAME", help="Library name (or a bundle path).")
    p.add_argument("--json", action="store_true", help="Print model.json as it is.")
    p.set_defaults(func=_show)
    return parser


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    from mimcore.bundles.library import library_dir, list_models

    models = list_models(args.library)
    if args.json:
        print(json.dumps(models, indent=1))
        return 0
    lib = library_dir(args.library)
    if not models:
        print(f"No models in {lib}. Add one with: mim models add SOURCE")
        return 0
    rows = []
    for m in models:
        if m["error"]:
            rows.append([m["name"], "BROKEN", "", "", human_size(m["size"]), m["error"]])
        else:
            labels = ", ".join(m["label_names"])
            rows.append([m["name"], m["architecture"] or "", m["preset"] or "", str(m["labels"]),
                         human_size(m["size"]), labels if len(labels) <= 60 else labels[:57] + "..."])
    print(table(rows, ["NAME", "ARCHITECTURE", "PRESET", "LABELS", "SIZE", "LABEL NAMES"]))
    print(f"\n{len(models)} model(s) in {lib}")
    return 0


class DownloadEvents:
    """``on_progress`` of a download that emits ``progress`` events (stage ``download``,
    ``step``/``total`` in bytes, ``total`` null when unknown, ``eta_s`` null until known).

    The first call and the last byte are always reported; in between, an event goes out
    when ``interval`` seconds have passed or the download grew by ``min_fraction`` of its
    size (``min_bytes`` when the size is unknown) since the last one: a fast download
    sends a few hundred lines at most, a slow or stalling one still shows each chunk.
    The rate (for the ETA) counts only the bytes of this run, not those of a resumed part.
    """

    def __init__(self, interval: float = 0.25, min_fraction: float = 0.01, min_bytes: int = 1 << 20,
                 clock=time.monotonic):
        self.interval, self.min_fraction, self.min_bytes, self.clock = interval, min_fraction, min_bytes, clock
        self.first: tuple[float, int] | None = None  # (time, bytes) of the first call
        self.last: tuple[float, int] | None = None  # (time, bytes) of the last event sent

    def __call__(self, done: int, total: int | None) -> None:
        from mimcore import events

        now = self.clock()
        if self.first is None or done < self.first[1]:  # a new transfer (a restarted download starts at 0)
            self.first, self.last = (now, done), None
        if self.last is not None and done != total:
            since, grown = now - self.last[0], done - self.last[1]
            step = max(1, int(total * self.min_fraction)) if total else self.min_bytes
            if grown <= 0 or (since < self.interval and grown < step):
                return
        self.last = (now, done)
        t0, b0 = self.first
        eta = None
        if total and done > b0 and now > t0:
            eta = round(max(0, total - done) / ((done - b0) / (now - t0)), 1)
        events.emit("progress", stage="download", step=done, total=total, eta_s=eta, metrics={})


def _add(args: argparse.Namespace) -> int:
    from mimcore import events
    from mimcore.bundles.library import add_model, library_dir

    mode = "none" if args.quiet else args.progress
    if mode == "json":
        events.emit("start", stage="add", source=str(args.source), library=str(library_dir(args.library)),
                    message=f"adding {args.source} to the model library")
    path = add_model(args.source, name=args.name, registry=args.registry, progress=mode == "bar",
                     overwrite=args.overwrite, library=args.library,
                     on_progress=DownloadEvents() if mode == "json" else None)
    if args.json or mode == "json":
        events.emit("done", name=path.name, path=str(path))
    else:
        print(f"Added {path.name!r} to the model library: {path}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from mimcore.bundles.library import remove_model

    path = remove_model(args.name, library=args.library)
    print(f"Removed {args.name!r} ({path})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mimcore.bundles.library import export_model

    path = export_model(args.name, args.dest, fmt=args.fmt, library=args.library, overwrite=args.overwrite)
    print(f"Exported {args.name!r} ({args.fmt}) to {path}")
    if args.fmt == "monai":
        from mimcore.bundles.monai_export import RUNNER_PACKAGES

        pins = " ".join(f"{name}=={version}" for name, version in RUNNER_PACKAGES.items())
        print(f"Run it from any folder (needs: pip install {pins}):\n"
              f"  python -m monai.bundle run --config_file {path / 'configs' / 'inference.json'} "
              "--dataset_dir CT_FOLDER --output_dir OUT_FOLDER")
    return 0


def _show(args: argparse.Namespace) -> int:
    from mimcore.bundles.library import get_model

    bundle = get_model(args.name, library=args.library)
    d = bundle.description
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    arch = d["architecture"]
    print(f"{d['name']}  ({bundle.path})")
    print(f"architecture: {arch.get('kind')}" + (f", preset {arch['preset']}" if arch.get("preset") else ""))
    print(f"weights: {d['weights']['file']}, {human_size(d['weights']['size'])}, sha256 {d['weights']['sha256']}")
    print(f"\nlabels ({len(d['labels'])}):")
    print(table([[str(lb["value"]), lb["name"], "#%02x%02x%02x" % tuple(lb["color"])] for lb in d["labels"]],
                ["VALUE", "NAME", "COLOR"]))
    for section in ("preprocessing", "inference", "training"):
        print(f"\n{section}:" + ("" if d[section] else " (none)"))
        for key, value in d[section].items():
            print(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0
