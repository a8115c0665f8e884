"""Validation metrics: per-case segmentation metrics (MONAI), classification metrics (scikit-learn,
MONAI's calibration), bootstrap confidence intervals (SciPy) and per-group fairness (fairlearn).

Functions here work on arrays and records; :func:`evaluate_package` runs a model package over a
dataset CSV and :mod:`medtl.crossval` runs them fold by fold. Records never carry file names:
a case is its CSV row (and a short hash), so reports can be shared without patient identifiers.

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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

# Below this many cases a group's metric is reported with a warning: an interval that wide
# says nothing about the group.
MIN_GROUP_CASES = 10


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


def bootstrap_interval(
    samples: Sequence[np.ndarray],
    statistic: Callable[..., Any],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic`` over cases (SciPy, vectorised:
    ``statistic(*samples, axis=-1)``).

    ``samples`` are resampled independently: one array is the plain bootstrap; the positive and
    the negative cases' values as two arrays is the stratified bootstrap, where every resample
    keeps both sides of an AUROC. None when there are too few cases to resample (SciPy needs two
    per array: a held-out split with a single positive case has no interval).
    """
    from scipy.stats import bootstrap

    samples = [np.asarray(s, dtype=np.float64) for s in samples]
    if n_resamples <= 0 or sum(len(s) for s in samples) < 3 or any(len(s) < 2 for s in samples):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate (constant) statistic gives a zero-width interval
        result = bootstrap(
            tuple(samples),
            statistic,
            vectorized=True,
            paired=False,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    return [float(low), float(high)]


def mean_with_interval(values: Sequence[float], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean over the cases where the value is defined, its bootstrap interval and the count."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"mean": None, "ci95": None, "n": 0}
    ci = bootstrap_interval([v], np.mean, n_resamples=n_resamples, seed=seed)
    return {"mean": float(v.mean()), "ci95": ci, "n": int(len(v))}


def _auroc_of(positive: np.ndarray, negative: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC as the Mann-Whitney U of the positives' scores over the negatives', scaled to [0, 1]
    (ties count half), vectorised for the bootstrap."""
    from scipy.stats import mannwhitneyu

    return mannwhitneyu(positive, negative, axis=axis).statistic / (positive.shape[axis] * negative.shape[axis])


def _f1_of(positive: np.ndarray, negative: np.ndarray, axis: int = -1) -> np.ndarray:
    """F1 from the decisions (0/1) on the positive and on the negative cases."""
    tp = positive.sum(axis)
    fn = positive.shape[axis] - tp
    fp = negative.sum(axis)
    return np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fn + fp, 1), 0.0)


SEGMENTATION_METRICS = ("dice", "hd95_mm", "surface_dice", "volume_error_ml", "relative_volume_error")


def summarise_segmentation(
    records: Sequence[dict[str, Any]],
    label_names: Sequence[str],
    *,
    metrics: Sequence[str] = SEGMENTATION_METRICS,
    n_resamples: int = 1000,
) -> dict[str, dict[str, Any]]:
    """Per label name and metric: mean over cases with a 95 % bootstrap interval.

    ``records`` are per-case dicts holding ``metrics[name][metric]``.
    """
    return {
        name: {
            metric: mean_with_interval([r["metrics"][name][metric] for r in records], n_resamples=n_resamples)
            for metric in metrics
        }
        for name in label_names
    }


def classification_metrics(
    targets: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    multi_label: bool = False,
    threshold: float = 0.5,
    n_bins: int = 10,
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """AUROC, sensitivity, specificity, F1 and expected calibration error per class (one class
    against the rest), with stratified bootstrap intervals; the case-level confusion matrix, ROC
    curves and reliability-diagram bins.

    ``targets``: (N,) class indices, or (N, C) 0/1 when ``multi_label``. ``probs``: (N, C).
    Decisions are the argmax (single label) or ``probs >= threshold`` (multi-label).
    """
    from monai.metrics import CalibrationErrorMetric
    from monai.metrics.calibration import calibration_binning
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve

    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    if multi_label:
        truth = np.asarray(targets, dtype=np.int64).reshape(n, c)
        decided = (probs >= threshold).astype(np.int64)
    else:
        index = np.asarray(targets, dtype=np.int64).reshape(n)
        truth = np.eye(c, dtype=np.int64)[index]
        decided = np.eye(c, dtype=np.int64)[probs.argmax(axis=1)]

    def auroc(t, p):
        return float(roc_auc_score(t, p)) if 0 < t.sum() < len(t) else math.nan

    def sensitivity(t, d):
        return float((d[t == 1] == 1).mean()) if (t == 1).any() else math.nan

    def specificity(t, d):
        return float((d[t == 0] == 0).mean()) if (t == 0).any() else math.nan

    def f1(t, d):
        return float(f1_score(t, d, zero_division=0.0))

    per_class: dict[str, Any] = {}
    ece = CalibrationErrorMetric(num_bins=n_bins, include_background=True, metric_reduction="none")
    # MONAI's calibration takes (batch, channel, spatial): one batch, a channel per class, the cases as
    # the spatial axis.
    p_t = torch.from_numpy(np.ascontiguousarray(probs.T[None])).float()
    t_t = torch.from_numpy(np.ascontiguousarray(truth.T[None])).float()
    ece_values = ece(p_t, t_t)[0]
    mean_p, mean_gt, counts = calibration_binning(p_t, t_t, num_bins=n_bins)
    for k, name in enumerate(class_names):
        t, p, d = truth[:, k], probs[:, k], decided[:, k]
        pos, neg = t == 1, t == 0
        both = bool(pos.any() and neg.any())
        entry = {
            "positives": int(pos.sum()),
            "negatives": int(neg.sum()),
            "auroc": {
                "value": auroc(t, p),
                "ci95": bootstrap_interval([p[pos], p[neg]], _auroc_of, n_resamples=n_resamples) if both else None,
            },
            "sensitivity": {
                "value": sensitivity(t, d),
                "ci95": bootstrap_interval([d[pos]], np.mean, n_resamples=n_resamples) if pos.any() else None,
            },
            "specificity": {
                "value": specificity(t, d),
                "ci95": bootstrap_interval([1 - d[neg]], np.mean, n_resamples=n_resamples) if neg.any() else None,
            },
            "f1": {
                "value": f1(t, d),
                "ci95": bootstrap_interval([d[pos], d[neg]], _f1_of, n_resamples=n_resamples) if both else None,
            },
            "ece": float(ece_values[k]),
            "reliability": {
                "mean_probability": _nan_to_none(mean_p[0, k]),
                "fraction_positive": _nan_to_none(mean_gt[0, k]),
                "count": [int(x) for x in counts[0, k]],
            },
        }
        if 0 < t.sum() < n:
            fpr, tpr, _ = roc_curve(t, p)
            entry["roc"] = {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
        per_class[name] = entry
    result: dict[str, Any] = {"cases": int(n), "classes": per_class}
    if not multi_label:
        result["confusion_matrix"] = confusion_matrix(index, probs.argmax(axis=1), labels=list(range(c))).tolist()
        result["accuracy"] = float((index == probs.argmax(axis=1)).mean())
    # Macro means over the classes where the metric is defined.
    for metric in ("auroc", "sensitivity", "specificity", "f1"):
        values = [e[metric]["value"] for e in per_class.values() if np.isfinite(e[metric]["value"])]
        result[f"macro_{metric}"] = float(np.mean(values)) if values else None
    result["macro_ece"] = float(np.mean([e["ece"] for e in per_class.values()]))
    return result


def _nan_to_none(values: torch.Tensor) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in values.tolist()]


def fairness_segmentation(
    records: Sequence[dict[str, Any]],
    column: str,
    label_names: Sequence[str],
    *,
    min_group: int = MIN_GROUP_CASES,
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """Per value of ``column``: the cases' mean Dice, HD95 and volume error per label with
    intervals, the largest gap in mean Dice between groups, and warnings for small groups."""
    groups = _group_records(records, column)
    table = {}
    for value, members in groups.items():
        table[value] = {
            "cases": len(members),
            **summarise_segmentation(
                members, label_names, metrics=("dice", "hd95_mm", "volume_error_ml"), n_resamples=n_resamples
            ),
        }
    gaps = {}
    for name in label_names:
        means = [g[name]["dice"]["mean"] for g in table.values() if g[name]["dice"]["mean"] is not None]
        gaps[name] = float(max(means) - min(means)) if len(means) > 1 else None
    return {"column": column, "groups": table, "dice_gap": gaps, "warnings": _small_groups(groups, column, min_group)}


def fairness_classification(
    records: Sequence[dict[str, Any]],
    column: str,
    class_names: Sequence[str],
    *,
    multi_label: bool = False,
    threshold: float = 0.5,
    min_group: int = MIN_GROUP_CASES,
) -> dict[str, Any]:
    """Per value of ``column`` and class (one against the rest): AUROC, sensitivity, specificity,
    selection rate (fairlearn's MetricFrame), and the equalised-odds and demographic-parity
    differences between the groups (fairlearn). ``records`` hold ``target`` and ``probabilities``."""
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        equalized_odds_difference,
        selection_rate,
        true_negative_rate,
        true_positive_rate,
    )

    groups = _group_records(records, column)
    kept = [r for r in records if (r.get("groups", {}).get(column) or "") != ""]
    sensitive = np.array([r["groups"][column] for r in kept])
    probs = np.array([r["probabilities"] for r in kept], dtype=np.float64)
    c = len(class_names)
    if multi_label:
        truth = np.array([r["target"] for r in kept], dtype=np.int64)
        decided = (probs >= threshold).astype(np.int64)
    else:
        truth = np.eye(c, dtype=np.int64)[[int(r["target"]) for r in kept]]
        decided = np.eye(c, dtype=np.int64)[probs.argmax(axis=1)]
    classes = {}
    with warnings.catch_warnings():
        # A group without positives has no true-positive rate; fairlearn warns, the table says NaN.
        warnings.simplefilter("ignore")
        for k, name in enumerate(class_names):
            t, d = truth[:, k], decided[:, k]
            frame = MetricFrame(
                metrics={
                    "sensitivity": true_positive_rate,
                    "specificity": true_negative_rate,
                    "selection_rate": selection_rate,
                },
                y_true=t,
                y_pred=d,
                sensitive_features=sensitive,
            )
            by_group = frame.by_group.to_dict(orient="index")
            for value in by_group:
                mask = sensitive == value
                tk, pk = t[mask], probs[mask, k]
                by_group[value]["auroc"] = _safe_auroc(tk, pk)
                by_group[value] = {m: _finite_or_none(v) for m, v in by_group[value].items()}
            classes[name] = {
                "by_group": {str(g): v for g, v in by_group.items()},
                "equalized_odds_difference": _finite_or_none(
                    equalized_odds_difference(t, d, sensitive_features=sensitive)
                ),
                "demographic_parity_difference": _finite_or_none(
                    demographic_parity_difference(t, d, sensitive_features=sensitive)
                ),
            }
    warn = _small_groups(groups, column, min_group)
    for value, members in groups.items():
        for k, name in enumerate(class_names):
            positives = int(sum(truth[sensitive == value][:, k])) if len(members) else 0
            if positives == 0 or positives == len(members):
                warn.append(
                    f"{column}={value}: no {'negative' if positives else 'positive'} '{name}' cases, so its "
                    "sensitivity, specificity or AUROC is undefined"
                )
    return {
        "column": column,
        "cases": {str(g): len(m) for g, m in groups.items()},
        "classes": classes,
        "warnings": warn,
    }


def _safe_auroc(t: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(t, p)) if 0 < t.sum() < len(t) else math.nan


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _group_records(records: Sequence[dict[str, Any]], column: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        value = (r.get("groups", {}).get(column) or "").strip()
        if value:
            groups.setdefault(value, []).append(r)
    if not groups:
        raise ValueError(f"no case has a value in column '{column}'")
    return dict(sorted(groups.items()))


def _small_groups(groups: dict[str, list], column: str, min_group: int) -> list[str]:
    return [
        f"{column}={value}: only {len(members)} case(s); below {min_group} its metrics say little "
        "(see the interval's width)"
        for value, members in groups.items()
        if len(members) < min_group
    ]


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
    from medtl.case_data import case_label_image, class_target
    from medtl.data.checks import read_checked_image
    from medtl.data.partial_labels import UNKNOWN
    from medtl.errors import DataError
    from medtl.package import classify_image, segment_image
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
