"""``medtl evaluate``: score a package on a labelled CSV, with intervals, fairness and a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtl.commands.options import add_common, add_validation_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a package on a labelled CSV: metrics with intervals, fairness, model card, report"
    )
    p.add_argument("--model", required=True, help="model package directory (or ensemble)")
    p.add_argument("--data", required=True, help="dataset CSV with labels (and columns to group by)")
    p.add_argument("--out", required=True, help="output folder: evaluation.json, model_card.json, report.html")
    add_validation_options(p)
    p.add_argument("--domain-column", help="column naming each case's domain, for a one-BatchNorm-per-site package")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.validation import evaluate_package

    out = Path(args.out)
    events = args.sinks.open(out / "events.jsonl")
    result = evaluate_package(
        args.model,
        args.data,
        out_dir=out,
        group_by=args.group_by,
        domain_column=args.domain_column,
        tolerance_mm=args.tolerance_mm,
        n_resamples=args.bootstrap,
        device=args.device or "auto",
        events=events,
    )
    if args.events != "-":
        print_summary(result["summary"], out)
    return 0


def print_summary(summary: dict, out: Path) -> None:
    """Metrics with their 95 % intervals, fairness warnings and where the report is (also ``medtl cv``'s)."""

    def interval(entry: dict) -> str:
        value = entry.get("mean", entry.get("value"))
        if value is None:
            return "n/a"
        ci = entry.get("ci95")
        return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    print(f"{summary['cases']} case(s)")
    if summary["task"] == "segmentation":
        for name, m in summary["metrics"].items():
            print(f"  {name:16s} Dice {interval(m['dice'])}  HD95 {interval(m['hd95_mm'])} mm")
    else:
        for name, e in summary["metrics"]["classes"].items():
            print(
                f"  {name:16s} AUROC {interval(e['auroc'])}  sensitivity {interval(e['sensitivity'])}  "
                f"specificity {interval(e['specificity'])}"
            )
    for table in summary.get("fairness", []):
        for warning in table.get("warnings", []):
            print(f"  warning: {warning}")
    print(f"report: {out / 'report.html'}; model card: {out / 'model_card.json'}")
