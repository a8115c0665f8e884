"""``medtl demo``: fine-tune an ImageNet U-Net on a few labelled slices of a real CT.

LiTS case 117 (liver and tumour). K axial slices spread through the volume are labelled; the
network trains on those (feature extraction, then fine-tuning at a 10× smaller encoder learning
rate), predicts every slice, and is scored on the slices it never saw. ``compare_scratch`` trains
the same network from random weights with the same step budget, over several seeds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtl.config import RunConfig
from medtl.data.io import atomic_write_text, write_image, write_segmentation
from medtl.data.lits_demo import ASSUMED_SPACING_MM, LABEL_NAMES, load_demo_case
from medtl.data.slices import slice_items, spread_slices
from medtl.events import EventSink
from medtl.package import label_table, preprocess, save_package
from medtl.train import dice_per_class, fit, resolve_device, summarize


def demo_config(*, epochs: int = 12, device: str = "auto", seed: int = 0, pretrained: bool = True) -> RunConfig:
    """The demo's embedded default configuration (also what ``medtl demo --print-config`` shows)."""
    return RunConfig.from_dict(
        {
            "task": "segmentation_2d",
            "data": {"label_names": LABEL_NAMES},
            "preprocessing": {"preset": "ct_abdomen", "patch_size": [128, 128]},
            "model": {"name": "unet_mobilenet_v2", "pretrained": "imagenet" if pretrained else "none"},
            "strategy": (
                {
                    "name": "feature_extraction_then_finetune",
                    "feature_extraction_epochs": max(1, epochs // 3),
                    "encoder_lr_factor": 0.1,
                }
                if pretrained
                # From random weights there is nothing to extract features with: all layers train alike.
                else {"name": "full_finetune", "encoder_lr_factor": 1.0}
            ),
            "optim": {"lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 10},
            "train": {"epochs": epochs, "steps_per_epoch": 20, "batch_size": 8, "seed": seed, "device": device},
            "augmentation": "light",
            "loss": "dice_ce",
        }
    )


def _scores(pred: np.ndarray, truth: np.ndarray, held_out: list[int]) -> dict[str, float]:
    p, t = pred[held_out], truth[held_out]
    per_class = dice_per_class(p, t, [1, 2])
    whole = dice_per_class((p > 0).astype(np.int64), (t > 0).astype(np.int64), [1])[1]
    return {"liver": per_class[1], "tumour": per_class[2], "liver_and_tumour": whole}


@dataclass
class _DemoCase:
    """The demo CT as the network sees it, with the slices that train and the slices that score."""

    image: Any  # SimpleITK.Image
    truth: np.ndarray
    volume: np.ndarray
    labelled: list[int]
    held_out: list[int]


def _load_case(cfg: RunConfig, k: int) -> _DemoCase:
    import SimpleITK as sitk

    image, label_image = load_demo_case()
    volume = preprocess(image, cfg)
    labelled = spread_slices(range(volume.shape[0]), k)
    return _DemoCase(
        image=image,
        truth=sitk.GetArrayFromImage(label_image).astype(np.int64),
        volume=volume,
        labelled=labelled,
        held_out=[z for z in range(volume.shape[0]) if z not in labelled],
    )


def _train_runs(
    case: _DemoCase,
    out: Path,
    *,
    epochs: int,
    device: str,
    torch_device,
    seeds: int,
    kinds: list[str],
    events: EventSink,
) -> tuple[dict[str, list[dict[str, Any]]], Any, np.ndarray]:
    """Each kind of start (pretrained, scratch) trained with each seed and scored on the held-out
    slices; with the pretrained seed-0 network and its prediction, which the demo ships."""
    from medtl.infer import predict_slices

    items = slice_items(case.volume, case.truth, slices=case.labelled, case="lits-117")
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    main_model = main_pred = None
    for seed in range(seeds):
        for kind in kinds:
            run_cfg = demo_config(epochs=epochs, device=device, seed=seed, pretrained=kind == "pretrained")
            result = fit(
                run_cfg, items, run_dir=out / "runs" / f"{kind}_seed{seed}", events=events, label=f"{kind} s{seed}"
            )
            pred = predict_slices(result.model, case.volume, device=torch_device).argmax(0)
            scores = _scores(pred, case.truth, case.held_out)
            runs[kind].append(
                {
                    "seed": seed,
                    "dice": scores,
                    "train_seconds": round(result.seconds, 1),
                    "images_per_s": round(result.images_per_s, 1),
                    "history": result.history,
                }
            )
            events.emit(
                "message",
                message=f"{kind} seed {seed}: "
                + ", ".join(f"Dice {n} {v:.3f}" for n, v in scores.items())
                + f" ({result.seconds:.0f} s, {result.images_per_s:.1f} images/s)",
            )
            if kind == "pretrained" and seed == 0:
                main_model, main_pred = result.model, pred
    return runs, main_model, main_pred


def _demo_metrics(case: _DemoCase, cfg: RunConfig, runs: dict[str, list[dict[str, Any]]], torch_device) -> dict:
    metrics: dict[str, Any] = {
        "case": "LiTS 117 (liver-ct-segmentation-package 1.6.0), 128x128x128 crop",
        "assumed_spacing_mm": list(ASSUMED_SPACING_MM),
        "labelled_slices": case.labelled,
        "evaluated_slices": len(case.held_out),
        "model": cfg.model.name,
        "device": str(torch_device),
        "dice_held_out": runs["pretrained"][0]["dice"],
        "runs": {kind: [{k2: v for k2, v in r.items() if k2 != "history"} for r in rs] for kind, rs in runs.items()},
    }
    if "scratch" in runs:
        metrics["comparison"] = {
            kind: {name: summarize([r["dice"][name] for r in rs]) for name in ("liver", "tumour", "liver_and_tumour")}
            for kind, rs in runs.items()
        }
    return metrics


def _demo_figure(out: Path, case: _DemoCase, runs: dict[str, list[dict[str, Any]]], pred: np.ndarray) -> None:
    """Loss curves of every run and three held-out slices with the prediction."""
    from medtl.report import training_figure

    held_out = case.held_out
    shown = sorted({held_out[len(held_out) // 6], held_out[len(held_out) // 2], held_out[5 * len(held_out) // 6]})
    curves = {f"{kind} s{r['seed']}": r["history"] for kind, rs in runs.items() for r in rs}
    training_figure(
        out / "demo.png", curves, image=case.volume, truth=case.truth, pred=pred, slices=shown, labelled=case.labelled
    )


def run_demo(
    out_dir: str | Path,
    *,
    k: int = 8,
    epochs: int = 12,
    device: str = "auto",
    compare_scratch: bool = False,
    seeds: int = 3,
    events: EventSink | None = None,
) -> dict[str, Any]:
    events = events or EventSink()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cfg = demo_config(epochs=epochs, device=device)
    case = _load_case(cfg, k)
    events.emit(
        "message",
        message=(
            f"LiTS case 117: {case.volume.shape[0]} axial slices, {k} labelled (z = {case.labelled}), Dice on the "
            f"other {len(case.held_out)}. Spacing is not in the data: assuming {ASSUMED_SPACING_MM} mm."
        ),
    )
    write_image(case.image, out / "image.nrrd")
    segments = [(e["value"], e["name"], tuple(e["color"])) for e in label_table(LABEL_NAMES)[1:]]
    write_segmentation(case.truth, case.image, out / "reference.seg.nrrd", segments)

    torch_device = resolve_device(device, events)
    runs, main_model, main_pred = _train_runs(
        case,
        out,
        epochs=epochs,
        device=device,
        torch_device=torch_device,
        seeds=seeds if compare_scratch else 1,
        kinds=["pretrained", "scratch"] if compare_scratch else ["pretrained"],
        events=events,
    )
    metrics = _demo_metrics(case, cfg, runs, torch_device)
    cfg.save(out / "config.json")
    write_segmentation(main_pred.astype(np.uint8), case.image, out / "prediction.seg.nrrd", segments)
    _demo_figure(out, case, runs, main_pred)
    package = save_package(
        out / "model",
        main_model,
        cfg,
        metrics={"dice_held_out": metrics["dice_held_out"]},
        extra={"training_data_note": "LiTS case 117, labelled slices " + ", ".join(map(str, case.labelled))},
    )
    _demo_report(out, package, main_pred, case.truth, case.held_out, len(case.labelled))
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    events.emit("done", run_dir=str(out), package=str(out / "model"), metrics=metrics)
    return metrics


def _demo_report(out: Path, package: Path, pred: np.ndarray, truth: np.ndarray, held_out: list[int], k: int) -> None:
    """The demo's model card and report: the metrics over the slices it did not train on."""
    from medtl.evaluate import segmentation_case_metrics, summarise_segmentation
    from medtl.package import read_manifest
    from medtl.report import model_card, write_report

    spacing = tuple(reversed(ASSUMED_SPACING_MM))
    records = []
    # Slices without liver in truth or prediction would count as perfect: only the others are scored.
    for z in [z for z in held_out if truth[z].any() or pred[z].any()]:
        per_class = segmentation_case_metrics(pred[z : z + 1], truth[z : z + 1], spacing=spacing, classes=[1, 2])
        records.append({"slice": z, "metrics": {LABEL_NAMES[c - 1]: m for c, m in per_class.items()}})
    summary = {
        "task": "segmentation",
        "cases": len(records),
        "metrics": summarise_segmentation(records, LABEL_NAMES),
        "fairness": [],
    }
    card = model_card(
        kind="training",
        manifest=read_manifest(package),
        summary=summary,
        limitations=[
            f"A demonstration: one CT (LiTS case 117), {k} labelled axial slices; the metrics are over the "
            f"{len(records)} other slices of the same CT showing liver, which are not independent cases, so the "
            "intervals understate the uncertainty.",
            f"The data carry no spacing; {ASSUMED_SPACING_MM} mm is assumed, so distances and volumes are nominal.",
        ],
    )
    write_report(
        out,
        card,
        title="MedTL demo: LiTS case 117 from a few slices",
        figures={"Loss and slices": (out / "demo.png").read_bytes()},
    )
