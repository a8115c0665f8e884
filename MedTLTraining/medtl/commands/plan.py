"""``medtl plan CONFIG``: the pre-flight plan of a training run: how long, how much memory, which
micro-batch and patch fit, from a few timed steps (nothing is written)."""

from __future__ import annotations

import argparse

from medtl.commands.options import add_common, run_config


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="say how long a training run will take and how much memory it needs, from a few timed steps"
    )
    p.add_argument("config", help="run configuration (JSON)")
    p.add_argument("--output-dir", help="override the configuration's output_dir (nothing is written there)")
    p.add_argument("--budget-s", type=float, help="plan a run of this many seconds instead of the configured epochs")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.case_data import training_items
    from medtl.data.dataset import load_cases
    from medtl.devices import resolve_device
    from medtl.errors import DataError
    from medtl.planner import plan_run
    from medtl.training.setup import new_network
    from medtl.validation_split import split_cases

    cfg = run_config(args)
    if not cfg.data.csv:
        raise DataError("config field 'data.csv' is empty: name the dataset CSV")
    events = args.sinks.open()
    cases = load_cases(cfg.data.csv, label_files=not cfg.is_classification)
    train_cases, _val = split_cases(cases, cfg.data.val_fraction, cfg.train.seed, cfg.data.group_column)
    device = resolve_device(cfg.train.device, events)
    model = new_network(cfg, events).to(device)
    plan = plan_run(cfg, training_items(train_cases, cfg), model, device=device, budget_s=args.budget_s, events=events)
    events.close()
    if args.events != "-":
        print(plan.summary())
    return 0
