"""Move images and label maps between MRML nodes and numpy arrays, geometry included.

Arrays are in Slicer's voxel order, KJI (``array[k, j, i]``), as
``slicer.util.arrayFromVolume`` gives them; geometry is the 4x4 IJK->RAS matrix, which
holds spacing, origin and direction (oblique directions included).

A label value never changes meaning on the way between a label array and a segmentation:
each segment created here carries its value in the segment tag ``MedTL.LabelValue``, and
the export writes exactly that value back, on exactly the reference volume's grid.

This module needs MRML but not Qt: the scene and the module logics are passed in, so it
runs inside Slicer and on the ``slicer-core`` wheel alike.

Example:
    >>> array, ijk_to_ras = volume_to_array(volume_node)
    >>> segmentation = labelmap_to_segmentation(
    ...     scene, segmentations_logic, prediction, ijk_to_ras,
    ...     [(1, "liver", (0.9, 0.6, 0.4)), (2, "tumour", (0.3, 0.8, 0.3))],
    ...     reference_volume=volume_node,
    ... )
    >>> labels, segments = segmentation_to_labelmap(
    ...     scene, segmentations_logic, segmentation, volume_node
    ... )
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer
import slicer.util
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import reference, vtkIntArray, vtkStringArray
from vtkmodules.vtkCommonMath import vtkMatrix4x4

__all__ = [
    "LABEL_VALUE_TAG",
    "MAX_LABEL_VALUE",
    "SegmentSpec",
    "array_to_volume",
    "ijk_to_ras_of",
    "labelmap_to_segmentation",
    "list_segment_ids",
    "replace_segment_voxels",
    "segmentation_to_labelmap",
    "volume_to_array",
]

LABEL_VALUE_TAG = "MedTL.LabelValue"
"""Segment tag that stores the label value a segment stands for."""

MAX_LABEL_VALUE = 32767
"""Largest label value: Slicer merges segments into a signed 16-bit image and clamps above."""

SegmentSpec = tuple[int, str, tuple[float, float, float]]
"""One segment: (label value, name, (r, g, b) with components in 0..1)."""

# Matrices come back from VTK in double precision; the tolerance only absorbs round-off.
_GEOMETRY_ATOL = 1e-5


def volume_to_array(volume_node: slicer.vtkMRMLScalarVolumeNode) -> tuple[np.ndarray, np.ndarray]:
    """Copy a volume's voxels and its IJK->RAS matrix into numpy.

    The matrix is the node's own; a parent transform, if any, is not applied.

    Args:
        volume_node: A scalar (or label map) volume node holding image data.

    Returns:
        ``(array, ijk_to_ras)``: the voxels in KJI order (a copy, so changing it leaves the
        node alone) and the 4x4 IJK->RAS matrix.

    Raises:
        ValueError: If the node is missing or holds no image data.

    Example:
        >>> array, ijk_to_ras = volume_to_array(volume_node)
        >>> array.shape  # (slices, rows, columns)
        (40, 128, 128)
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("volume_node holds no image data")
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    return array, ijk_to_ras_of(volume_node)


