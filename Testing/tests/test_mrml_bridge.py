"""The MRML bridge on real MRML (slicer-core): geometry and label values survive round trips."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="the MRML bridge tests need slicer-core")

_EXTENSION_DIR = Path(__file__).resolve().parents[2] / "MedTLExtension"
if str(_EXTENSION_DIR) not in sys.path:
    sys.path.insert(0, str(_EXTENSION_DIR))

import slicer  # noqa: E402
from MedTLExtensionLib.headless_scene import create_headless_scene  # noqa: E402
from MedTLExtensionLib.mrml_bridge import (  # noqa: E402
    LABEL_VALUE_TAG,
    MAX_LABEL_VALUE,
    array_to_volume,
    labelmap_to_segmentation,
    segmentation_to_labelmap,
    volume_to_array,
)
from vtkmodules.util import numpy_support  # noqa: E402
from vtkmodules.vtkCommonCore import reference, vtkStringArray  # noqa: E402
from vtkmodules.vtkCommonMath import vtkMatrix4x4  # noqa: E402

SHAPE = (9, 11, 13)  # K, J, I: deliberately unequal so that an axis swap changes the shape
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (12.5, -30.25, 7.0)
SEGMENTS = [
    (2, "liver", (0.85, 0.55, 0.35)),
    (5, "tumour", (0.2, 0.75, 0.3)),
]
BINARY_LABELMAP = "Binary labelmap"


def oblique_ijk_to_ras() -> np.ndarray:
    """30 degrees about the S axis, then 10 degrees about R, anisotropic spacing, offset origin."""
    a, b = np.deg2rad(30.0), np.deg2rad(10.0)
    about_s = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    about_r = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    matrix = np.eye(4)
    matrix[:3, :3] = about_r @ about_s @ np.diag(SPACING)
    matrix[:3, 3] = ORIGIN
    return matrix


@pytest.fixture
def headless():
    return create_headless_scene()


@pytest.fixture
def reference_volume(headless):
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    return array_to_volume(headless.scene, image, oblique_ijk_to_ras(), "CT")


def sparse_labels() -> np.ndarray:
    """Labels 2 (a block in the middle) and 5 (a few voxels in the far corner only)."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:6, 4:8, 2:9] = 2
    labels[-1, -2:, -2:] = 5
    labels[-2, -1, -1] = 5
    return labels


def segment_ids(node) -> list[str]:
    ids = vtkStringArray()
    node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def tag_of(segment) -> str | None:
    value = reference("")
    return str(value) if segment.GetTag(LABEL_VALUE_TAG, value) else None


def snapshot(node) -> list[tuple]:
    """Everything a segment is made of: id, name, colour, tag, label value, voxels, geometry."""
    state = []
    for segment_id in segment_ids(node):
        segment = node.GetSegmentation().GetSegment(segment_id)
        image = segment.GetRepresentation(BINARY_LABELMAP)
        matrix = vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).copy()
        state.append(
            (
                segment_id,
                segment.GetName(),
                tuple(segment.GetColor()),
                tag_of(segment),
                segment.GetLabelValue(),
                image.GetExtent(),
                voxels.dtype.str,
                voxels.tobytes(),
                slicer.util.arrayFromVTKMatrix(matrix).tobytes(),
            )
        )
    return state


def test_volume_round_trip_keeps_voxels_and_oblique_anisotropic_geometry(headless):
    matrix = oblique_ijk_to_ras()
    image = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)

    node = array_to_volume(headless.scene, image, matrix, "oblique")

    np.testing.assert_allclose(node.GetSpacing(), SPACING, rtol=0, atol=1e-12)
    np.testing.assert_allclose(node.GetOrigin(), ORIGIN, rtol=0, atol=1e-12)
    back, back_matrix = volume_to_array(node)
    assert back.dtype == image.dtype
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back, image)
    np.testing.assert_allclose(back_matrix, matrix, rtol=0, atol=1e-12)

    # The returned array is a copy: changing it leaves the node alone.
    back[0, 0, 0] = 1e6
    assert volume_to_array(node)[0][0, 0, 0] == image[0, 0, 0]

    # Updating the node in place replaces voxels, shape and geometry.
    smaller = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    other_matrix = np.diag([1.5, 1.5, 3.0, 1.0])
    assert array_to_volume(headless.scene, smaller, other_matrix, "updated", node=node) is node
    again, again_matrix = volume_to_array(node)
    np.testing.assert_array_equal(again, smaller)
    np.testing.assert_allclose(again_matrix, other_matrix, rtol=0, atol=1e-12)
    assert node.GetName() == "updated"
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


def test_array_to_volume_rejects_bad_input(headless):
    with pytest.raises(ValueError, match="3D"):
        array_to_volume(headless.scene, np.zeros((4, 4)), np.eye(4), "flat")
    with pytest.raises(ValueError, match="4x4"):
        array_to_volume(headless.scene, np.zeros((2, 2, 2)), np.eye(3), "bad matrix")
    with pytest.raises(ValueError, match="singular"):
        array_to_volume(headless.scene, np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]), "flat voxel")


