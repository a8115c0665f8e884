"""Options that several commands share, and the run configuration as the command line amends it."""

from __future__ import annotations

import argparse

from medtl.stop import STOP_FILE_ENV


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default=None, help="where to compute (default: auto)"
    )
    p.add_argument("--events", metavar="PATH", help="JSON-lines progress: '-' for stdout, or a file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-file", metavar="PATH", help=f"stop at the next step once PATH exists (or ${STOP_FILE_ENV})")


def add_validation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="COL",
        help="report metrics per value of a CSV column (sex, age_group, site, scanner); repeat for several",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0: none)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance in mm (default: 2)")


def run_config(args: argparse.Namespace):
    """The run configuration file with the command line's --output-dir and --device on top."""
    from medtl.config import RunConfig

    cfg = RunConfig.load(args.config)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.device:
        cfg.train.device = args.device
    return cfg