def array_to_volume(
    scene: slicer.vtkMRMLScene,
    array: np.ndarray,
    ijk_to_ras: np.ndarray,
    name: str,
    node: slicer.vtkMRMLScalarVolumeNode | None = None,
) -> slicer.vtkMRMLScalarVolumeNode:
    """Create or update a scalar volume node from a KJI array and an IJK->RAS matrix.

    Spacing, origin and (possibly oblique) directions all come from the matrix.

    Args:
        scene: Scene to add a new node to.
        array: Voxels, shape ``(K, J, I)``. 64-bit integers are stored as 32-bit (Slicer
            does not display 64-bit volumes) and booleans as ``uint8``.
        ijk_to_ras: 4x4 IJK->RAS matrix.
        name: Name of the node.
        node: Existing volume node to overwrite; a new node is added to ``scene`` if None.

    Returns:
        The volume node.

    Raises:
        ValueError: If the array is not 3D, the matrix is not a valid 4x4 affine, 64-bit
            integer voxels do not fit in 32 bits, or ``node`` is not a scalar volume node.

    Example:
        >>> node = array_to_volume(scene, probabilities, ijk_to_ras, "liver probability")
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"array must be 3D (K, J, I), got shape {array.shape}")
    matrix = _checked_matrix(ijk_to_ras, "ijk_to_ras")
    array = _storable_voxels(array)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        created = True
    else:
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(f"node {node.GetID()} is a {node.GetClassName()}, not a scalar volume node")
        node.SetName(name)
        created = False

    was_modifying = node.StartModify()
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(node, array)
    node.EndModify(was_modifying)
    if created or node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def labelmap_to_segmentation(
    scene: slicer.vtkMRMLScene,
    segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic,
    label_array: np.ndarray,
    ijk_to_ras: np.ndarray,
    segments: Sequence[SegmentSpec],
    reference_volume: slicer.vtkMRMLScalarVolumeNode | None = None,
    node: slicer.vtkMRMLSegmentationNode | None = None,
    name: str = "MedTL segmentation",
) -> slicer.vtkMRMLSegmentationNode:
    """Create or replace a segmentation from a label array, one segment per label value.

    Segments appear in the order of ``segments``, with the given names and colours, and
    each stores its label value in the tag :data:`LABEL_VALUE_TAG`. A listed value with no
    voxels still gets an (empty) segment. All segments share one labelmap layer, as
    Slicer's own import does.

    Args:
        scene: Scene to add a new node to.
        segmentations_logic: Logic of the Segmentations module (``slicer.modules.
            segmentations.logic()`` in Slicer). The import itself needs only MRML; the
            argument keeps the signature in step with :func:`segmentation_to_labelmap`.
        label_array: Integer labels, shape ``(K, J, I)``; 0 is background. Floating point
            arrays are accepted when every value is an integer.
        ijk_to_ras: 4x4 IJK->RAS matrix of ``label_array``.
        segments: Ordered ``(label value, name, (r, g, b))`` entries; values are unique, in
            ``1..MAX_LABEL_VALUE``, and every nonzero value in ``label_array`` is listed.
        reference_volume: Volume whose grid the label array is on. It becomes the
            segmentation's reference geometry, and its parent transform, if any, the
            segmentation's. If None, the geometry of ``label_array`` is used.
        node: Segmentation node to overwrite (its segments are replaced; a segment whose
            label value is listed again keeps its segment ID). A new node is added if None.
        name: Name of a new node; ignored when ``node`` is given.

    Returns:
        The segmentation node. No other segmentation node is modified.

    Raises:
        ValueError: For a non-3D or non-integer array, a bad matrix, invalid or duplicate
            label values, values in the array that are not listed, colours outside 0..1, a
            reference volume whose grid differs from the array's, or a ``node`` that is not
            a segmentation node.

    Example:
        >>> segmentation = labelmap_to_segmentation(
        ...     scene, segmentations_logic, prediction, ijk_to_ras,
        ...     [(1, "liver", (0.9, 0.6, 0.4)), (2, "tumour", (0.3, 0.8, 0.3))],
        ...     reference_volume=volume_node,
        ... )
    """
    labels = _integer_labels(label_array)
    matrix = _checked_matrix(ijk_to_ras, "ijk_to_ras")
    specs = _checked_segments(segments)
    _check_all_values_listed(labels, specs)
    if reference_volume is not None:
        _check_same_grid(reference_volume, labels.shape, matrix)
    if node is not None and not node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"node {node.GetID()} is a {node.GetClassName()}, not a segmentation node")
    if segmentations_logic is None:
        raise ValueError("segmentations_logic is required")

    # A fresh image for every call: segments of different nodes must never share voxels,
    # otherwise editing one segmentation would change another.
    shared_labelmap = _oriented_image(labels, matrix)

    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()

    segmentation = node.GetSegmentation()
    was_modifying = node.StartModify()
    try:
        if reference_volume is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
            # The matrix is the volume's local IJK->RAS, so the segmentation must live in
            # the same frame as the volume to land on its voxels.
            node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        else:
            # A stale link to an earlier reference volume would contradict the new geometry.
            node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), None)
            extent = [0, labels.shape[2] - 1, 0, labels.shape[1] - 1, 0, labels.shape[0] - 1]
            segmentation.SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                slicer.vtkSegmentationConverter.SerializeImageGeometry(slicer.util.vtkMatrixFromArray(matrix), extent),
            )
        segmentation.SetSourceRepresentationName(_binary_labelmap_name())

        previous_ids = {}
        for segment_id in list_segment_ids(segmentation):
            try:
                value = _tagged_value(segmentation.GetSegment(segment_id))
            except ValueError:
                # A malformed tag only means that segment's ID is not reused.
                continue
            if value is not None:
                previous_ids.setdefault(value, segment_id)
        segmentation.RemoveAllSegments()

        for value, segment_name, color in specs:
            segment = slicer.vtkSegment()
            segment.SetName(segment_name)
            segment.SetColor(*color)
            segment.SetTag(LABEL_VALUE_TAG, str(value))
            segment.AddRepresentation(_binary_labelmap_name(), shared_labelmap)
            segment.SetLabelValue(value)
            if not segmentation.AddSegment(segment, previous_ids.get(value, "")):
                raise RuntimeError(f"Slicer refused to add segment {segment_name!r} (label {value})")
    finally:
        node.EndModify(was_modifying)
    return node


def segmentation_to_labelmap(
    scene: slicer.vtkMRMLScene,
    segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    reference_volume: slicer.vtkMRMLScalarVolumeNode,
    segment_ids: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[SegmentSpec]]:
    """Export segments to a label array on the reference volume's full grid.

    Each segment is written with the value in its :data:`LABEL_VALUE_TAG` tag. Segments
    without the tag (painted by hand, imported from elsewhere) get the smallest positive
    values not used by a tag, in segment order: 1..N when no segment is tagged. Where
    segments overlap, the later one wins. Segments are resampled if the segmentation is on
    another grid or under another transform than the reference volume.

    Args:
        scene: The scene holding the nodes (the export adds no node to it).
        segmentations_logic: Logic of the Segmentations module.
        segmentation_node: Segmentation to export; it is not modified, except that a
            binary labelmap representation is created if it has none (as Slicer's own
            export does).
        reference_volume: Volume whose grid (extent, spacing, origin, directions) the
            label array gets, uncropped.
        segment_ids: Segments to export, in this order; all segments if None.

    Returns:
        ``(label_array, segments)``: labels in KJI order with the reference volume's
        shape (``uint8`` when every value fits, else ``int16``), and the exported
        ``(value, name, (r, g, b))`` list in export order.

    Raises:
        ValueError: For an unknown segment ID, a tag that is not an integer in
            ``1..MAX_LABEL_VALUE``, two exported segments with the same label value, or a
            reference volume without image data.

    Example:
        >>> labels, segments = segmentation_to_labelmap(
        ...     scene, segmentations_logic, segmentation, volume_node
        ... )
        >>> segments[0]
        (1, 'liver', (0.9, 0.6, 0.4))
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError("segmentation_node must be a vtkMRMLSegmentationNode")
    if reference_volume is None or reference_volume.GetImageData() is None:
        raise ValueError("reference_volume holds no image data")
    if segmentations_logic is None:
        raise ValueError("segmentations_logic is required")
    segmentation = segmentation_node.GetSegmentation()
    existing = list_segment_ids(segmentation)
    if segment_ids is None:
        ids = existing
    else:
        ids = list(segment_ids)
        unknown = [segment_id for segment_id in ids if segment_id not in existing]
        if unknown:
            raise ValueError(
                f"unknown segment IDs {unknown} in segmentation {segmentation_node.GetName()!r}; it has {existing}"
            )
    exported = _export_values(segmentation, ids)

    dims_ijk = reference_volume.GetImageData().GetDimensions()
    shape = (dims_ijk[2], dims_ijk[1], dims_ijk[0])
    dtype = np.uint8 if all(value <= 255 for value, _, _ in exported) else np.int16
    labels = np.zeros(shape, dtype=dtype)
    if not ids or min(shape) == 0:
        return labels, exported

    if not segmentation.ContainsRepresentation(_binary_labelmap_name()):
        if not segmentation.CreateRepresentation(_binary_labelmap_name()):
            raise RuntimeError(f"segmentation {segmentation_node.GetName()!r} cannot be converted to a binary labelmap")

    id_array = vtkStringArray()
    value_array = vtkIntArray()
    for segment_id, (value, _, _) in zip(ids, exported, strict=True):
        id_array.InsertNextValue(segment_id)
        value_array.InsertNextValue(value)
    merged = slicer.vtkOrientedImageData()
    # The label values are handed over explicitly: the colour-table route matches segments
    # to colours by terminology, then by name, and renumbers whatever it cannot match.
    # EXTENT_REFERENCE_GEOMETRY keeps the whole grid instead of the segments' bounding box.
    segmentations_logic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node,
        reference_volume,
        id_array,
        slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        merged,
        value_array,
    )
    if merged.GetPointData().GetScalars() is None:
        raise RuntimeError(f"Slicer could not merge the segments of {segmentation_node.GetName()!r}")
    _paste_on_reference_grid(merged, labels, ijk_to_ras_of(reference_volume))
    return labels, exported


