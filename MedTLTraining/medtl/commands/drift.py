"""``medtl drift``: do new images still look like the training images?"""

from __future__ import annotations

import argparse
from pathlib import Path

from medtl.commands.options import add_common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "drift", help="do new images still look like the training images? (statistics and features)"
    )
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--data", required=True, help="CSV of the new images (an 'image' column)")
    p.add_argument("--out", required=True, help="output folder: drift.json, drift.png")
    p.add_argument("--reference", help="CSV of the training images, for a package that holds no profile of them")
    p.add_argument("--alpha", type=float, default=0.05, help="false discovery rate of the tests (default: 0.05)")
    p.add_argument("--fail-on-drift", action="store_true", help="exit with status 1 when drift is found (for cron)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.drift import run_drift
    from medtl.train import resolve_device

    events = args.sinks.open()
    result = run_drift(
        args.model,
        args.data,
        reference_csv=args.reference,
        out_dir=args.out,
        alpha=args.alpha,
        device=resolve_device(args.device or "auto", events),
        events=events,
    )
    events.emit("done", out_dir=str(args.out), drift=result["drift"], summary=result["summary"])
    if args.events != "-":
        print(result["summary"])
        for image in result["images"]:
            if image["flags"]:
                print(f"  CSV row {image['row']}: {', '.join(image['flags'])}")
        print(f"details: {Path(args.out) / 'drift.json'}, {Path(args.out) / 'drift.png'}")
    return 1 if result["drift"] and args.fail_on_drift else 0
