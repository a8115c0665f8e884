"""Grad-CAM: a volume with the input's geometry that peaks on what the network looks at, and a
network that comes out of it unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import synthetic_case, tiny_config
from medtl.any_package import load_package
from medtl.cli import main
from medtl.config import RunConfig
from medtl.errors import DataError
from medtl.events import EventSink
from medtl.explain import gradcam_image
from medtl.pipeline import run_training


@pytest.fixture(scope="module")
def disc_segmenter(tmp_path_factory) -> tuple:
    """A 2D U-Net (ImageNet MobileNetV2) fine-tuned on four synthetic discs."""
    from medtl.models.weights import seed_offline_weights

    seed_offline_weights()
    folder = tmp_path_factory.mktemp("cam")
    rows = ["image,label"]
    for i in range(4):
        image, labels = synthetic_case(i)
        sitk.WriteImage(image, str(folder / f"c{i}.nrrd"))
        sitk.WriteImage(labels, str(folder / f"c{i}_l.nrrd"))
        rows.append(f"c{i}.nrrd,c{i}_l.nrrd")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(
        folder / "data.csv",
        folder / "run",
        data={"val_fraction": 0.0},
        strategy={"name": "full_finetune"},
        train={"epochs": 4, "steps_per_epoch": 5, "batch_size": 8, "seed": 0, "device": "cpu"},
    )
    run_training(RunConfig.from_dict(cfg), events=EventSink())
    return folder, load_package(folder / "run" / "model")


def test_segmentation_cam_has_the_input_geometry_and_peaks_on_the_structure(disc_segmenter, tmp_path):
    folder, package = disc_segmenter
    before = {k: v.clone() for k, v in package.model.state_dict().items()}
    flags = [p.requires_grad for p in package.model.parameters()]
    image, labels = synthetic_case(7)  # oblique, anisotropic; never trained on
    cam = gradcam_image(package, image)
    assert cam.GetSize() == image.GetSize() and cam.GetSpacing() == image.GetSpacing()
    assert cam.GetOrigin() == image.GetOrigin() and cam.GetDirection() == image.GetDirection()
    heat, disc = sitk.GetArrayFromImage(cam), sitk.GetArrayFromImage(labels) == 1
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert heat[disc].mean() > 5 * heat[~disc].mean()  # a uniform or random map fails this
    # The package's network is untouched: weights, gradient flags, mode, and no hooks left behind.
    after = package.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in package.model.parameters()] == flags and not package.model.training
    assert not any(m._forward_hooks or m._backward_hooks for m in package.model.modules())

    # The CLI writes it beside the prediction, ready to overlay; a bad layer or class is named.
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    out = tmp_path / "cam.nrrd"
    args = ["explain", "--model", str(folder / "run" / "model"), "--image", str(tmp_path / "ct.nrrd")]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), heat, atol=1e-5)
    with pytest.raises(DataError, match="target layer 'core.nope' is not in the network"):
        gradcam_image(package, image, target_layer="core.nope")
    with pytest.raises(DataError, match="labels are 1..2"):
        gradcam_image(package, image, class_index=3)


def test_classifier_cam_finds_the_planted_lesion(tmp_path, hub_cache):
    from test_classification import _config, _write_classification_set

    csv = _write_classification_set(tmp_path, n=24)
    run_training(_config(csv, tmp_path / "run"), events=EventSink())
    package = load_package(tmp_path / "run" / "model")
    rng = np.random.default_rng(11)
    inside, outside = [], []
    for _ in range(4):
        image = rng.normal(1000, 60, (64, 64)).astype(np.float32)
        grid = np.indices((64, 64))
        centre = rng.uniform(64 / 3, 128 / 3, 2)
        lesion = ((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) < (64 / 6) ** 2
        image[lesion] += 500
        heat = sitk.GetArrayFromImage(gradcam_image(package, sitk.GetImageFromArray(image), class_index=1))
        assert heat.shape == (64, 64)
        inside.append(heat[lesion].mean())
        outside.append(heat[~lesion].mean())
    assert np.mean(inside) > 2 * np.mean(outside)


def test_3d_network_cam_by_sliding_window(tmp_path):
    cfg = tiny_config(
        "unused.csv",
        tmp_path / "run",
        task="segmentation_3d",
        model={"name": "unet3d", "pretrained": "none"},
        strategy={"name": "full_finetune"},
        preprocessing={"patch_size": [16, 32, 32]},
    )
    from medtl.models.registry import build_model
    from medtl.package import save_package

    run = RunConfig.from_dict(cfg)
    torch.manual_seed(0)
    path = save_package(tmp_path / "pkg", build_model("unet3d", num_classes=3), run)
    image, _ = synthetic_case(2, shape=(20, 40, 40))
    cam = gradcam_image(load_package(path), image, class_index=2)
    assert cam.GetSize() == image.GetSize() and cam.GetDirection() == image.GetDirection()
    heat = sitk.GetArrayFromImage(cam)
    assert np.isfinite(heat).all() and 0 <= heat.min() and heat.max() <= 1.0
    manifest = json.loads((path / "medtl_package.json").read_text(encoding="utf-8"))
    assert manifest["model"]["name"] == "unet3d"
