"""``medtl ensemble``: join model packages into one ensemble package."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ensemble", help="join model packages (backbones, CV folds) into one ensemble package")
    p.add_argument("--model", action="append", required=True, help="a member package (repeat, at least two)")
    p.add_argument("--out", required=True, help="the ensemble package (a new directory)")
    p.add_argument("--combine", choices=["mean", "vote"], default="mean", help="mean probability (default) or vote")
    p.add_argument("--weight", action="append", type=float, help="one weight per member, in order (default: equal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.ensemble import save_ensemble

    out = save_ensemble(args.out, args.model, combine=args.combine, weights=args.weight)
    print(f"ensemble of {len(args.model)} packages written to {out}")
    return 0
