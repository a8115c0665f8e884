"""Voxel grids: one canonical orientation for the network, the same grid for image and label.

The engine reorients every image to :data:`CANONICAL` (SimpleITK's ``DICOMOrient``: axes
permuted and flipped, never resampled), so array axis 0 runs inferior to superior (axial
slices), axis 1 anterior to posterior (coronal) and axis 2 right to left (sagittal), whatever
plane the scanner acquired. A 2D network slices along one of them (``preprocessing.slice_axis``),
and predictions go back to the input's own grid exactly.

Torch-free: the Slicer side may import it.

Example:
    >>> import numpy as np, SimpleITK as sitk
    >>> image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32))
    >>> image.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))  # a sagittal acquisition
    >>> sitk.GetArrayFromImage(to_canonical(image)).shape
    (3, 4, 2)
    >>> from_canonical(to_canonical(image), image).GetDirection() == image.GetDirection()
    True
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medtl.errors import DataError

CANONICAL = "LPS"
"""i towards the patient's left, j towards posterior, k towards superior: ITK's identity direction."""

SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
"""The array axis (z, y, x) of a canonically oriented image that each slice plane is normal to."""

# Physical tolerances for "the same grid": round-off of files written by other tools, not a shift.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


def orientation_of(image: sitk.Image) -> str:
    """The three-letter orientation code (``"LPS"``, ``"PSL"``...) of a 3D image's axes."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image: sitk.Image) -> sitk.Image:
    """The image with its axes permuted and flipped into :data:`CANONICAL` (no resampling)."""
    if image.GetDimension() != 3 or orientation_of(image) == CANONICAL:
        return image
    return sitk.DICOMOrient(image, CANONICAL)


def from_canonical(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """An image on a reoriented copy of ``reference``'s grid (:func:`to_canonical`) back on
    ``reference``'s grid: its axis order, its flips and exactly its geometry (copied, so no
    round-off reaches a written file). An image already in ``reference``'s orientation only gets
    the exact geometry."""
    if image.GetDimension() != 3:
        return image
    wanted = orientation_of(reference)
    back = image if orientation_of(image) == wanted else sitk.DICOMOrient(image, wanted)
    if back.GetSize() != reference.GetSize():
        raise ValueError(f"grid {back.GetSize()} does not go back onto {reference.GetSize()}")
    back.CopyInformation(reference)
    return back


def canonical_array(array: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """A (z, y, x) array on ``reference``'s grid, reoriented as :func:`to_canonical` reorients it."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(reference)
    return sitk.GetArrayFromImage(to_canonical(image))


def canonical_slice(image: sitk.Image, axis: int, index: int) -> tuple[int, int]:
    """Where slice ``index`` along array axis ``axis`` (z, y, x) of ``image`` lies in the image
    reoriented by :func:`to_canonical`: its array axis and index there.

    DICOMOrient gives each image axis the canonical axis its direction runs closest to, flipped
    when it runs the other way; a slice stays a slice.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    column = 2 - axis  # SimpleITK orders axes (x, y, z), arrays (z, y, x)
    lps = int(np.argmax(np.abs(direction[:, column])))
    flipped = direction[lps, column] < 0
    return 2 - lps, image.GetSize()[column] - 1 - index if flipped else index


def slice_on_input_grid(
    plane: np.ndarray, canonical_axis: int, canonical_index: int, grid: sitk.Image, image: sitk.Image
) -> np.ndarray:
    """A 2D array on slice ``canonical_index`` along ``canonical_axis`` of ``grid`` (``image``
    reoriented by :func:`to_canonical`), as the matching slice of ``image``'s own array."""
    volume = np.zeros(sitk.GetArrayViewFromImage(grid).shape, plane.dtype)
    np.moveaxis(volume, canonical_axis, 0)[canonical_index] = plane
    back = sitk.GetArrayFromImage(from_canonical(_like(volume, grid), image))
    # The slice's own axis in the input: the one whose canonical axis is ``canonical_axis``.
    for axis in range(3):
        found_axis, found_index = canonical_slice(image, axis, 0)
        if found_axis == canonical_axis:
            index = canonical_index if found_index == 0 else image.GetSize()[2 - axis] - 1 - canonical_index
            return np.ascontiguousarray(np.moveaxis(back, axis, 0)[index])
    raise ValueError(f"no axis of the image maps onto canonical axis {canonical_axis}")


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def grid_difference(image: sitk.Image, other: sitk.Image) -> str | None:
    """What differs between two images' voxel grids beyond round-off (size, spacing, origin,
    direction), or None when they are the same grid."""
    if image.GetSize() != other.GetSize():
        return f"size {other.GetSize()} instead of {image.GetSize()}"
    spacing, other_spacing = np.array(image.GetSpacing()), np.array(other.GetSpacing())
    if not np.allclose(spacing, other_spacing, rtol=SPACING_RTOL, atol=0):
        return f"spacing {_fmt(other_spacing)} instead of {_fmt(spacing)} mm"
    if not np.allclose(image.GetOrigin(), other.GetOrigin(), rtol=0, atol=ORIGIN_ATOL_MM):
        return f"origin {_fmt(other.GetOrigin())} instead of {_fmt(image.GetOrigin())} mm"
    if not np.allclose(image.GetDirection(), other.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
        return f"direction {_fmt(other.GetDirection())} instead of {_fmt(image.GetDirection())}"
    return None


def label_on_image_grid(
    image: sitk.Image, label: sitk.Image, *, where: str, resample: bool, unknown: int
) -> sitk.Image:
    """The label on the image's grid: the label itself when the grids agree; resampled (nearest
    neighbour, ``unknown`` outside the label's extent) when ``resample``; else a DataError that
    says ``where`` and what differs."""
    difference = grid_difference(image, label)
    if difference is None:
        # Round-off only: take the image's exact geometry so later steps see one grid.
        label = sitk.Image(label)
        label.CopyInformation(image)
        return label
    if not resample:
        raise DataError(
            f"{where}: the label's grid differs from the image's ({difference}); fix the label file, or set "
            "data.resample_labels to true to resample it onto the image"
        )
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, float(unknown), label.GetPixelID())


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
