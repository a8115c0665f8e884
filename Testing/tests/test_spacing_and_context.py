"""Resampling to a working spacing and 2.5D input, through training, the package and prediction."""

import numpy as np
import SimpleITK as sitk
from conftest import BrightIsObject, physical_centroid, synthetic_case, tiny_config
from medtl.any_package import load_package, segment_image
from medtl.config import RunConfig
from medtl.data.dataset import load_cases
from medtl.events import EventSink
from medtl.package import preprocess
from medtl.pipeline import run_training, training_items


def test_a_run_at_another_spacing_with_neighbouring_slices_predicts_on_the_input_grid(tmp_path, synthetic_dataset):
    cfg = RunConfig.from_dict(
        tiny_config(
            synthetic_dataset,
            tmp_path / "run",
            preprocessing={"spacing": [5.0, 1.2, 1.2], "context_slices": 1},
            model={"name": "unet_resnet18", "pretrained": "none"},
            strategy={"name": "full_finetune"},
            train={"epochs": 1, "steps_per_epoch": 2},
        )
    )
    image, _ = synthetic_case(0)
    # The synthetic grid is (0.8, 0.9, 2.5) mm in (x, y, z); a 2D task resamples in-plane only, so the
    # network sees the same 8 slices at 36 × 32.
    assert preprocess(image, cfg).shape == (8, 36, 32)
    items = training_items(load_cases(synthetic_dataset)[:1], cfg)
    assert items and all(item["image"].shape == (3, 36, 32) and item["label"].shape == (1, 36, 32) for item in items)

    run_training(cfg, events=EventSink())
    package = load_package(tmp_path / "run" / "model")
    assert package.manifest["preprocessing"]["spacing"] == [5.0, 1.2, 1.2]
    labels, probs = segment_image(package, image)
    assert probs.shape == (3, *sitk.GetArrayFromImage(image).shape)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-4)

    # Where each voxel goes, with a stand-in network that labels bright voxels: resampled to
    # 1.2 mm in-plane, three neighbouring slices in, and back onto the oblique input grid.
    package.model = BrightIsObject()
    labels, _ = segment_image(package, image)
    predicted = sitk.GetArrayFromImage(labels) == 1
    bright = sitk.GetArrayFromImage(image) > 25.0  # the ct_abdomen window's midpoint in HU
    assert {shape[-2:] for shape in package.model.seen} == {(36, 32)}
    assert 2 * (predicted & bright).sum() / (predicted.sum() + bright.sum()) > 0.9
    np.testing.assert_allclose(physical_centroid(labels, predicted), physical_centroid(image, bright), atol=0.3)
