"""``medtl export``: ONNX and TorchScript files with their preprocessing, checked against PyTorch."""

from __future__ import annotations

import argparse

from medtl.commands.options import add_common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="ONNX and TorchScript files with their preprocessing, checked against PyTorch"
    )
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--out", required=True, help="a new folder for the exported files")
    p.add_argument(
        "--format", action="append", choices=["onnx", "torchscript"], help="repeat for several (default: both)"
    )
    p.add_argument("--image", help="a real image for the parity check (default: a synthetic input)")
    p.add_argument("--domain", help="the domain to export, for a package with one BatchNorm per domain")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.data.io import read_image
    from medtl.export import FORMATS, export_package

    events = args.sinks.open()
    report = export_package(
        args.model,
        args.out,
        formats=args.format or FORMATS,
        image=read_image(args.image) if args.image else None,
        domain=args.domain,
        opset=args.opset,
        events=events,
    )
    events.emit("done", out_dir=str(args.out), report=report)
    if args.events != "-":
        print_export_report(report, args.out)
    return 0


def print_export_report(report: dict, out: str) -> None:
    for entry in report["formats"].values():
        agreement = (
            ", ".join(f"Dice {n} {d:.4f}" for n, d in entry["dice"].items())
            if "dice" in entry
            else f"decisions agree: {entry['decisions_agree']}"
        )
        print(f"{entry['file']}: parity max |difference| {entry['max_abs_diff']:.1e}, {agreement or 'no labels'}")
    print(f"exported to {out} (preprocessing.json, export_report.json); check input: {report['check_input']}")
