"""``medtl info PKG``: describe a model package and its signature."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a model package")
    p.add_argument("package")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.any_package import describe
    from medtl.signing import verify_package

    print(describe(args.package))
    print(f"  signature:     {verify_package(args.package)}")
    return 0
