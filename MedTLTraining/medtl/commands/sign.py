"""``medtl sign``: sign a package's manifest."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sign", help="sign a package's manifest (tamper evidence for every file it lists)")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM), from 'medtl keygen' or openssl")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.signing import sign_package

    record = sign_package(args.model, args.key)
    print(f"signed {args.model} with key {record['key_fingerprint']}")
    return 0