def replace_segment_voxels(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
    mask: np.ndarray,
    reference_volume: slicer.vtkMRMLScalarVolumeNode,
) -> None:
    """Replace the voxels of one existing segment with a mask on the reference volume's grid.

    The segment keeps its ID, name, colour and tags, and segments sharing its labelmap layer
    keep their voxels: this is the Segment Editor's own "replace" write.

    Args:
        segmentation_node: Segmentation holding the segment.
        segment_id: ID of the segment to overwrite.
        mask: Boolean (or 0/1) array in KJI order with the reference volume's shape.
        reference_volume: Volume whose grid ``mask`` is on.

    Raises:
        ValueError: For an unknown segment, or a mask whose shape is not the volume's.
    """
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}")
    matrix = ijk_to_ras_of(reference_volume)
    mask = np.asarray(mask)
    _check_same_grid(reference_volume, mask.shape, matrix)
    image = _oriented_image((mask != 0).astype(np.uint8), matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image,
        segmentation_node,
        segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
        image.GetExtent(),
    )


# --------------------------------------------------------------------------- helpers


def _binary_labelmap_name() -> str:
    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def ijk_to_ras_of(volume_node) -> np.ndarray:
    """The node's own 4x4 IJK->RAS matrix as numpy."""
    matrix = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _checked_matrix(matrix, what: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"{what} must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{what} holds non-finite values")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{what} must be affine (last row 0 0 0 1), got last row {matrix[3].tolist()}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError(f"{what} is singular (a zero spacing or collinear directions)")
    return matrix


