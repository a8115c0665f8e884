"""One canonical orientation for the network, any slice plane for 2D, and predictions back in
exactly the input's physical place, whatever plane the scanner acquired."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BrightIsObject, physical_centroid
from medtl.any_package import segment_image
from medtl.config import RunConfig
from medtl.data.geometry import from_canonical, orientation_of, to_canonical
from medtl.package import FORMAT_VERSION, ModelPackage, package_config


def sagittal_oblique_image() -> tuple[sitk.Image, np.ndarray]:
    """A sagittally acquired volume (I runs anterior-posterior, J superior-inferior, K left-right),
    tilted 15 degrees, with a bright box at a known place."""
    array = np.zeros((6, 20, 14), np.float32)  # K, J, I
    array[2:4, 5:9, 3:10] = 1.0
    image = sitk.GetImageFromArray(array)
    a = np.deg2rad(15)
    tilt = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    axes = np.array([[0, 0, -1], [-1, 0, 0], [0, -1, 0]], float)  # columns: i -> -y (A), j -> -z (I), k -> -x (R)
    image.SetDirection(tuple((tilt @ axes).flatten()))
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((40.0, -12.0, 95.0))
    return image, array


def test_reorientation_is_exact_and_undone_exactly():
    image, array = sagittal_oblique_image()
    assert orientation_of(image) != "LPS"
    canonical = to_canonical(image)
    assert orientation_of(canonical) == "LPS" and canonical.GetSize() != image.GetSize()
    # The same voxels, only the axes permuted and flipped: the box is where it was in space.
    moved = sitk.GetArrayFromImage(canonical)
    np.testing.assert_allclose(physical_centroid(canonical, moved > 0.5), physical_centroid(image, array > 0.5))
    back = from_canonical(canonical, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert back.GetDirection() == image.GetDirection() and back.GetOrigin() == image.GetOrigin()


@pytest.mark.parametrize(("plane", "slice_shape"), [("axial", (14, 6)), ("coronal", (20, 6)), ("sagittal", (20, 14))])
def test_a_2d_network_sees_slices_of_the_chosen_plane_and_its_prediction_lands_in_place(plane, slice_shape, tmp_path):
    image, array = sagittal_oblique_image()
    cfg = RunConfig.from_dict(
        {
            "data": {"label_names": ["box"]},
            "preprocessing": {"preset": "none", "slice_axis": plane},
            "model": {"pretrained": "none"},
        }
    )
    network = BrightIsObject()
    package = ModelPackage(
        path=tmp_path, manifest={"format_version": FORMAT_VERSION, "config": cfg.to_dict()}, model=network
    )
    labels, probs = segment_image(package, image)
    # Canonical (z, y, x) = (S, P, L): J (20 voxels) runs superior-inferior, I (14) anterior-posterior,
    # K (6) left-right; an axial slice is then 14 x 6, a coronal one 20 x 6, a sagittal one 20 x 14.
    assert {shape for shape in network.seen} == {slice_shape}
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(labels, attr)() == getattr(image, attr)()
    predicted = sitk.GetArrayFromImage(labels)
    np.testing.assert_array_equal(predicted, (array > 0.5).astype(np.uint8))
    assert probs.shape == (2, *array.shape)
    np.testing.assert_allclose(physical_centroid(labels, predicted == 1), physical_centroid(image, array > 0.5))


def test_packages_from_before_reorientation_keep_their_files_axis_order():
    cfg = RunConfig.from_dict({"model": {"pretrained": "none"}}).to_dict()
    del cfg["preprocessing"]["orientation"]
    assert package_config({"format_version": 1, "config": cfg}).preprocessing.orientation == "as_stored"
    assert package_config({"format_version": 2, "config": cfg}).preprocessing.orientation == "canonical"
