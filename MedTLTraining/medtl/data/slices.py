"""2D training samples from volumes: slices along the first array axis (the caller moves the
slice axis there), by default every slice holding an annotated voxel.

A slice whose voxels are all unknown (255, :mod:`medtl.data.partial_labels`) is not a sample: a
user who painted 3 slices said nothing about the others. An organ-free slice the user left
empty or erased is a sample: it is background.

Example:
    >>> import numpy as np
    >>> vol = np.zeros((4, 8, 8), np.float32); lab = np.full((4, 8, 8), 255, np.uint8)
    >>> lab[2] = 0; lab[2, 1, 1] = 1; lab[3] = 0
    >>> [s["slice"] for s in slice_items(vol, lab)]
    [2, 3]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medtl.data.partial_labels import annotated_slices


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
    array's integer type) for chosen slices (default: the annotated ones)."""
    if volume.shape != label.shape:
        raise ValueError(f"image {volume.shape} and label {label.shape} differ in shape")
    chosen = annotated_slices(label) if slices is None else list(slices)
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
