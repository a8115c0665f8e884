"""The validation split of a run's cases, whole groups (sites, patients) on one side."""

from __future__ import annotations

import numpy as np

from medtl.data.dataset import Case
from medtl.errors import DataError


def split_cases(cases: list[Case], fraction: float, seed: int, group_column: str = "") -> tuple[list[Case], list[Case]]:
    """Held-out validation cases (scikit-learn's GroupShuffleSplit, as cross-validation uses its
    group folds); with ``group_column``, whole groups (sites, patients) are held out, else single
    cases. Both sides keep the CSV's order."""
    from sklearn.model_selection import GroupShuffleSplit

    if fraction <= 0 or len(cases) < 2:
        return cases, []
    if group_column:
        missing = [c.row for c in cases if not c.extra.get(group_column)]
        if missing:
            raise DataError(f"data.group_column '{group_column}': no value in CSV row(s) {missing[:5]}")
        groups = [c.extra[group_column] for c in cases]
    else:
        groups = list(range(len(cases)))
    n_groups = len(set(groups))
    if n_groups < 2:
        raise DataError(f"data.group_column '{group_column}': a validation split needs at least two groups")
    # At least one group held out, and at least one left to train on.
    n_val = min(n_groups - 1, max(1, int(round(fraction * n_groups))))
    splitter = GroupShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(cases)), groups=groups))
    return [cases[i] for i in sorted(train)], [cases[i] for i in sorted(val)]
