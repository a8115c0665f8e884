"""``medtl demo``: fine-tune on a few slices of a real liver CT and segment the rest."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtl.commands.options import add_common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="fine-tune on a few slices of a real liver CT and segment the rest")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--slices", type=int, default=8, help="labelled axial slices K (default: 8)")
    p.add_argument("--epochs", type=int, default=12, help="epochs of 20 steps (default: 12)")
    p.add_argument("--compare-scratch", action="store_true", help="also train from random weights, several seeds")
    p.add_argument("--seeds", type=int, default=3, help="seeds for --compare-scratch (default: 3)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.demo import run_demo

    out = Path(args.out)
    events = args.sinks.open(out / "events.jsonl")
    metrics = run_demo(
        out,
        k=args.slices,
        epochs=args.epochs,
        device=args.device or "auto",
        compare_scratch=args.compare_scratch,
        seeds=args.seeds,
        events=events,
    )
    events.close()
    print_demo(metrics, out)
    return 0


def print_demo(metrics: dict, out: Path) -> None:
    d = metrics["dice_held_out"]
    print(
        f"\nDice on the {metrics['evaluated_slices']} slices not used for training "
        f"({len(metrics['labelled_slices'])} labelled): liver {d['liver']:.3f}, tumour {d['tumour']:.3f}, "
        f"liver+tumour {d['liver_and_tumour']:.3f}"
    )
    if "comparison" in metrics:
        for kind, scores in metrics["comparison"].items():
            text = ", ".join(f"{n} {s['mean']:.3f} ± {s['sd']:.3f}" for n, s in scores.items())
            print(f"  {kind:10s} (n={len(scores['liver']['values'])} seeds): {text}")
    print(f"spacing: assumed {metrics['assumed_spacing_mm']} mm (the demo data carries none)")
    print(f"time: {metrics['total_seconds']:.0f} s on {metrics['device']}")
    print(f"outputs in {out}: prediction.seg.nrrd, image.nrrd, reference.seg.nrrd, metrics.json, demo.png, model/")
