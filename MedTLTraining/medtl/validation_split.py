"""The validation split of a run's cases, whole groups (sites, patients) on one side."""

from __future__ import annotations

import numpy as np

from medtl.data.dataset import Case
from medtl.errors import DataError


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
