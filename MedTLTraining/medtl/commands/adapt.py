"""``medtl adapt``: AdaBN, a package's BatchNorm statistics re-estimated on target-domain images."""

from __future__ import annotations

import argparse

from medtl.commands.options import add_common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "adapt", help="AdaBN: re-estimate a package's BatchNorm statistics on unlabelled target-domain images"
    )
    p.add_argument("--model", required=True, help="model package directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="CSV of target-domain images (an 'image' column; labels are not used)")
    source.add_argument("--image", action="append", help="a target-domain image (repeat for several)")
    p.add_argument("--out", required=True, help="the adapted model package (a new directory)")
    p.add_argument(
        "--domain", help="for a package with one BatchNorm per domain: the domain to re-estimate, or a new one to add"
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.adaptation.adapt_package import adapt_package
    from medtl.data.dataset import load_cases
    from medtl.train import resolve_device

    events = args.sinks.open()
    images = (
        [c.image for c in load_cases(args.data, require_labels=False, label_files=False)] if args.data else args.image
    )
    out = adapt_package(
        args.model,
        images,
        args.out,
        domain=args.domain,
        device=resolve_device(args.device or "auto", events),
        events=events,
    )
    events.emit("done", package=str(out))
    if args.events != "-":
        print(f"adapted model package written to {out}")
    return 0
