"""Validation metrics: per-case segmentation metrics (MONAI), a package scored case by case
(:func:`evaluate_cases`) and the summary of those records (:func:`summarise`) with bootstrap
intervals (:mod:`medtl.bootstrap`), classification metrics (:mod:`medtl.classification_metrics`)
and per-group fairness (:mod:`medtl.fairness`).

Functions here work on arrays and records; :func:`medtl.validation.evaluate_package` runs a model
package over a dataset CSV and :func:`medtl.validation.cross_validate` runs them fold by fold.
Records never carry file names: a case is its CSV row (and a short hash), so reports can be shared
without patient identifiers.

Example:
    >>> import numpy as np
    >>> truth = np.zeros((1, 4, 4), np.uint8); truth[0, :2] = 1
    >>> pred = np.zeros((1, 4, 4), np.uint8); pred[0, :1] = 1
    >>> m = segmentation_case_metrics(pred, truth, spacing=(1.0, 1.0, 1.0), classes=[1])
    >>> round(m[1]["dice"], 3), m[1]["volume_error_ml"]
    (0.667, -0.004)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

# The interval, classification and fairness metrics live in their own modules; their names stay
# importable from here, the module that summarises an evaluation with them.
from medtl.bootstrap import SEGMENTATION_METRICS, bootstrap_interval, mean_with_interval, summarise_segmentation
from medtl.classification_metrics import _auroc_of, _f1_of, classification_metrics
from medtl.fairness import MIN_GROUP_CASES, fairness_classification, fairness_segmentation

__all__ = [
    "MIN_GROUP_CASES",
    "SEGMENTATION_METRICS",
    "_auroc_of",
    "_f1_of",
    "bootstrap_interval",
    "classification_metrics",
    "dice_per_class",
    "evaluate_cases",
    "fairness_classification",
    "fairness_segmentation",
    "mean_with_interval",
    "segmentation_case_metrics",
    "summarise",
    "summarise_segmentation",
    "voxel_confusion",
]


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(1, C, *spatial) one-hot of a label array, as MONAI's metrics take it."""
    tensor = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(tensor, num_classes).movedim(-1, 0)[None].float()


def dice_per_class(
    pred: np.ndarray, truth: np.ndarray, classes: Sequence[int], *, known: np.ndarray | None = None
) -> dict[int, float]:
    """Dice per class, as every part of MedTL scores it (training-time validation, keep-best,
    early stopping, plateau unfreezing, ``medtl evaluate``): MONAI's metric over the annotated
    voxels only (``known``, and never where ``truth`` is unknown, 255); a structure absent from
    the truth scores 0 when anything was predicted and 1 when nothing was (a false positive on an
    organ-free case counts against the model)."""
    from monai.metrics import compute_dice

    from medtl.data.partial_labels import UNKNOWN

    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    mask = truth != UNKNOWN
    if known is not None:
        mask &= np.asarray(known, bool)
    if not mask.all():
        pred, truth = pred[mask], truth[mask]
    if truth.size == 0:
        return {int(c): math.nan for c in classes}
    n = max(int(max(classes)), int(pred.max(initial=0)), int(truth.max(initial=0))) + 1
    p, t = _one_hot(pred.reshape(1, -1), n), _one_hot(truth.reshape(1, -1), n)
    scores = compute_dice(p, t, include_background=True, ignore_empty=False)[0]
    return {int(c): float(scores[c]) for c in classes}


def segmentation_case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    spacing: Sequence[float],
    classes: Sequence[int],
    tolerance_mm: float = 2.0,
) -> dict[int, dict[str, float]]:
    """Per label value: Dice, 95th-percentile Hausdorff distance (mm), surface Dice at
    ``tolerance_mm``, and volumes (mL) of prediction and truth with their difference.

    ``pred`` and ``truth`` are label arrays on the same grid, (z, y, x) with ``spacing`` in the
    same order. Distances are NaN where either side is empty (no surface to measure); Dice is 1
    where both are empty (nothing to find, nothing found). A truth with unknown voxels (255: sparse
    labels) is scored by Dice over its annotated voxels alone; its distances and volumes are NaN.
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    from medtl.data.partial_labels import UNKNOWN

    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    dice = dice_per_class(pred, truth, classes)
    if (truth == UNKNOWN).any():
        # Sparse labels: Dice over the annotated voxels says something; a surface or a volume of
        # half-painted structures does not.
        return {int(c): {"dice": dice[int(c)], **dict.fromkeys(_SHAPE_METRICS, math.nan)} for c in classes}
    num_classes = int(max(classes, default=0)) + 1
    num_classes = max(num_classes, int(pred.max(initial=0)) + 1, int(truth.max(initial=0)) + 1)
    p, t = _one_hot(pred, num_classes), _one_hot(truth, num_classes)
    spacing = [float(s) for s in spacing]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    with warnings.catch_warnings():
        # MONAI warns for each empty side (the NaN it returns is what the record says), and about
        # an argument its own surface code still passes.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)[0]
        nsd = compute_surface_dice(
            p, t, class_thresholds=[tolerance_mm] * num_classes, include_background=True, spacing=spacing
        )[0]
    out = {}
    for c in classes:
        vp, vt = float((pred == c).sum()) * voxel_ml, float((truth == c).sum()) * voxel_ml
        either_empty = vp == 0 or vt == 0
        out[int(c)] = {
            "dice": dice[int(c)],
            "hd95_mm": math.nan if either_empty else float(hd95[c]),
            "surface_dice": math.nan if either_empty else float(nsd[c]),
            "volume_ml": round(vp, 6),
            "truth_volume_ml": round(vt, 6),
            "volume_error_ml": round(vp - vt, 6),
            "relative_volume_error": (vp - vt) / vt if vt else math.nan,
        }
    return out


_SHAPE_METRICS = (
    "hd95_mm",
    "surface_dice",
    "volume_ml",
    "truth_volume_ml",
    "volume_error_ml",
    "relative_volume_error",
)


def voxel_confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(truth, prediction) voxel counts over the annotated voxels, rows the truth's label values."""
    from sklearn.metrics import confusion_matrix

    from medtl.data.partial_labels import UNKNOWN

    known = truth != UNKNOWN
    return confusion_matrix(truth[known], pred[known], labels=list(range(num_classes)))


