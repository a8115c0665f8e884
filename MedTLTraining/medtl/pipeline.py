"""``medtl train CONFIG``: from a dataset CSV to a run directory with a model package.

A run directory holds ``config.json``, ``checkpoint.pt`` (resumable), ``events.jsonl``,
``metrics.json``, ``training.png`` and ``model/`` (the package).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medtl.config import RunConfig
from medtl.data.dataset import Case, load_cases
from medtl.data.io import atomic_write_text, read_image
from medtl.data.slices import slice_items
from medtl.errors import DataError
from medtl.events import EventSink
from medtl.package import preprocess, save_package
from medtl.train import dice_per_class, fit, resolve_device


def load_case_arrays(case: Case, cfg: RunConfig) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """The image, its preprocessed array and its label array; errors name the CSV row."""
    image = read_image(case.image)
    label_image = read_image(case.label)
    if image.GetSize() != label_image.GetSize():
        raise DataError(
            f"row {case.row}: image {case.image.name} is {image.GetSize()} but label {case.label.name} "
            f"is {label_image.GetSize()}"
        )
    labels = sitk.GetArrayFromImage(label_image).astype(np.int64)
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
        raise DataError(
            f"row {case.row}: label {case.label.name} has values {labels.min()}..{labels.max()}, "
            f"but data.label_names defines 0..{cfg.num_classes - 1}"
        )
    return image, preprocess(image, cfg), labels


def training_items(cases: list[Case], cfg: RunConfig) -> list[dict]:
    items: list[dict] = []
    for case in cases:
        _, volume, labels = load_case_arrays(case, cfg)
        if cfg.spatial_dims == 2:
            slices = None if cfg.data.labelled_slices else range(volume.shape[0])
            items += slice_items(volume, labels, slices=slices, case=case.image.name)
        else:
            items.append({"image": volume[None], "label": labels[None], "case": case.image.name})
    if not items:
        raise DataError("the training cases hold no labelled voxels")
    return items


def split_cases(cases: list[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    if fraction <= 0 or len(cases) < 2:
        return cases, []
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, int(round(fraction * len(cases))))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def run_training(cfg: RunConfig, *, events: EventSink, resume: bool = False) -> dict[str, Any]:
    """Trains from ``cfg.data.csv`` into ``cfg.output_dir``; returns the metrics it wrote."""
    from medtl.infer import predict_volume
    from medtl.report import training_figure

    if not cfg.data.csv:
        raise DataError("config field 'data.csv' is empty: name the dataset CSV")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    cases = load_cases(cfg.data.csv)
    train_cases, val_cases = split_cases(cases, cfg.data.val_fraction, cfg.train.seed)
    result = fit(cfg, training_items(train_cases, cfg), run_dir=run_dir, events=events, resume=resume)

    metrics: dict[str, Any] = {
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "seconds": round(result.seconds, 1),
    }
    device = resolve_device(cfg.train.device)
    classes = list(range(1, cfg.num_classes))
    per_case = []
    for case in val_cases:
        _, volume, labels = load_case_arrays(case, cfg)
        probs = predict_volume(
            result.model, volume, spatial_dims=cfg.spatial_dims, patch_size=cfg.preprocessing.patch_size, device=device
        )
        scores = dice_per_class(probs.argmax(0), labels, classes)
        per_case.append(
            {"image": case.image.name, "row": case.row, **{cfg.data.label_names[c - 1]: s for c, s in scores.items()}}
        )
    if per_case:
        metrics["val_dice"] = {name: float(np.nanmean([p[name] for p in per_case])) for name in cfg.data.label_names}
        metrics["val_cases_dice"] = per_case
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    training_figure(run_dir / "training.png", {"train": result.history})
    package = save_package(
        run_dir / "model",
        result.model,
        cfg,
        training_files=[p for c in train_cases for p in (c.image, c.label) if p is not None and p.is_file()],
        metrics=metrics,
    )
    events.emit("done", run_dir=str(run_dir), package=str(package), metrics=metrics)
    return metrics
