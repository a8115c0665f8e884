"""``medtl serve``: the warm engine the Slicer module keeps for a session (see :mod:`medtl.serve`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="the warm engine: answer learn/view/good_enough/cancel requests (JSON lines) with events on stdout, "
        "keeping the network and the volume between rounds (what the Slicer module runs)",
    )
    p.add_argument(
        "--requests", metavar="DIR", help="read requests from files in this folder instead of stdin (ends when it goes)"
    )
    p.add_argument(
        "--idle-exit-s",
        type=float,
        default=1800.0,
        help="exit after this many seconds without a request (default 1800)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.serve import folder_lines, serve

    requests = folder_lines(Path(args.requests)) if args.requests else sys.stdin
    return serve(requests, sys.stdout, idle_exit_s=args.idle_exit_s)
