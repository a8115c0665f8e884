"""``medtl explain``: Grad-CAM, where the network looked, as a volume on the image's grid."""

from __future__ import annotations

import argparse

from medtl.commands.options import add_common
from medtl.commands.predict import check_image_outputs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="Grad-CAM: where the network looked, as a volume on the image's grid")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--image", required=True, help="image file or DICOM directory")
    p.add_argument("--out", required=True, help="the map (float, 0..1, the image's geometry): .nrrd, .nii.gz ...")
    p.add_argument(
        "--class",
        dest="class_index",
        type=int,
        help="segmentation: the label value (default 1); classification: the class index (default: predicted)",
    )
    p.add_argument("--layer", help="the layer to explain (dotted module name; default: see medtl.explain)")
    p.add_argument("--domain", help="the image's domain (site), for a package with one BatchNorm per domain")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.any_package import load_package
    from medtl.data.io import read_image, write_image
    from medtl.explain import gradcam_image
    from medtl.train import resolve_device

    check_image_outputs({"--out": args.out}, [args.image, args.model])
    events = args.sinks.open()
    cam = gradcam_image(
        load_package(args.model),
        read_image(args.image),
        class_index=args.class_index,
        target_layer=args.layer,
        device=resolve_device(args.device or "auto", events),
        domain=args.domain,
        events=events,
    )
    write_image(cam, args.out)
    events.emit("done", output=str(args.out))
    if args.events != "-":
        print(f"Grad-CAM written to {args.out}")
    return 0
