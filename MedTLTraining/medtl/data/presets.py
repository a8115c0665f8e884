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
    ClipIntensityPercentiles,
    Compose,
    HistogramNormalize,
    NormalizeIntensity,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
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

PRESETS = {
    **{name: f"CT window {low:g}..{high:g} HU to [0, 1]" for name, (low, high) in CT_WINDOWS.items()},
    "mri": "MRI: 0.5th..99.5th percentile of each image to [0, 1]",
    "mri_zscore": "MRI: clipped to the 0.5th..99.5th percentile, then zero mean and unit variance over non-zero "
    "voxels (for networks without an ImageNet input; padding 0 is then the mean, not air)",
    "xray": "X-ray: 1st..99th percentile of each image to [0, 1]",
    "none": "intensities as stored",
}


def intensity_transform(preset: str, window: Sequence[float] | None = None, *, equalize: bool = False) -> Transform:
    """The array transform of a preset (channel-first or plain arrays, numpy or torch).

    ``equalize`` appends histogram equalisation (MONAI's ``HistogramNormalize``, global, to
    [0, 1]): flat histograms for MRI and X-ray whose contrast sits in a narrow band.
    """
    steps: list[Transform] = []
    if window is not None:
        low, high = window
        steps.append(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    elif preset in CT_WINDOWS:
        low, high = CT_WINDOWS[preset]
        steps.append(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    elif preset == "mri":
        # MRI has no absolute scale: robust percentiles per image.
        steps.append(ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True))
    elif preset == "mri_zscore":
        steps += [ClipIntensityPercentiles(lower=0.5, upper=99.5), NormalizeIntensity(nonzero=True)]
    elif preset == "xray":
        steps.append(ScaleIntensityRangePercentiles(lower=1.0, upper=99.0, b_min=0.0, b_max=1.0, clip=True))
    elif preset != "none":
        raise ValueError(f"unknown preset '{preset}'")
    if equalize:
        steps.append(HistogramNormalize(num_bins=256, min=0, max=1))
    return Compose(steps)


# level -> (rotation in radians, scale range, gamma range, noise sd)
_LEVELS = {
    "light": (0.17, 0.10, (0.8, 1.25), 0.0),
    "standard": (0.26, 0.15, (0.8, 1.25), 0.02),
    "strong": (0.52, 0.25, (0.7, 1.5), 0.04),
}


def default_class_ratios(num_classes: int) -> list[float]:
    """Patch centres: two thirds on background, one third shared by the structures (nnU-Net's
    forced foreground), so a small structure is seen in every few batches, not by luck."""
    if num_classes < 2:
        return [1.0]
    return [2.0 / 3.0] + [1.0 / (3.0 * (num_classes - 1))] * (num_classes - 1)


def training_transform(
    *,
    patch_size: Sequence[int],
    level: str,
    spatial_dims: int,
    classification: bool = False,
    class_ratios: Sequence[float] | None = None,
) -> Compose:
    """Augmentation in the preset's space, ending in a patch of ``patch_size``.

    Segmentation: pad to the patch (padding = 0 = air), augment image and label alike, crop a
    patch centred on a class drawn with ``class_ratios`` (MONAI's ``RandCropByLabelClassesd``,
    background first; a class missing from a sample gives its chance to the others; unknown
    voxels are never a centre), or anywhere without them. Classification: resize the whole
    image to the patch, augment the image.

    Levels (each step is a MONAI transform, random under ``Compose.set_random_state``):

    - ``none``.
    - ``light``: rotation ±10°, scaling ±10 %, gamma.
    - ``standard``: rotation ±15°, scaling ±15 %, gamma, Gaussian noise, bias field.
    - ``strong``: rotation ±30°, scaling ±25 %, elastic deformation, left-right and
      front-back flips (anatomy is not mirror-symmetric; use them when the task allows), gamma,
      contrast and brightness, noise, blur, bias field.
    """
    spatial_keys = ("image",) if classification else ("image", "label")
    interpolation = ("bilinear",) if classification else ("bilinear", "nearest")
    steps: list[Transform] = []
    if classification:
        steps.append(Resized(keys="image", spatial_size=patch_size, mode="area"))
    else:
        steps.append(SpatialPadd(keys=spatial_keys, spatial_size=patch_size, mode="constant", value=0))
    if level != "none":
        steps += _geometric_steps(level, spatial_keys, spatial_dims, interpolation)
        steps += _intensity_steps(level)
    if not classification:
        steps += _patch_crop(spatial_keys, patch_size, class_ratios)
    # map_items=False: the last step gets the crop's list itself, not each of its items.
    return Compose(steps, map_items=False)


def _geometric_steps(
    level: str, keys: Sequence[str], spatial_dims: int, interpolation: Sequence[str]
) -> list[Transform]:
    """Rotation and scaling; ``strong`` adds elastic deformation and flips. Image and label alike."""
    rotate, scale, _, _ = _LEVELS[level]
    steps: list[Transform] = [
        RandAffined(
            keys=keys,
            prob=0.7,
            rotate_range=(rotate,) if spatial_dims == 2 else (rotate, rotate, rotate),
            scale_range=(scale,) * spatial_dims,
            mode=interpolation,
            padding_mode="zeros",
        )
    ]
    if level != "strong":
        return steps
    if spatial_dims == 2:
        elastic = Rand2DElasticd(
            keys=keys, spacing=(16, 16), magnitude_range=(1, 3), prob=0.3, mode=interpolation, padding_mode="zeros"
        )
    else:
        elastic = Rand3DElasticd(
            keys=keys, sigma_range=(5, 7), magnitude_range=(50, 150), prob=0.2, mode=interpolation, padding_mode="zeros"
        )
    steps.append(elastic)
    # Axes of the channel-first array: the last is x (left-right), the one before y.
    steps.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=spatial_dims - 1))
    steps.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=spatial_dims - 2))
    return steps


