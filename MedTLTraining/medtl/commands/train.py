"""``medtl train CONFIG``: a run folder with a model package, optionally then one prediction."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from medtl.commands.options import add_common, run_config
from medtl.commands.predict import check_image_outputs, predict
from medtl.errors import ConfigError
from medtl.events import EventSink


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train from a JSON run configuration")
    p.add_argument("config", help="run configuration (JSON)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run that output_dir holds (default: refuse to)"
    )
    p.add_argument("--output-dir", help="override the configuration's output_dir")
    p.add_argument(
        "--predict",
        metavar="IMAGE",
        help="then segment IMAGE with the new package, in the same process (saves a second start-up)",
    )
    p.add_argument("--predict-out", metavar="SEG", help="where --predict writes the segmentation")
    p.add_argument(
        "--predict-uncertainty", metavar="UNC", help="where --predict writes the per-voxel uncertainty (entropy, 0..1)"
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.distributed import process_group
    from medtl.pipeline import run_training
    from medtl.run_folder import run_folder

    cfg = run_config(args)
    if bool(args.predict) != bool(args.predict_out):
        raise ConfigError("--predict IMAGE and --predict-out SEG go together")
    if args.predict:
        check_image_outputs(
            {"--predict-out": args.predict_out, "--predict-uncertainty": args.predict_uncertainty}, [args.predict]
        )
    with process_group(cfg.train.device) as world:  # one of N under torchrun, else the only one
        if world.is_main:
            # Checked, locked and (on failure) cleaned up before and after anything is written.
            folder = run_folder(
                cfg.output_dir, cfg, resume=args.resume, overwrite=args.overwrite, config_file=args.config
            )
        else:
            folder = contextlib.nullcontext()
        with folder:
            events = args.sinks.open(Path(cfg.output_dir) / "events.jsonl") if world.is_main else EventSink()
            metrics = run_training(cfg, events=events, resume=args.resume)
    if args.predict and world.is_main:
        predict(_prediction_args(args, cfg), events)
    events.close()
    if not world.is_main:
        return 0
    if args.events != "-":
        print(f"run written to {cfg.output_dir} (model package: {Path(cfg.output_dir) / 'model'})")
        print(json.dumps({k: v for k, v in metrics.items() if k != "val_cases_dice"}, indent=2))
    return 0


def _prediction_args(args: argparse.Namespace, cfg) -> argparse.Namespace:
    """``--predict``'s options as ``medtl predict`` would take them, for the new package."""
    return argparse.Namespace(
        model=str(Path(cfg.output_dir) / "model"),
        image=args.predict,
        out=args.predict_out,
        probabilities=None,
        uncertainty=args.predict_uncertainty,
        uncertainty_kind="entropy",
        domain=None,
        gradcam=None,
        gradcam_class=None,
        device=args.device or cfg.train.device,
        events=args.events,
    )
