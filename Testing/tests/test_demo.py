"""The demo's data and a short demo run (the full demo is `make demo`)."""

import json

import numpy as np
import SimpleITK as sitk
from medtl.data.io import read_segment_names
from medtl.data.lits_demo import load_demo_case
from medtl.data.slices import spread_slices
from medtl.events import EventSink


def test_demo_case_is_the_lits_crop_with_axial_slices_along_z():
    image, labels = load_demo_case()
    assert image.GetSize() == (128, 128, 128)
    ct = sitk.GetArrayFromImage(image)
    lab = sitk.GetArrayFromImage(labels)
    assert set(np.unique(lab)) == {0, 1, 2}
    assert -1100 < ct.min() < -900 and ct.max() > 1000  # Hounsfield units: air and bone
    # Liver (~ +60 HU) is brighter than the body's fat and darker than bone.
    assert 0 < np.median(ct[lab == 1]) < 200
    # The raw data's last axis is axial; here it is SimpleITK's z (the first array axis).
    from medtl.data.lits_demo import _data_dir, read_mrc

    raw = read_mrc(_data_dir() / "img_117.mrc")
    np.testing.assert_array_equal(ct[5], raw[:, :, 5])


def test_spread_slices():
    assert spread_slices(range(128), 8) == [8, 24, 40, 56, 72, 88, 104, 120]
    assert spread_slices(range(3), 8) == [0, 1, 2]


def test_short_demo_writes_every_output(tmp_path, hub_cache):
    from medtl.demo import run_demo

    metrics = run_demo(tmp_path, k=4, epochs=1, device="cpu", events=EventSink())
    for name in ("image.nrrd", "prediction.seg.nrrd", "reference.seg.nrrd", "metrics.json", "demo.png", "model"):
        assert (tmp_path / name).exists(), name
    assert read_segment_names(tmp_path / "prediction.seg.nrrd") == {1: "liver", 2: "tumour"}
    pred = sitk.ReadImage(str(tmp_path / "prediction.seg.nrrd"))
    image = sitk.ReadImage(str(tmp_path / "image.nrrd"))
    assert pred.GetSize() == image.GetSize() and pred.GetSpacing() == image.GetSpacing()
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert saved["evaluated_slices"] == 124 and saved["assumed_spacing_mm"] == [1.0, 1.0, 1.0]
    # One epoch of 20 steps already finds much of the liver with ImageNet features.
    assert metrics["dice_held_out"]["liver_and_tumour"] > 0.6, metrics["dice_held_out"]
    # The report scores the held-out slices that show liver (in truth or prediction), not the empty ones.
    card = json.loads((tmp_path / "model_card.json").read_text(encoding="utf-8"))
    scored = card["metrics"]["cases"]
    assert 20 < scored <= 124 and card["metrics"]["metrics"]["liver"]["dice"]["n"] == scored
    assert "LiTS case 117" in card["limitations"][0] and "Known limitations" in (tmp_path / "report.html").read_text(
        encoding="utf-8"
    )
