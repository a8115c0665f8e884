import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_direction, synthetic_case
from medtl.data.io import atomic_path, read_image, read_segment_names, write_image, write_segmentation
from medtl.errors import DataError


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha", ".seg.nrrd"])
def test_geometry_round_trip_oblique(tmp_path, ext):
    image, _ = synthetic_case(0)
    assert not np.allclose(image.GetDirection(), np.eye(3).flatten())
    write_image(image, tmp_path / f"x{ext}")
    back = read_image(tmp_path / f"x{ext}")
    _same_geometry(image, back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_dicom_series_directory(tmp_path):
    image, _ = synthetic_case(1, shape=(5, 32, 32))
    image = sitk.Cast(sitk.Round(image), sitk.sitkInt16)
    image.SetDirection(oblique_direction(0))  # DICOM CT slices: a simple direction
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.123456"
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        sl.SetMetaData("0020|000e", series_uid)
        sl.SetMetaData("0008|0060", "CT")
        sl.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|0013", str(k))
        sl.SetMetaData("0028|0030", "\\".join(map(str, image.GetSpacing()[:2])))
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    back = read_image(tmp_path)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_unreadable_and_missing_images_are_clear(tmp_path):
    with pytest.raises(DataError, match="image not found"):
        read_image(tmp_path / "nope.nrrd")
    (tmp_path / "junk.nrrd").write_text("not an image")
    with pytest.raises(DataError, match="junk.nrrd: cannot read image"):
        read_image(tmp_path / "junk.nrrd")
    with pytest.raises(DataError, match="no DICOM series"):
        read_image(tmp_path)


def test_segmentation_file_keeps_names_values_and_geometry(tmp_path):
    image, labels = synthetic_case(2)
    arr = sitk.GetArrayFromImage(labels)
    segments = [(1, "disc", (0.9, 0.5, 0.4)), (2, "blob", (0.2, 0.9, 0.2))]
    write_segmentation(arr, image, tmp_path / "p.seg.nrrd", segments)
    back = read_image(tmp_path / "p.seg.nrrd")
    _same_geometry(image, back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    assert read_segment_names(tmp_path / "p.seg.nrrd") == {1: "disc", 2: "blob"}
    assert back.GetMetaData("Segment1_Color").split() == ["0.2", "0.9", "0.2"]
    assert back.GetMetaData("Segment0_LabelValue") == "1"


def test_segment_names_beyond_ascii_survive_the_round_trip(tmp_path):
    """Slicer writes segment names as UTF-8, and label names are the user's words (pynrrd, under
    slicerio, refuses to write them and drops their letters when reading)."""
    image, labels = synthetic_case(3)
    segments = [(1, "Leber", (0.9, 0.5, 0.4)), (2, "Läsion é", (0.2, 0.9, 0.2))]
    write_segmentation(sitk.GetArrayFromImage(labels), image, tmp_path / "u.seg.nrrd", segments)
    assert read_segment_names(tmp_path / "u.seg.nrrd") == {1: "Leber", 2: "Läsion é"}
    _same_geometry(image, read_image(tmp_path / "u.seg.nrrd"))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
