"""2D training samples from volumes: axial (z) slices, only the labelled ones by default.

Slices without paint are unknown, not background: a user who painted 3 slices said nothing
about the others.

Example:
    >>> import numpy as np
    >>> vol = np.zeros((4, 8, 8), np.float32); lab = np.zeros((4, 8, 8), np.int64); lab[2, 1, 1] = 1
    >>> [s["slice"] for s in slice_items(vol, lab)]
    [2]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def labelled_slices(label: np.ndarray) -> list[int]:
    """z indices whose slice holds any nonzero label."""
    return [int(z) for z in np.nonzero(label.reshape(label.shape[0], -1).any(axis=1))[0]]


def slice_stack(volume: np.ndarray, z: int, context: int) -> np.ndarray:
    """Slice ``z`` as (1 + 2·context, y, x): its neighbours below and above as extra channels (2.5D),
    the edge slice repeated at the volume's ends."""
    indices = np.clip(np.arange(z - context, z + context + 1), 0, volume.shape[0] - 1)
    return np.ascontiguousarray(volume[indices], dtype=np.float32)


def slice_items(
    volume: np.ndarray,
    label: np.ndarray,
    *,
    slices: Sequence[int] | None = None,
    case: str = "",
    context: int = 0,
) -> list[dict]:
    """Training dicts (``image`` (1 + 2·context, y, x) float32, ``label`` (1, y, x) in the label
    array's integer type) for chosen z slices."""
    if volume.shape != label.shape:
        raise ValueError(f"image {volume.shape} and label {label.shape} differ in shape")
    chosen = labelled_slices(label) if slices is None else list(slices)
    return [
        {
            "image": slice_stack(volume, z, context),
            "label": np.ascontiguousarray(label[z][None]),
            "slice": z,
            "case": case,
        }
        for z in chosen
    ]


def spread_slices(candidates: Sequence[int], k: int) -> list[int]:
    """``k`` slices spread evenly through ``candidates`` (centres of k equal parts)."""
    candidates = list(candidates)
    if k >= len(candidates):
        return candidates
    positions = [int((i + 0.5) * len(candidates) / k) for i in range(k)]
    return [candidates[p] for p in positions]