def test_labelmap_segmentation_round_trip_keeps_values_names_colours_and_grid(headless, reference_volume):
    labels = sparse_labels()
    matrix = oblique_ijk_to_ras()

    node = labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        labels,
        matrix,
        SEGMENTS,
        reference_volume=reference_volume,
    )

    ids = segment_ids(node)
    assert len(ids) == 2
    for segment_id, (value, name, color) in zip(ids, SEGMENTS, strict=True):
        segment = node.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == name
        np.testing.assert_allclose(segment.GetColor(), color, atol=1e-12)
        assert tag_of(segment) == str(value)
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is reference_volume

    back, exported = segmentation_to_labelmap(headless.scene, headless.segmentations_logic, node, reference_volume)
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back, labels)
    assert [(value, name) for value, name, _ in exported] == [(value, name) for value, name, _ in SEGMENTS]
    for (_, _, got), (_, _, want) in zip(exported, SEGMENTS, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)

    # The corner segment alone still comes back on the whole grid, at its own voxels:
    # an export cropped to the segment's bounds would have a different shape.
    corner_only, corner_segments = segmentation_to_labelmap(
        headless.scene, headless.segmentations_logic, node, reference_volume, segment_ids=[ids[1]]
    )
    assert corner_only.shape == SHAPE
    np.testing.assert_array_equal(corner_only, np.where(labels == 5, 5, 0))
    assert [value for value, _, _ in corner_segments] == [5]


def test_export_numbers_untagged_segments_and_places_a_cropped_segment(headless, reference_volume):
    """A hand-painted segment is stored cropped to its bounds; it must land on its own voxels."""
    matrix = oblique_ijk_to_ras()
    node = labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        sparse_labels(),
        matrix,
        SEGMENTS,
        reference_volume=reference_volume,
    )
    # Two segments painted in Slicer: no MedTL tag, each a small image with a nonzero extent start.
    painted = np.zeros(SHAPE, np.uint8)
    for name, (k, j, i) in [("painted A", (0, 0, 0)), ("painted B", (1, 8, 10))]:
        block = np.ones((2, 3, 3), np.uint8)
        image = slicer.vtkOrientedImageData()
        image.SetExtent(i, i + 2, j, j + 2, k, k + 1)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(block.ravel(), deep=True))
        image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(matrix))
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.AddRepresentation(BINARY_LABELMAP, image)
        assert node.GetSegmentation().AddSegment(segment, "")
        painted[k : k + 2, j : j + 3, i : i + 3] = len(segment_ids(node)) - 2

    labels, exported = segmentation_to_labelmap(headless.scene, headless.segmentations_logic, node, reference_volume)

    # Tagged segments keep 2 and 5; the untagged ones get the smallest free values, 1 and 3.
    assert [(value, name) for value, name, _ in exported] == [
        (2, "liver"),
        (5, "tumour"),
        (1, "painted A"),
        (3, "painted B"),
    ]
    expected = sparse_labels()
    expected[painted == 1] = 1
    expected[painted == 2] = 3
    np.testing.assert_array_equal(labels, expected)


def test_label_without_voxels_still_becomes_a_segment(headless, reference_volume):
    segments = [*SEGMENTS, (9, "vessel", (0.1, 0.2, 0.9))]
    node = labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        sparse_labels(),
        oblique_ijk_to_ras(),
        segments,
        reference_volume=reference_volume,
    )

    ids = segment_ids(node)
    assert [node.GetSegmentation().GetSegment(i).GetName() for i in ids] == ["liver", "tumour", "vessel"]
    assert tag_of(node.GetSegmentation().GetSegment(ids[2])) == "9"
    labels, exported = segmentation_to_labelmap(
        headless.scene, headless.segmentations_logic, node, reference_volume, segment_ids=[ids[2]]
    )
    assert exported[0][:2] == (9, "vessel")
    assert labels.shape == SHAPE and not labels.any()


