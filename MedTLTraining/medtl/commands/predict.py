"""``medtl predict``: segment (or classify) an image with a model package."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtl.commands.options import add_common
from medtl.errors import DataError
from medtl.events import EventSink


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="segment (or classify) an image with a model package")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--image", required=True, help="image file or DICOM directory")
    p.add_argument(
        "--out", required=True, help="output segmentation (.seg.nrrd, .nrrd, .nii.gz ...); a classifier writes JSON"
    )
    p.add_argument("--probabilities", help="also write the foreground probability volume (0..1) here")
    p.add_argument("--uncertainty", help="also write an uncertainty volume (0..1) here")
    p.add_argument(
        "--uncertainty-kind",
        choices=["entropy", "variance", "mutual_information"],
        default="entropy",
        help="entropy of the class probabilities (default); for an ensemble also the variance across its "
        "members or their mutual information (their disagreement)",
    )
    p.add_argument("--domain", help="the image's domain (site), for a package with one BatchNorm per domain")
    p.add_argument("--gradcam", help="also write the Grad-CAM map (0..1) of label 1 (or --gradcam-class) here")
    p.add_argument("--gradcam-class", type=int, help="the label value (or class index) for --gradcam")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return predict(args, args.sinks.open())


def predict(args: argparse.Namespace, events: EventSink) -> int:
    """``medtl predict``'s work, also ``medtl train --predict``'s with the new package."""
    from medtl.any_package import load_package
    from medtl.train import resolve_device

    package = load_package(args.model)
    events.emit("message", message=f"model package {args.model}: {getattr(package, 'signature', 'unsigned')}")
    image = _checked_input(args, package)
    device = resolve_device(args.device or "auto", events)
    # Start-up (imports, package, image) ends here; the rest is prediction.
    events.emit("start", label="predict", device=str(device), size=list(image.GetSize()))
    if package.config.is_classification:
        return _classify(args, package, image, device, events)
    return _segment(args, package, image, device, events)


def _checked_input(args: argparse.Namespace, package):
    """The image, read and checked, once every output is known to be writable and to have room."""
    import numpy as np

    from medtl.data.checks import check_free_space, checked_image
    from medtl.data.io import read_image

    outputs = {"--out": args.out, "--probabilities": args.probabilities, "--uncertainty": args.uncertainty}
    outputs["--gradcam"] = args.gradcam
    # A classifier writes its --out as JSON: only the image outputs need an image writer.
    check_image_outputs(outputs, [args.image, args.model], json_out=package.config.is_classification)
    image = read_image(args.image)
    image = checked_image(
        image,
        args.image,
        policy=package.config.preprocessing.nan_policy,
        scalar_3d=not package.config.is_classification,
    )
    # Labels are one byte a voxel, probability maps four; NRRD and NIfTI add little beyond that.
    voxels = int(np.prod(image.GetSize()))
    need = sum(voxels * (1 if option == "--out" else 4) for option, path in outputs.items() if path)
    check_free_space(Path(args.out), need, what="the prediction")
    return image


def _classify(args: argparse.Namespace, package, image, device, events: EventSink) -> int:
    import json

    from medtl.any_package import classify_image
    from medtl.data.io import atomic_write_text

    if args.probabilities or args.uncertainty:
        raise DataError(
            "--probabilities and --uncertainty are volumes of a segmentation model; a classifier "
            "writes its class probabilities to --out"
        )
    probabilities = classify_image(package, image, device=device, domain=args.domain)
    if args.gradcam:
        _write_gradcam(args, package, image, device)
    atomic_write_text(args.out, json.dumps({"image": Path(args.image).name, "probabilities": probabilities}, indent=2))
    events.emit("done", output=str(args.out), probabilities=probabilities)
    return 0


def _segment(args: argparse.Namespace, package, image, device, events: EventSink) -> int:
    import numpy as np

    from medtl.data.io import array_like, write_image

    member_probs = None
    if hasattr(package, "members"):
        from medtl.ensemble import segment_members

        labels, probs, member_probs = segment_members(package, image, device=device, events=events, domain=args.domain)
    else:
        if args.uncertainty and args.uncertainty_kind != "entropy":
            raise DataError(
                f"--uncertainty-kind {args.uncertainty_kind} needs an ensemble package; one model has entropy"
            )
        from medtl.any_package import segment_image

        labels, probs = segment_image(package, image, device=device, events=events, domain=args.domain)
    out = Path(args.out)
    _write_labels(labels, image, out, package)
    if args.probabilities:
        write_image(array_like((1.0 - probs[0]).astype(np.float32), image), args.probabilities)
    if args.uncertainty:
        write_image(array_like(_uncertainty(args, probs, member_probs), image), args.uncertainty)
    if args.gradcam:
        _write_gradcam(args, package, image, device)
    events.emit("done", output=str(out))
    if args.events != "-":
        print(f"segmentation written to {out}")
    return 0


def _write_labels(labels, image, out: Path, package) -> None:
    """A ``.seg.nrrd`` keeps the segment names and colours; other formats hold the label map only."""
    from medtl.data.io import write_image, write_segmentation

    if out.name.endswith(".seg.nrrd"):
        import SimpleITK as sitk

        write_segmentation(sitk.GetArrayFromImage(labels), image, out, package.segments())
    else:
        write_image(labels, out)


def _uncertainty(args: argparse.Namespace, probs, member_probs):
    if member_probs is not None:
        from medtl.ensemble import ensemble_uncertainty

        return ensemble_uncertainty(member_probs, args.uncertainty_kind)
    from medtl.infer import normalised_entropy

    return normalised_entropy(probs)


def _write_gradcam(args: argparse.Namespace, package, image, device) -> None:
    from medtl.data.io import write_image
    from medtl.explain import gradcam_image

    cam = gradcam_image(package, image, class_index=args.gradcam_class, device=device, domain=args.domain)
    write_image(cam, args.gradcam)


def check_image_outputs(outputs: dict[str, str | None], inputs: list[str], *, json_out: bool = False) -> None:
    """Before any work: each image output has a writer for its extension and destroys no input;
    with ``json_out`` the --out is a JSON file, checked against the inputs only."""
    from medtl.data.checks import check_image_output, check_not_inputs

    check_not_inputs(outputs, inputs)
    for option, path in outputs.items():
        if path and not (json_out and option == "--out"):
            check_image_output(path, option=option)
