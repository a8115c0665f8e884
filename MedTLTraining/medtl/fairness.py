"""Per-group fairness tables (fairlearn): a metric per value of a CSV column (sex, age group, site,
scanner), the gaps between the groups, and warnings where a group is too small to say much."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from medtl.bootstrap import summarise_segmentation
from medtl.classification_metrics import auroc_or_nan, truth_and_decisions

# Below this many cases a group's metric is reported with a warning: an interval that wide
# says nothing about the group.
MIN_GROUP_CASES = 10


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
    groups = _group_records(records, column)
    kept = [r for r in records if (r.get("groups", {}).get(column) or "") != ""]
    sensitive = np.array([r["groups"][column] for r in kept])
    probs = np.array([r["probabilities"] for r in kept], dtype=np.float64)
    targets = [r["target"] if multi_label else int(r["target"]) for r in kept]
    truth, decided = truth_and_decisions(targets, probs, multi_label=multi_label, threshold=threshold)
    with warnings.catch_warnings():
        # A group without positives has no true-positive rate; fairlearn warns, the table says NaN.
        warnings.simplefilter("ignore")
        classes = {
            name: _class_by_group(truth[:, k], decided[:, k], probs[:, k], sensitive)
            for k, name in enumerate(class_names)
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


def _class_by_group(t: np.ndarray, d: np.ndarray, p: np.ndarray, sensitive: np.ndarray) -> dict[str, Any]:
    """One class's metrics per group (fairlearn's MetricFrame, and AUROC) and the equalised-odds
    and demographic-parity differences between the groups."""
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        equalized_odds_difference,
        selection_rate,
        true_negative_rate,
        true_positive_rate,
    )

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
        by_group[value]["auroc"] = auroc_or_nan(t[mask], p[mask])
        by_group[value] = {m: _finite_or_none(v) for m, v in by_group[value].items()}
    return {
        "by_group": {str(g): v for g, v in by_group.items()},
        "equalized_odds_difference": _finite_or_none(equalized_odds_difference(t, d, sensitive_features=sensitive)),
        "demographic_parity_difference": _finite_or_none(
            demographic_parity_difference(t, d, sensitive_features=sensitive)
        ),
    }


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