def _storable_voxels(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"{array.dtype} voxels outside the int32 range cannot be stored in a volume")
        return array.astype(np.int32)
    return array


def _integer_labels(label_array) -> np.ndarray:
    labels = np.asarray(label_array)
    if labels.ndim != 3:
        raise ValueError(f"label_array must be 3D (K, J, I), got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise ValueError("label_array holds non-integer values")
    elif labels.dtype.kind not in "iu":
        raise ValueError(f"label_array must hold integers, got dtype {labels.dtype}")
    return labels


def _checked_segments(segments: Sequence[SegmentSpec]) -> list[SegmentSpec]:
    checked: list[SegmentSpec] = []
    seen: set[int] = set()
    for position, entry in enumerate(segments):
        try:
            value, segment_name, color = entry
        except (TypeError, ValueError):
            raise ValueError(f"segments[{position}] must be (label value, name, (r, g, b)), got {entry!r}") from None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"segments[{position}]: label value must be an integer, got {value!r}")
        value = int(value)
        if not 1 <= value <= MAX_LABEL_VALUE:
            raise ValueError(
                f"segments[{position}]: label value {value} is out of range 1..{MAX_LABEL_VALUE} (0 is background)"
            )
        if value in seen:
            raise ValueError(f"segments[{position}]: label value {value} is listed twice")
        seen.add(value)
        if not isinstance(segment_name, str) or not segment_name:
            raise ValueError(f"segments[{position}]: name must be a non-empty string, got {segment_name!r}")
        rgb = np.asarray(color, dtype=float)
        if rgb.shape != (3,) or not np.all((rgb >= 0.0) & (rgb <= 1.0)):
            raise ValueError(f"segments[{position}]: colour must be (r, g, b) in 0..1, got {color!r}")
        checked.append((value, segment_name, (float(rgb[0]), float(rgb[1]), float(rgb[2]))))
    return checked


def _check_all_values_listed(labels: np.ndarray, specs: list[SegmentSpec]) -> None:
    present = np.unique(labels)
    listed = {value for value, _, _ in specs}
    unlisted = [v.item() for v in present if v != 0 and v not in listed]
    if unlisted:
        shown = ", ".join(str(v) for v in unlisted[:10])
        more = f" and {len(unlisted) - 10} more" if len(unlisted) > 10 else ""
        raise ValueError(f"label_array holds label values not listed in segments: {shown}{more}")


