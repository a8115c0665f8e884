"""``medtl device``: where a run would compute, and why not on the GPU (JSON)."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("device", help="say where a run would compute, and why not on the GPU (JSON)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.train import device_report

    print(json.dumps(device_report(args.device)))
    return 0
