"""``medtl train CONFIG``: from a dataset CSV to a run directory with a model package.

A run directory holds ``config.json``, ``checkpoint.pt`` (resumable), ``events.jsonl``,
``metrics.json``, ``training.png`` and ``model/`` (the package).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

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


def split_cases(cases: list[Case], fraction: float, seed: int, group_column: str = "") -> tuple[list[Case], list[Case]]:
    """Held-out validation cases; with ``group_column``, whole groups (sites, patients) are held out."""
    if fraction <= 0 or len(cases) < 2:
        return cases, []
    if group_column:
        missing = [c.row for c in cases if not c.extra.get(group_column)]
        if missing:
            raise DataError(f"data.group_column '{group_column}': no value in CSV row(s) {missing[:5]}")
        groups = sorted({c.extra[group_column] for c in cases})
    else:
        groups = [str(i) for i in range(len(cases))]
    if len(groups) < 2:
        raise DataError(f"data.group_column '{group_column}': a validation split needs at least two groups")
    order = np.random.default_rng(seed).permutation(len(groups))
    n_val = min(len(groups) - 1, max(1, int(round(fraction * len(groups)))))
    held_out = {groups[i] for i in order[:n_val]}

    def key(index: int, case: Case) -> str:
        return case.extra[group_column] if group_column else str(index)

    val = [c for i, c in enumerate(cases) if key(i, c) in held_out]
    train = [c for i, c in enumerate(cases) if key(i, c) not in held_out]
    return train, val


def validation_scorer(
    val_cases: list[Case], cfg: RunConfig, device
) -> tuple[Callable[[torch.nn.Module], dict[str, float]], list[dict]]:
    """A function scoring a network on the held-out cases (mean Dice per label name), and the
    per-case scores of its last call. The cases are read once."""
    from medtl.infer import predict_volume

    loaded = [(case, *load_case_arrays(case, cfg)[1:]) for case in val_cases]
    classes = list(range(1, cfg.num_classes))
    last: list[dict] = []

    def score(model) -> dict[str, float]:
        last.clear()
        for case, volume, labels in loaded:
            probs = predict_volume(
                model, volume, spatial_dims=cfg.spatial_dims, patch_size=cfg.preprocessing.patch_size, device=device
            )
            scores = dice_per_class(probs.argmax(0), labels, classes)
            last.append(
                {
                    "image": case.image.name,
                    "row": case.row,
                    **{cfg.data.label_names[c - 1]: s for c, s in scores.items()},
                }
            )
        return {name: float(np.nanmean([p[name] for p in last])) for name in cfg.data.label_names}

    return score, last


def run_training(cfg: RunConfig, *, events: EventSink, resume: bool = False) -> dict[str, Any]:
    """Trains from ``cfg.data.csv`` into ``cfg.output_dir``; returns the metrics it wrote.

    With held-out cases, their Dice is computed after every epoch (in the epoch events and the
    history, for live curves) and reported for the final network.
    """
    from medtl.report import training_figure

    if not cfg.data.csv:
        raise DataError("config field 'data.csv' is empty: name the dataset CSV")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    cases = load_cases(cfg.data.csv)
    train_cases, val_cases = split_cases(cases, cfg.data.val_fraction, cfg.train.seed, cfg.data.group_column)
    device = resolve_device(cfg.train.device)
    score, per_case = validation_scorer(val_cases, cfg, device) if val_cases else (None, [])
    result = fit(cfg, training_items(train_cases, cfg), run_dir=run_dir, events=events, resume=resume, validate=score)

    metrics: dict[str, Any] = {
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "seconds": round(result.seconds, 1),
    }
    if score is not None:
        # A resumed run that had nothing left to train has not scored this network yet.
        metrics["val_dice"] = result.history[-1]["val_dice"] if per_case else score(result.model)
        metrics["val_cases_dice"] = list(per_case)
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