def _check_same_grid(reference_volume, shape: tuple[int, ...], matrix: np.ndarray) -> None:
    image = reference_volume.GetImageData()
    if image is None:
        raise ValueError(f"reference volume {reference_volume.GetName()!r} holds no image data")
    dims = image.GetDimensions()
    reference_shape = (dims[2], dims[1], dims[0])
    if reference_shape != tuple(shape):
        raise ValueError(
            f"label_array shape {tuple(shape)} does not match reference volume "
            f"{reference_volume.GetName()!r} shape {reference_shape} (both K, J, I)"
        )
    reference_matrix = ijk_to_ras_of(reference_volume)
    if not np.allclose(reference_matrix, matrix, rtol=1e-6, atol=_GEOMETRY_ATOL):
        raise ValueError(
            f"ijk_to_ras differs from the IJK->RAS matrix of reference volume {reference_volume.GetName()!r}"
        )


def _oriented_image(labels: np.ndarray, matrix: np.ndarray):
    # uint8 is what Slicer's segment editor uses for up to 255 labels; int16 covers the
    # rest of the value range that Slicer's merged labelmaps can hold.
    dtype = np.uint8 if labels.size == 0 or int(labels.max()) <= 255 else np.int16
    flat = np.ascontiguousarray(labels, dtype=dtype).ravel()
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(labels.shape[2], labels.shape[1], labels.shape[0])
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(matrix))
    return image


def list_segment_ids(segmentation) -> list[str]:
    """Segment IDs of a ``vtkSegmentation``, in order."""
    ids = vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    return [ids.GetValue(index) for index in range(ids.GetNumberOfValues())]


def _tagged_value(segment) -> int | None:
    """The label value in a segment's tag; None when untagged, ValueError when malformed."""
    text = reference("")
    if not segment.GetTag(LABEL_VALUE_TAG, text):
        return None
    try:
        value = int(str(text))
    except ValueError:
        raise ValueError(
            f"segment {segment.GetName()!r} has tag {LABEL_VALUE_TAG}={str(text)!r}, not an integer"
        ) from None
    if not 1 <= value <= MAX_LABEL_VALUE:
        raise ValueError(f"segment {segment.GetName()!r} has label value {value}, out of range 1..{MAX_LABEL_VALUE}")
    return value


def _export_values(segmentation, ids: list[str]) -> list[SegmentSpec]:
    segments = [segmentation.GetSegment(segment_id) for segment_id in ids]
    tagged = [_tagged_value(segment) for segment in segments]
    owner: dict[int, str] = {}
    for segment, value in zip(segments, tagged, strict=True):
        if value is None:
            continue
        if value in owner:
            raise ValueError(f"segments {owner[value]!r} and {segment.GetName()!r} both have label value {value}")
        owner[value] = segment.GetName()

    exported: list[SegmentSpec] = []
    candidate = 1
    for segment, value in zip(segments, tagged, strict=True):
        if value is None:
            while candidate in owner:
                candidate += 1
            if candidate > MAX_LABEL_VALUE:
                raise ValueError(f"more than {MAX_LABEL_VALUE} segments cannot be exported")
            value = candidate
            owner[value] = segment.GetName()
        r, g, b = segment.GetColor()
        exported.append((value, segment.GetName(), (r, g, b)))
    return exported


def _paste_on_reference_grid(merged, labels: np.ndarray, reference_matrix: np.ndarray) -> None:
    """Copy ``merged`` into ``labels`` (the full reference grid) at its own extent.

    Slicer returns the reference extent here; pasting by extent keeps the result right
    even if a version returns a sub-extent, and the geometry check turns a silent shift
    into an error.
    """
    merged_matrix = vtkMatrix4x4()
    merged.GetImageToWorldMatrix(merged_matrix)
    if not np.allclose(slicer.util.arrayFromVTKMatrix(merged_matrix), reference_matrix, rtol=1e-6, atol=_GEOMETRY_ATOL):
        raise RuntimeError("Slicer exported the segments on a grid other than the reference volume's")
    i0, i1, j0, j1, k0, k1 = merged.GetExtent()
    values = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars())
    values = values.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    if values.size and int(values.max()) > np.iinfo(labels.dtype).max:
        raise RuntimeError("exported label values exceed the expected range")
    # Intersect the merged extent with the reference grid [0, shape).
    target = tuple(
        slice(max(lo, 0), min(hi + 1, size))
        for lo, hi, size in ((k0, k1, labels.shape[0]), (j0, j1, labels.shape[1]), (i0, i1, labels.shape[2]))
    )
    if any(s.start >= s.stop for s in target):
        return
    source = tuple(slice(s.start - lo, s.stop - lo) for s, lo in zip(target, (k0, j0, i0), strict=True))
    labels[target] = values[source]