def test_clear_errors_for_bad_input(headless, reference_volume):
    logic = headless.segmentations_logic
    matrix = oblique_ijk_to_ras()
    labels = sparse_labels()

    with pytest.raises(ValueError, match="shape"):
        labelmap_to_segmentation(
            headless.scene, logic, labels[:-1], matrix, SEGMENTS, reference_volume=reference_volume
        )
    with pytest.raises(ValueError, match="not listed"):
        labelmap_to_segmentation(headless.scene, logic, labels, matrix, SEGMENTS[:1])
    with pytest.raises(ValueError, match="out of range"):
        labelmap_to_segmentation(headless.scene, logic, labels, matrix, [*SEGMENTS, (40000, "x", (1, 0, 0))])
    with pytest.raises(ValueError, match="out of range"):
        labelmap_to_segmentation(headless.scene, logic, labels, matrix, [*SEGMENTS, (0, "x", (1, 0, 0))])
    with pytest.raises(ValueError, match="listed twice"):
        labelmap_to_segmentation(headless.scene, logic, labels, matrix, [*SEGMENTS, (2, "again", (1, 0, 0))])
    with pytest.raises(ValueError, match="colour"):
        labelmap_to_segmentation(headless.scene, logic, labels, matrix, [(2, "liver", (255, 0, 0)), SEGMENTS[1]])
    with pytest.raises(ValueError, match="differs"):
        labelmap_to_segmentation(headless.scene, logic, labels, np.eye(4), SEGMENTS, reference_volume=reference_volume)
    # None of the failed calls left a segmentation node behind.
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0

    node = labelmap_to_segmentation(headless.scene, logic, labels, matrix, SEGMENTS)
    with pytest.raises(ValueError, match="unknown segment IDs"):
        segmentation_to_labelmap(headless.scene, logic, node, reference_volume, segment_ids=["no-such-id"])
    node.GetSegmentation().GetSegment(segment_ids(node)[0]).SetTag(LABEL_VALUE_TAG, "5")
    with pytest.raises(ValueError, match="both have label value 5"):
        segmentation_to_labelmap(headless.scene, logic, node, reference_volume)


def test_second_segmentation_leaves_the_first_bit_identical(headless, reference_volume):
    logic = headless.segmentations_logic
    matrix = oblique_ijk_to_ras()
    first = labelmap_to_segmentation(
        headless.scene,
        logic,
        sparse_labels(),
        matrix,
        SEGMENTS,
        reference_volume=reference_volume,
        name="first",
    )
    before = snapshot(first)

    other = np.zeros(SHAPE, np.uint8)
    other[:, :, :4] = 2
    other[2, 2, 2] = 5
    second = labelmap_to_segmentation(
        headless.scene, logic, other, matrix, SEGMENTS, reference_volume=reference_volume, name="second"
    )
    # Replacing the second one's content in place must not reach the first either.
    labelmap_to_segmentation(
        headless.scene,
        logic,
        np.full(SHAPE, 5, np.uint8),
        matrix,
        SEGMENTS,
        reference_volume=reference_volume,
        node=second,
    )

    assert second is not first
    assert snapshot(first) == before
    first_labels, _ = segmentation_to_labelmap(headless.scene, logic, first, reference_volume)
    np.testing.assert_array_equal(first_labels, sparse_labels())
    second_labels, _ = segmentation_to_labelmap(headless.scene, logic, second, reference_volume)
    assert (second_labels == 5).all()


def test_replacing_a_segmentation_keeps_segment_ids_of_relisted_values(headless, reference_volume):
    logic = headless.segmentations_logic
    matrix = oblique_ijk_to_ras()
    node = labelmap_to_segmentation(
        headless.scene, logic, sparse_labels(), matrix, SEGMENTS, reference_volume=reference_volume
    )
    old_ids = segment_ids(node)

    relabelled = np.where(sparse_labels() == 2, 7, sparse_labels()).astype(np.uint8)
    labelmap_to_segmentation(
        headless.scene,
        logic,
        relabelled,
        matrix,
        [(5, "tumour", (1.0, 0.0, 0.0)), (7, "organ", (0, 0, 1))],
        reference_volume=reference_volume,
        node=node,
    )

    new_ids = segment_ids(node)
    assert new_ids[0] == old_ids[1]  # value 5 keeps its segment ID, now first
    assert old_ids[0] not in new_ids  # value 2 is gone
    labels, exported = segmentation_to_labelmap(headless.scene, logic, node, reference_volume)
    np.testing.assert_array_equal(labels, relabelled)
    assert [value for value, _, _ in exported] == [5, 7]


def test_label_values_above_255_survive_up_to_the_maximum(headless, reference_volume):
    labels = sparse_labels().astype(np.int32)
    labels[labels == 2] = 300
    labels[labels == 5] = MAX_LABEL_VALUE
    segments = [(300, "many", (1.0, 0.0, 0.0)), (MAX_LABEL_VALUE, "last", (0.0, 1.0, 0.0))]
    node = labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        labels,
        oblique_ijk_to_ras(),
        segments,
        reference_volume=reference_volume,
    )

    back, exported = segmentation_to_labelmap(headless.scene, headless.segmentations_logic, node, reference_volume)

    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, labels)
    assert [value for value, _, _ in exported] == [300, MAX_LABEL_VALUE]


def test_segmentation_follows_a_transformed_reference_volume(headless, reference_volume):
    transform = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = (15.0, -4.0, 8.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    reference_volume.SetAndObserveTransformNodeID(transform.GetID())
    labels = sparse_labels()

    node = labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        labels,
        oblique_ijk_to_ras(),
        SEGMENTS,
        reference_volume=reference_volume,
    )

    assert node.GetTransformNodeID() == transform.GetID()
    back, _ = segmentation_to_labelmap(headless.scene, headless.segmentations_logic, node, reference_volume)
    np.testing.assert_array_equal(back, labels)