def evaluate_cases(
    package,
    cases: Sequence,
    *,
    group_by: Sequence[str] = (),
    domain_column: str | None = None,
    tolerance_mm: float = 2.0,
    device: str | torch.device = "cpu",
    events=None,
    fold: int | None = None,
) -> list[dict[str, Any]]:
    """One record per case: its CSV row, a short hash of the image, its ``group_by`` values, and
    its metrics (segmentation) or target and probabilities (classification).

    The package predicts each image exactly as ``medtl predict`` would, on the image's own grid,
    so the metrics are those a user of the package would see. ``domain_column`` names each case's
    domain for a package with one BatchNorm per domain.
    """
    from medtl.any_package import classify_image, segment_image
    from medtl.case_data import case_label_image, class_target
    from medtl.data.checks import read_checked_image
    from medtl.data.partial_labels import UNKNOWN
    from medtl.errors import DataError
    from medtl.provenance import path_sha256

    cfg = package.config
    records = []
    for i, case in enumerate(cases):
        if events is not None:
            events.emit("step", label="evaluate", step=i, total_steps=len(cases))
        # Checked like training images (finite voxels, a scalar volume for segmentation), naming the row.
        image = read_checked_image(
            case.image, row=case.row, policy=cfg.preprocessing.nan_policy, scalar_3d=not cfg.is_classification
        )
        domain = (case.extra.get(domain_column) or "").strip() or None if domain_column and package.domains else None
        record: dict[str, Any] = {
            "row": case.row,
            "image_sha256": path_sha256(case.image),
            "groups": {g: (case.extra.get(g) or "").strip() for g in group_by},
        }
        if fold is not None:
            record["fold"] = fold
        if cfg.is_classification:
            target = class_target(case, cfg)
            probs = classify_image(package, image, device=device, domain=domain)
            record["target"] = target.tolist() if cfg.data.multi_label else int(target[0])
            record["probabilities"] = [probs[name] for name in cfg.data.label_names]
        else:
            if case.label is None:
                raise DataError(f"row {case.row}: no label file to evaluate against")
            truth_image = case_label_image(case, image, cfg)
            labels, _ = segment_image(package, image, device=device, domain=domain)
            pred = sitk.GetArrayFromImage(labels)
            truth = sitk.GetArrayFromImage(truth_image).astype(np.int64)
            known = truth != UNKNOWN
            if not known.any():
                raise DataError(f"row {case.row}: every label voxel is unknown ({UNKNOWN}): nothing to score")
            low, high = int(truth[known].min()), int(truth[known].max())
            if low < 0 or high >= cfg.num_classes:
                raise DataError(
                    f"row {case.row}: label values {low}..{high}, but the model knows 0..{cfg.num_classes - 1} "
                    f"(and {UNKNOWN} for unknown voxels)"
                )
            record["annotated_fraction"] = round(float(known.mean()), 6)
            spacing = tuple(reversed(image.GetSpacing()))
            per_class = segmentation_case_metrics(
                pred, truth, spacing=spacing, classes=range(1, cfg.num_classes), tolerance_mm=tolerance_mm
            )
            record["metrics"] = {cfg.data.label_names[c - 1]: m for c, m in per_class.items()}
            record["confusion"] = voxel_confusion(pred, truth, cfg.num_classes).tolist()
        records.append(record)
    if events is not None:
        events.emit("step", label="evaluate", step=len(cases), total_steps=len(cases))
    return records


def summarise(
    records: Sequence[dict[str, Any]],
    cfg,
    *,
    group_by: Sequence[str] = (),
    n_resamples: int = 1000,
    min_group: int = MIN_GROUP_CASES,
) -> dict[str, Any]:
    """The metrics over ``records`` with intervals, and the fairness table of each ``group_by``."""
    names = cfg.data.label_names
    if cfg.is_classification:
        targets = np.array([r["target"] for r in records])
        probs = np.array([r["probabilities"] for r in records])
        metrics = classification_metrics(
            targets, probs, names, multi_label=cfg.data.multi_label, n_resamples=n_resamples
        )
        fairness = [
            fairness_classification(records, g, names, multi_label=cfg.data.multi_label, min_group=min_group)
            for g in group_by
        ]
        return {"task": "classification", "cases": len(records), "metrics": metrics, "fairness": fairness}
    confusion = np.sum([np.array(r["confusion"]) for r in records], axis=0)
    sparse = [r["row"] for r in records if r.get("annotated_fraction", 1.0) < 1.0]
    return {
        "task": "segmentation",
        "cases": len(records),
        # Sparse labels are scored on their annotated voxels only; the report says so.
        "sparse_label_rows": sparse,
        "metrics": summarise_segmentation(records, names, n_resamples=n_resamples),
        "voxel_confusion": {"labels": ["background", *names], "counts": confusion.tolist()},
        "fairness": [
            fairness_segmentation(records, g, names, min_group=min_group, n_resamples=n_resamples) for g in group_by
        ],
    }