def _intensity_steps(level: str) -> list[Transform]:
    """Gamma; ``strong`` adds contrast, brightness and blur; ``standard`` and ``strong`` noise and
    a bias field. The image only."""
    _, _, gamma, noise = _LEVELS[level]
    steps: list[Transform] = [RandAdjustContrastd(keys="image", prob=0.3, gamma=gamma)]
    if level == "strong":
        steps.append(RandScaleIntensityd(keys="image", factors=0.2, prob=0.3))
        steps.append(RandShiftIntensityd(keys="image", offsets=0.1, prob=0.3))
        steps.append(
            RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2)
        )
    if noise:
        steps.append(RandGaussianNoised(keys="image", prob=0.3, std=noise))
        steps.append(RandBiasFieldd(keys="image", prob=0.3, coeff_range=(0.0, 0.1 if level == "strong" else 0.05)))
    return steps


def _patch_crop(keys: Sequence[str], patch_size: Sequence[int], class_ratios: Sequence[float] | None) -> list:
    """The last step of a segmentation augmentation: a patch anywhere, or centred by class."""
    if class_ratios is None:
        return [RandSpatialCropd(keys=keys, roi_size=patch_size, random_size=False)]
    crop = RandCropByLabelClassesd(
        keys=keys,
        label_key="label",
        spatial_size=patch_size,
        ratios=list(class_ratios),
        num_classes=len(class_ratios),
        num_samples=1,
        warn=False,
    )
    return [ClassBalancedCrop(crop, patch_size)]


class ClassBalancedCrop(Randomizable, Transform):
    """MONAI's ``RandCropByLabelClassesd`` (one sample), skipped where the patch is the whole
    sample: every centre then gives the same crop, and finding each class's voxels costs as much
    as the rest of the augmentation (a 128 x 128 slice with a 128 x 128 patch: the Slicer module's
    rounds on small volumes, the demo)."""

    def __init__(self, crop: RandCropByLabelClassesd, patch_size: Sequence[int]) -> None:
        self.crop = crop
        self.patch_size = tuple(patch_size)

    def set_random_state(self, seed: int | None = None, state=None) -> ClassBalancedCrop:
        self.crop.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        """The wrapped crop draws its own centre."""

    def __call__(self, data):
        if tuple(data["label"].shape[1:]) == self.patch_size:
            return data
        samples = self.crop(data)
        # A list of num_samples (1) dicts; training draws one sample at a time.
        return samples[0] if isinstance(samples, list) else samples
