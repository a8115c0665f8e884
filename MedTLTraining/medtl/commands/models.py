"""``medtl models``: list the registered networks."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the registered networks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.models.registry import MODELS

    for name, spec in sorted(MODELS.items()):
        weights = "ImageNet" if spec.imagenet else "file    "
        print(f"{name:22s} {spec.spatial_dims}D {spec.task:14s} {weights}  {spec.description}")
    return 0
