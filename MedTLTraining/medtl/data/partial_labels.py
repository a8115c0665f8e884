"""Partial labels: which voxels the user annotated, and which they said nothing about.

A label file marks voxels nobody annotated with :data:`UNKNOWN` (255). Every other value is an
annotation: 0 is background the user painted, left unpainted on a slice they worked on, or
erased; 1..N are the structures. Unknown voxels never count in a loss, a patch sampler or a
metric. A file without the value 255 is fully annotated, organ-free slices included.

A Slicer segmentation file (``.seg.nrrd``) says the same with segments: a segment named
``background`` holds what the user marked as background, and then a voxel in no segment is
unknown (:func:`classes_from_segments`). Without such a segment, a voxel in no segment is
background, as in any label map.

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

from collections.abc import Mapping, Sequence

import numpy as np

from medtl.errors import DataError

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


BACKGROUND_SEGMENT = "background"
"""The segment name (any case) that marks background explicitly in a ``.seg.nrrd`` label file."""


def classes_from_segments(
    labels: np.ndarray, segments: Mapping[int, str], label_names: Sequence[str], *, where: str
) -> np.ndarray:
    """A ``.seg.nrrd``'s label values as class indices, matched by segment name.

    Each segment named in ``label_names`` becomes its class (1..N), whatever label value Slicer
    gave it; a segment named :data:`BACKGROUND_SEGMENT` becomes 0, and then a voxel in no segment
    is :data:`UNKNOWN`. Segments with none of the run's names (Slicer's "Segment_1"...) keep their
    values as class indices, as a plain label map's.

    Args:
        labels: the file's label values.
        segments: label value -> segment name, from the file's header (empty: a plain label map).
        label_names: the run's structures (``data.label_names``), class 1 first.
        where: names the file (and CSV row) in errors.

    Raises:
        DataError: for a segment whose name is not among ``label_names`` when others are.
    """
    background = {value for value, name in segments.items() if name.strip().lower() == BACKGROUND_SEGMENT}
    structures = {value: name for value, name in segments.items() if value not in background}
    if not background and not any(name in label_names for name in structures.values()):
        return labels
    strangers = sorted({name for name in structures.values() if name not in label_names})
    if strangers:
        raise DataError(
            f"{where}: segment(s) {', '.join(map(repr, strangers))} are not among data.label_names "
            f"({', '.join(label_names)}); rename them, or add them to label_names"
        )
    labels = np.asarray(labels)
    lookup = np.arange(max(UNKNOWN, int(labels.max(initial=0))) + 1, dtype=np.int64)
    lookup[0] = UNKNOWN if background else 0
    for value in background:
        lookup[value] = 0
    for value, name in structures.items():
        lookup[value] = list(label_names).index(name) + 1
    return lookup[labels].astype(labels.dtype if labels.dtype.itemsize > 1 else np.uint8)
