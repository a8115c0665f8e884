"""The 3D path: a MONAI 3D network trained on whole volumes, predicted by sliding window."""

import numpy as np
import SimpleITK as sitk
from conftest import BrightIsObject, physical_centroid, synthetic_case, tiny_config
from medtl.any_package import load_package, segment_image
from medtl.config import RunConfig
from medtl.events import EventSink
from medtl.pipeline import run_training


def test_3d_train_then_sliding_window_prediction_keeps_geometry(tmp_path, synthetic_dataset):
    cfg = RunConfig.from_dict(
        tiny_config(
            synthetic_dataset,
            tmp_path / "run3d",
            task="segmentation_3d",
            preprocessing={"patch_size": [16, 32, 32]},
            model={"name": "unet3d", "pretrained": "none"},
            strategy={"name": "full_finetune"},
            train={"epochs": 2, "steps_per_epoch": 3, "batch_size": 2},
            augmentation="none",
        )
    )
    seen = []
    metrics = run_training(cfg, events=EventSink(listeners=[seen.append]))
    assert seen[-1]["event"] == "done" and metrics["train_cases"] == 3
    package = load_package(tmp_path / "run3d" / "model")
    assert package.manifest["model"]["spatial_dims"] == 3
    image, truth = synthetic_case(11, shape=(20, 40, 44))  # larger than the patch: several windows
    labels, probs = segment_image(package, image)
    assert labels.GetSize() == image.GetSize()
    assert probs.shape == (3, 20, 40, 44)
    assert abs(probs.sum(axis=0) - 1).max() < 1e-4
    assert sitk.GetArrayFromImage(labels).max() <= 2

    # Where each voxel goes: the package's sliding window with a stand-in network that labels
    # bright voxels, on the oblique, anisotropic synthetic grid resampled to 1.5 mm, a flipped
    # orientation (reoriented for the network) and back.
    flipped = sitk.Flip(image, [True, False, True])
    package.model = BrightIsObject()
    package.manifest["config"]["preprocessing"]["spacing"] = [1.5, 1.5, 1.5]
    labels, _ = segment_image(package, flipped)
    predicted = sitk.GetArrayFromImage(labels)
    bright = sitk.GetArrayFromImage(flipped) > 25.0  # the window's midpoint in HU
    assert 2 * (predicted.astype(bool) & bright).sum() / (predicted.astype(bool).sum() + bright.sum()) > 0.9
    np.testing.assert_allclose(physical_centroid(labels, predicted == 1), physical_centroid(flipped, bright), atol=0.5)
