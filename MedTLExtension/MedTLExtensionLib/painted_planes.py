"""Which slices the user painted in, in whatever view: the planes behind a painted mask.

Slicer's Segment Editor paints in the slice view the user looks at. A stroke in the axial view
of an axial scan lies in one K slice; the same stroke in the sagittal view lies in one I slice.
Each painted slice is taken as fully annotated (what was not painted there is background); the
other slices say nothing (unknown). So the bridge needs the planes, not only the voxels.

:func:`find_planes` explains a mask as few whole slices along the array axes: repeatedly the
slice holding most of the still unexplained voxels, until none is left. A painted plane holds
an area; an orthogonal slice crosses it in a line, so areas win. A stroke on a view that is
oblique to the volume's axes lies in no array slice: it is split into thin bands on consecutive
slices that tile it without overlapping, which genuine neighbouring painted slices do not, and
that is reported as :class:`ObliquePaintingError`.

Pure numpy: no Slicer needed.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((6, 8, 8), bool)
    >>> mask[2, 1:6, 1:6] = True   # an axial stroke
    >>> mask[1:5, 1:7, 4] = True   # a sagittal stroke
    >>> sorted(find_planes(mask))
    [(0, 2), (2, 4)]
"""

from __future__ import annotations

import numpy as np

Plane = tuple[int, int]
"""(array axis, index): the slice ``array[index]`` along that axis (KJI order: 0 = K)."""

# Consecutive slices along one axis whose painted areas overlap less than this (in projection)
# are bands of one oblique stroke rather than neighbouring painted slices.
_MIN_NEIGHBOUR_OVERLAP = 0.5


class ObliquePaintingError(ValueError):
    """A stroke lies in no slice of the volume's grid (painted on an oblique or rotated view)."""


def find_planes(mask: np.ndarray) -> set[Plane]:
    """The slices (axis, index) that together hold every painted voxel of ``mask``.

    Raises:
        ObliquePaintingError: when part of the mask lies in no slice of the grid.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return set()
    # Work in the bounding box: painting is small next to the volume.
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    left = mask[box].copy()
    offsets = [b.start for b in box]
    planes: set[Plane] = set()
    per_axis = [0, 0, 0]
    while left.any():
        best = None
        for axis in range(left.ndim):
            other = tuple(a for a in range(left.ndim) if a != axis)
            counts = left.sum(axis=other)
            index = int(counts.argmax())
            # Ties (a dot, a line) go to the axis the user has been painting along, then to K.
            key = (int(counts[index]), per_axis[axis], -axis)
            if best is None or key > best[0]:
                best = (key, axis, index)
        _key, axis, index = best
        cut = [slice(None)] * left.ndim
        cut[axis] = index
        left[tuple(cut)] = False
        planes.add((axis, index + offsets[axis]))
        per_axis[axis] += 1
    _check_not_oblique(mask, planes)
    return planes


def plane_index(plane: Plane, ndim: int = 3) -> tuple:
    """The numpy index of a plane: ``array[plane_index(p)]`` is that slice."""
    axis, index = plane
    cut: list = [slice(None)] * ndim
    cut[axis] = index
    return tuple(cut)


def dominant_axis(planes: set[Plane], mask: np.ndarray) -> int:
    """The axis most planes lie along (ties: the one holding more painted voxels, then K)."""
    mask = np.asarray(mask, bool)
    scores = []
    for axis in range(mask.ndim):
        on_axis = [i for a, i in planes if a == axis]
        voxels = sum(int(mask[plane_index((axis, i), mask.ndim)].sum()) for i in on_axis)
        scores.append((len(on_axis), voxels, -axis))
    return max(range(mask.ndim), key=lambda axis: scores[axis])


def _check_not_oblique(mask: np.ndarray, planes: set[Plane]) -> None:
    for axis in range(mask.ndim):
        indices = sorted(i for a, i in planes if a == axis)
        for first, second in zip(indices, indices[1:], strict=False):
            if second != first + 1:
                continue
            a = mask[plane_index((axis, first), mask.ndim)]
            b = mask[plane_index((axis, second), mask.ndim)]
            smaller = min(int(a.sum()), int(b.sum()))
            # Dots and short lines are too small to tell a band from a slice.
            if smaller >= 8 and int((a & b).sum()) < _MIN_NEIGHBOUR_OVERLAP * smaller:
                raise ObliquePaintingError(
                    f"the painting around slice {first} of array axis {axis} lies in no slice of the volume: it "
                    "was painted on a view that is oblique to the volume's axes. Align the slice views with the "
                    "volume (slice view menu: 'Rotate to volume plane') and paint again"
                )
