"""``mim data ...``: data commands (``mim data samples`` fetches the sample volumes)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` (with its ``samples`` subcommand) on an argparse subparsers object."""
    parser = subparsers.add_parser("data", help="Sample data and datasets.",
                                   description="Sample data and datasets.")
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    samples = commands.add_parser(
        "samples",
        help="Fetch the small real CT sample volumes and print their datalist path.",
        description="Fetch verified sample CT volumes (from the totalsegmentator 2.18.0 source archive, "
                    "via pip) into a cache folder and print the path of their datalist.json. Does nothing "
                    "when they are already there.",
    )
    samples.add_argument("--cache-dir", metavar="DIR",
                         help="Cache folder (default: $MIM_DATA_DIR, else the per-user cache folder).")
    samples.add_argument("--from-archive", metavar="FILE",
                         help="Use a local copy of totalsegmentator-2.18.0.tar.gz instead of downloading.")
    samples.add_argument("--quiet", action="store_true", help="Print only the datalist path.")
    samples.set_defaults(func=run_samples)
    return parser


def run_samples(args: argparse.Namespace) -> int:
    """Handler of ``mim data samples``: prints the datalist path on stdout; returns 0."""
    from mimcore.data.samples import fetch_samples  # imported here to keep `mim --help` fast

    print(fetch_samples(cache_dir=args.cache_dir, quiet=args.quiet, from_archive=args.from_archive))
    return 0
