"""Intensity presets and augmentation, built from MONAI transforms.

A preset maps raw intensities (Hounsfield units for CT) into [0, 1]; everything after that
(padding, rotation, cropping) happens in that windowed space, where 0 means air, and the
network's input adapter does the ImageNet normalisation last.

Example:
    >>> import numpy as np
    >>> t = intensity_transform("ct_abdomen")
    >>> [round(float(v), 3) for v in t(np.array([[-1000.0, -200.0, 250.0, 3000.0]]))[0]]
    [0.0, 0.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandSpatialCropd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SpatialPadd,
    Transform,
)

# Hounsfield windows (low, high): level ± width/2 of the usual radiology windows.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "ct_abdomen": (-200.0, 250.0),
    "ct_liver": (-50.0, 200.0),
    "ct_lung": (-1350.0, 150.0),
    "ct_bone": (-450.0, 1050.0),
    "ct_brain": (0.0, 80.0),
}


def intensity_transform(preset: str, window: Sequence[float] | None = None) -> Transform:
    """The array transform of a preset (channel-first or plain arrays, numpy or torch)."""
    if window is not None:
        low, high = window
        return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if preset in CT_WINDOWS:
        low, high = CT_WINDOWS[preset]
        return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if preset == "mri":
        # MRI has no absolute scale: robust percentiles per image.
        return ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    if preset == "none":
        return Compose([])
    raise ValueError(f"unknown preset '{preset}'")


def training_transform(*, patch_size: Sequence[int], level: str, spatial_dims: int) -> Compose:
    """Pad to the patch, augment (in windowed space, padding = 0 = air), crop a patch.

    Levels: ``none``; ``light`` (small rotation and scaling, contrast); ``standard`` (larger
    rotation and scaling, contrast, noise).
    """
    keys = ("image", "label")
    steps: list[Transform] = [SpatialPadd(keys=keys, spatial_size=patch_size, mode="constant", value=0)]
    if level != "none":
        rotate = 0.26 if level == "standard" else 0.17  # radians: ±15° or ±10°
        scale = 0.15 if level == "standard" else 0.1
        steps.append(
            RandAffined(
                keys=keys,
                prob=0.7,
                rotate_range=(rotate,) if spatial_dims == 2 else (rotate, rotate, rotate),
                scale_range=(scale,) * spatial_dims,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
        steps.append(RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)))
        if level == "standard":
            steps.append(RandGaussianNoised(keys="image", prob=0.3, std=0.02))
    steps.append(RandSpatialCropd(keys=keys, roi_size=patch_size, random_size=False))
    return Compose(steps)
