"""Validation scorers: a function that scores a network on the held-out cases after every epoch
(mean Dice per label, or AUROC per class), and the per-case scores of its last call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from medtl.case_data import class_target, classification_image, load_case_arrays
from medtl.config import RunConfig
from medtl.data.dataset import Case
from medtl.evaluate import dice_per_class


def validation_scorer(
    val_cases: list[Case], cfg: RunConfig, device, domain_of: Callable[[Case], int] | None = None
) -> tuple[Callable[[torch.nn.Module], dict[str, float]], list[dict]]:
    """A function scoring a network on the held-out cases (mean Dice per label name), and the
    per-case scores of its last call. The cases are read once. ``domain_of`` gives each case's
    domain for a domain-specific BatchNorm network."""
    from medtl.adaptation.dsbn import use_domain
    from medtl.infer import predict_run_volume

    if cfg.is_classification:
        return classification_scorer(val_cases, cfg, device, domain_of)
    loaded = [(case, *load_case_arrays(case, cfg)) for case in val_cases]
    classes = list(range(1, cfg.num_classes))
    last: list[dict] = []

    def score(model) -> dict[str, float]:
        last.clear()
        for case, volume, labels in loaded:
            with use_domain(model, domain_of(case)) if domain_of else contextlib.nullcontext():
                probs = predict_run_volume(cfg, model, volume, device=device)
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


def classification_scorer(
    val_cases: list[Case], cfg: RunConfig, device, domain_of: Callable[[Case], int] | None = None
) -> tuple[Callable[[torch.nn.Module], dict[str, float]], list[dict]]:
    """Held-out AUROC per class (one class against the rest; NaN where the held-out cases hold
    only one side), and the per-case probabilities of its last call."""
    from monai.metrics import compute_roc_auc

    from medtl.adaptation.dsbn import use_domain
    from medtl.infer import predict_class_probabilities

    images = [classification_image(case, cfg)[0] for case in val_cases]
    targets = np.stack([class_target(case, cfg) for case in val_cases])
    if not cfg.data.multi_label:
        targets = np.eye(cfg.num_classes, dtype=np.float32)[targets[:, 0]]
    last: list[dict] = []

    def score(model) -> dict[str, float]:
        if domain_of is None:
            probs = predict_class_probabilities(
                model, images, size=cfg.preprocessing.patch_size, multi_label=cfg.data.multi_label, device=device
            )
        else:
            rows = []
            for case, image in zip(val_cases, images, strict=True):
                with use_domain(model, domain_of(case)):
                    rows.append(
                        predict_class_probabilities(
                            model,
                            [image],
                            size=cfg.preprocessing.patch_size,
                            multi_label=cfg.data.multi_label,
                            device=device,
                        )[0]
                    )
            probs = np.stack(rows)
        last.clear()
        last.extend(
            {"image": c.image.name, "row": c.row, **dict(zip(cfg.data.label_names, map(float, p), strict=True))}
            for c, p in zip(val_cases, probs, strict=True)
        )
        scores = {}
        for index, name in enumerate(cfg.data.label_names):
            column = targets[:, index]
            both = 0 < column.sum() < len(column)
            scores[name] = (
                float(compute_roc_auc(torch.from_numpy(probs[:, index]), torch.from_numpy(column)))
                if both
                else float("nan")
            )
        return scores

    return score, last
