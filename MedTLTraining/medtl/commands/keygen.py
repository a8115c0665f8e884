"""``medtl keygen``: a new Ed25519 key pair for signing packages."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("keygen", help="a new Ed25519 key pair for signing packages (KEY and KEY.pub)")
    p.add_argument("--out", required=True, help="the private key file (written readable by you only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.signing import write_key_pair

    private, public = write_key_pair(args.out)
    print(f"private key {private} (keep it secret), public key {public}")
    return 0
