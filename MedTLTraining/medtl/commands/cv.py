"""``medtl cv CONFIG``: k-fold cross-validation, grouped by patient or site."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtl.commands.evaluate import print_summary
from medtl.commands.options import add_common, add_validation_options, run_config


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cv", help="k-fold cross-validation of a run configuration, grouped by patient or site")
    p.add_argument("config", help="run configuration (JSON)")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    p.add_argument(
        "--group-column", help="CSV column kept whole within one fold (default: the config's data.group_column)"
    )
    p.add_argument("--ensemble", action="store_true", help="also join the fold models into one ensemble package")
    p.add_argument("--resume", action="store_true", help="keep finished folds, resume the interrupted one")
    p.add_argument("--output-dir", help="override the configuration's output_dir")
    add_validation_options(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.validation import cross_validate

    cfg = run_config(args)
    events = args.sinks.open(Path(cfg.output_dir) / "events.jsonl")
    result = cross_validate(
        cfg,
        folds=args.folds,
        group_column=args.group_column,
        group_by=args.group_by,
        events=events,
        resume=args.resume,
        ensemble=args.ensemble,
        n_resamples=args.bootstrap,
        tolerance_mm=args.tolerance_mm,
    )
    if args.events != "-":
        print_summary(result["pooled"], Path(cfg.output_dir))
    return 0
