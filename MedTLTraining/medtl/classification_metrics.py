"""Classification metrics per class, one class against the rest: AUROC, sensitivity, specificity
and F1 with stratified bootstrap intervals (scikit-learn, SciPy), expected calibration error and
reliability bins (MONAI), ROC curves, and the case-level confusion matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medtl.bootstrap import bootstrap_interval

MACRO_METRICS = ("auroc", "sensitivity", "specificity", "f1")


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
    from sklearn.metrics import confusion_matrix

    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    truth, decided = truth_and_decisions(targets, probs, multi_label=multi_label, threshold=threshold)
    calibration = _calibration(probs, truth, n_bins)
    per_class = {
        name: _class_entry(truth[:, k], probs[:, k], decided[:, k], calibration, k, n_resamples)
        for k, name in enumerate(class_names)
    }
    result: dict[str, Any] = {"cases": int(n), "classes": per_class}
    if not multi_label:
        index = np.asarray(targets, dtype=np.int64).reshape(n)
        result["confusion_matrix"] = confusion_matrix(index, probs.argmax(axis=1), labels=list(range(c))).tolist()
        result["accuracy"] = float((index == probs.argmax(axis=1)).mean())
    # Macro means over the classes where the metric is defined.
    for metric in MACRO_METRICS:
        values = [e[metric]["value"] for e in per_class.values() if np.isfinite(e[metric]["value"])]
        result[f"macro_{metric}"] = float(np.mean(values)) if values else None
    result["macro_ece"] = float(np.mean([e["ece"] for e in per_class.values()]))
    return result


def truth_and_decisions(
    targets, probs: np.ndarray, *, multi_label: bool, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) 0/1 arrays of the truth and of the decisions: the argmax for one label a case, each
    ``probs >= threshold`` for multi-label."""
    n, c = probs.shape
    if multi_label:
        return np.asarray(targets, dtype=np.int64).reshape(n, c), (probs >= threshold).astype(np.int64)
    index = np.asarray(targets, dtype=np.int64).reshape(n)
    return np.eye(c, dtype=np.int64)[index], np.eye(c, dtype=np.int64)[probs.argmax(axis=1)]


def _calibration(probs: np.ndarray, truth: np.ndarray, n_bins: int) -> dict[str, torch.Tensor]:
    """Per class: the expected calibration error and the reliability bins (MONAI)."""
    from monai.metrics import CalibrationErrorMetric
    from monai.metrics.calibration import calibration_binning

    ece = CalibrationErrorMetric(num_bins=n_bins, include_background=True, metric_reduction="none")
    # MONAI's calibration takes (batch, channel, spatial): one batch, a channel per class, the cases as
    # the spatial axis.
    p_t = torch.from_numpy(np.ascontiguousarray(probs.T[None])).float()
    t_t = torch.from_numpy(np.ascontiguousarray(truth.T[None])).float()
    mean_p, mean_gt, counts = calibration_binning(p_t, t_t, num_bins=n_bins)
    return {"ece": ece(p_t, t_t)[0], "mean_p": mean_p[0], "mean_gt": mean_gt[0], "counts": counts[0]}


def _class_entry(
    t: np.ndarray, p: np.ndarray, d: np.ndarray, calibration: dict[str, torch.Tensor], k: int, n_resamples: int
) -> dict[str, Any]:
    """One class's metrics from its truth ``t``, probabilities ``p`` and decisions ``d`` (0/1)."""
    from sklearn.metrics import f1_score, roc_curve

    pos, neg = t == 1, t == 0
    both = bool(pos.any() and neg.any())
    entry = {
        "positives": int(pos.sum()),
        "negatives": int(neg.sum()),
        "auroc": {
            "value": auroc_or_nan(t, p),
            "ci95": bootstrap_interval([p[pos], p[neg]], _auroc_of, n_resamples=n_resamples) if both else None,
        },
        "sensitivity": {
            "value": float((d[pos] == 1).mean()) if pos.any() else math.nan,
            "ci95": bootstrap_interval([d[pos]], np.mean, n_resamples=n_resamples) if pos.any() else None,
        },
        "specificity": {
            "value": float((d[neg] == 0).mean()) if neg.any() else math.nan,
            "ci95": bootstrap_interval([1 - d[neg]], np.mean, n_resamples=n_resamples) if neg.any() else None,
        },
        "f1": {
            "value": float(f1_score(t, d, zero_division=0.0)),
            "ci95": bootstrap_interval([d[pos], d[neg]], _f1_of, n_resamples=n_resamples) if both else None,
        },
        "ece": float(calibration["ece"][k]),
        "reliability": {
            "mean_probability": _nan_to_none(calibration["mean_p"][k]),
            "fraction_positive": _nan_to_none(calibration["mean_gt"][k]),
            "count": [int(x) for x in calibration["counts"][k]],
        },
    }
    if 0 < t.sum() < len(t):
        fpr, tpr, _ = roc_curve(t, p)
        entry["roc"] = {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
    return entry


def auroc_or_nan(t: np.ndarray, p: np.ndarray) -> float:
    """AUROC of scores ``p`` for 0/1 truth ``t``; NaN when ``t`` holds one side only."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(t, p)) if 0 < t.sum() < len(t) else math.nan


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


def _nan_to_none(values: torch.Tensor) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in values.tolist()]
