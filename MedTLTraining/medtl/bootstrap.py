"""Bootstrap confidence intervals (SciPy): of any statistic over cases, of a mean, and of every
segmentation metric per label, as reports, model cards and fairness tables give them."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


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
