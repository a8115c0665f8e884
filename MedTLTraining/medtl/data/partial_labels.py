"""Partial labels: which voxels the user annotated, and which they said nothing about.

A label file marks voxels nobody annotated with :data:`UNKNOWN` (255). Every other value is an
annotation: 0 is background the user painted, left unpainted on a slice they worked on, or
erased; 1..N are the structures. Unknown voxels never count in a loss, a patch sampler or a
metric. A file without the value 255 is fully annotated, organ-free slices included.

Torch-free: the Slicer side imports it to write label files.

Example:
    >>> import numpy as np
    >>> label = np.full((4, 2, 2), UNKNOWN, np.uint8); label[1] = 0; label[3, 0, 0] = 1
    >>> annotated_slices(label)
    [1, 3]
    >>> known_fraction(label)  # slice 1 and one voxel of slice 3
    0.3125
"""

from __future__ import annotations

import numpy as np

UNKNOWN = 255
"""The reserved label value of a voxel nobody annotated. Label values 1..254 are structures."""

MAX_CLASSES = UNKNOWN - 1
"""Structures a label file can name besides background (values 1..254)."""


def known_mask(label: np.ndarray) -> np.ndarray:
    """True where the label says something (background included), False where it is unknown."""
    return np.asarray(label) != UNKNOWN


def known_fraction(label: np.ndarray) -> float:
    """The share of voxels that are annotated."""
    label = np.asarray(label)
    return float(known_mask(label).mean()) if label.size else 0.0


def annotated_slices(label: np.ndarray, axis: int = 0) -> list[int]:
    """Indices along ``axis`` of the slices holding at least one annotated voxel."""
    label = np.asarray(label)
    other = tuple(a for a in range(label.ndim) if a != axis % label.ndim)
    return [int(i) for i in np.flatnonzero(known_mask(label).any(axis=other))]


def unpainted_slices_unknown(label: np.ndarray, axis: int = 0) -> np.ndarray:
    """For label files from tools that cannot write :data:`UNKNOWN`: slices along ``axis`` without
    any nonzero voxel become unknown (``data.labelled_slices``); the painted slices keep their
    background."""
    label = np.array(label, copy=True)
    other = tuple(a for a in range(label.ndim) if a != axis % label.ndim)
    empty = ~np.any((label != 0) & known_mask(label), axis=other)
    index = [slice(None)] * label.ndim
    index[axis % label.ndim] = empty
    label[tuple(index)] = UNKNOWN
    return label
