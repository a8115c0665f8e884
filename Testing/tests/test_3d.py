"""The 3D path: a MONAI 3D network trained on whole volumes, predicted by sliding window."""

import SimpleITK as sitk
from conftest import synthetic_case, tiny_config
from medtl.config import RunConfig
from medtl.events import EventSink
from medtl.package import load_package, segment_image
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
    image, _ = synthetic_case(11, shape=(20, 40, 44))  # larger than the patch: several windows
    labels, probs = segment_image(package, image)
    assert labels.GetSize() == image.GetSize()
    assert labels.GetSpacing() == image.GetSpacing() and labels.GetDirection() == image.GetDirection()
    assert labels.GetOrigin() == image.GetOrigin()
    assert probs.shape == (3, 20, 40, 44)
    assert abs(probs.sum(axis=0) - 1).max() < 1e-4
    assert sitk.GetArrayFromImage(labels).max() <= 2
