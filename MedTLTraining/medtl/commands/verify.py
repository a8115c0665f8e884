"""``medtl verify``: check a package's files and signature."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check a package's files and signature")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--public-key", help="require a signature by this Ed25519 public key (PEM)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.signing import check_files, verify_package

    status = verify_package(args.model, args.public_key)
    check_files(Path(args.model))
    print(f"{args.model}: files match the manifest; {status}")
    return 0
