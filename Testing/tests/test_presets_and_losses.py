import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import oblique_direction
from medtl.config import CLASSIFICATION_LOSSES, SEGMENTATION_LOSSES
from medtl.data.io import resample_like, resample_to_spacing
from medtl.data.presets import CT_WINDOWS, PRESETS, intensity_transform, training_transform
from medtl.train import class_weights, make_loss


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("equalize", [False, True])
def test_every_preset_keeps_the_shape_and_gives_finite_values(preset, equalize):
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 300, (4, 20, 24)).astype(np.float32)
    out = np.asarray(intensity_transform(preset, equalize=equalize)(volume))
    assert out.shape == volume.shape and np.isfinite(out).all()
    if equalize or preset in CT_WINDOWS or preset in ("mri", "xray"):
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_every_configurable_preset_is_built():
    import typing

    from medtl.config import Preset

    assert set(PRESETS) == set(typing.get_args(Preset))


def test_ct_window_clips_at_its_hounsfield_limits():
    low, high = CT_WINDOWS["ct_lung"]
    out = np.asarray(intensity_transform("ct_lung")(np.array([low - 1, low, (low + high) / 2, high, high + 1])))
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)


def test_mri_zscore_standardises_the_non_zero_voxels():
    rng = np.random.default_rng(1)
    volume = np.zeros((4, 32, 32), np.float32)
    volume[:, 8:24, 8:24] = rng.normal(600, 80, (4, 16, 16))
    out = np.asarray(intensity_transform("mri_zscore")(volume))
    inside = out[:, 8:24, 8:24]
    assert abs(inside.mean()) < 0.05 and abs(inside.std() - 1) < 0.05
    assert (out[:, :8] == 0).all(), "background stays 0"


def test_xray_percentiles_ignore_a_few_extreme_pixels():
    image = np.full((1, 50, 50), 100.0, np.float32)
    image[0, :, 25:] = 200.0
    image[0, 0, 0] = 1e6  # a burnt-in marker
    out = np.asarray(intensity_transform("xray")(image))
    assert out[0, 10, 10] == pytest.approx(0.0) and out[0, 10, 40] == pytest.approx(1.0)


def test_equalisation_spreads_a_narrow_histogram():
    image = np.linspace(0.45, 0.55, 4096, dtype=np.float32).reshape(1, 64, 64)
    out = np.asarray(intensity_transform("none", equalize=True)(image))
    assert out.max() - out.min() > 0.9
    assert (np.diff(out.ravel()) >= -1e-6).all(), "equalisation keeps the order of intensities"


def test_resampling_to_a_spacing_and_back_keeps_the_geometry():
    image = sitk.GetImageFromArray(np.random.default_rng(2).random((10, 40, 30)).astype(np.float32))
    image.SetSpacing((0.8, 0.8, 3.0))
    image.SetOrigin((-12.0, 30.0, 5.0))
    image.SetDirection(oblique_direction())
    working = resample_to_spacing(image, [1.5, 1.6, 1.6])
    assert working.GetSize() == (15, 20, 20)
    assert working.GetOrigin() == image.GetOrigin() and working.GetDirection() == image.GetDirection()
    back = resample_like(working, image)
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, attr)() == getattr(image, attr)()
    assert (sitk.GetArrayFromImage(back) > 0).all(), "the rim outside the coarse grid's centres came back empty"
    labels = sitk.Cast(image > 0.5, sitk.sitkUInt8)
    assert set(np.unique(sitk.GetArrayFromImage(resample_to_spacing(labels, [1.5, 1.6, 1.6], labels=True)))) <= {0, 1}


def _segmentation_sample(spatial_dims):
    shape = (40, 44) if spatial_dims == 2 else (20, 24, 28)
    rng = np.random.default_rng(3)
    label = np.zeros((1, *shape), np.int64)
    label[(0, *[slice(s // 4, s // 2) for s in shape])] = 1
    label[(0, *[slice(s // 2, 3 * s // 4) for s in shape])] = 2
    image = (rng.random((1, *shape)) * 0.3 + 0.3 * label).astype(np.float32)
    return {"image": image, "label": label}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("level", ["none", "light", "standard", "strong"])
def test_augmentation_keeps_shapes_label_values_and_is_deterministic_under_a_seed(spatial_dims, level):
    patch = [32, 32] if spatial_dims == 2 else [16, 16, 16]
    sample = _segmentation_sample(spatial_dims)

    def run(seed):
        t = training_transform(patch_size=patch, level=level, spatial_dims=spatial_dims)
        t.set_random_state(seed=seed)
        return [t(dict(sample)) for _ in range(4)]

    first, again, other = run(7), run(7), run(8)
    for out in first:
        assert tuple(out["image"].shape) == (1, *patch) and tuple(out["label"].shape) == (1, *patch)
        assert set(np.unique(np.asarray(out["label"]))) <= {0, 1, 2}, "labels interpolated"
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
    if level != "none":
        assert any(
            not torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
            for a, b in zip(first, other, strict=True)
        )


def test_strong_augmentation_moves_image_and_label_together():
    sample = _segmentation_sample(2)
    t = training_transform(patch_size=[40, 44], level="strong", spatial_dims=2)
    t.set_random_state(seed=3)
    agreement = []
    for _ in range(10):
        out = t(dict(sample))
        image, label = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
        # Where the label says "structure 2", the image is brighter than where it says background.
        if (label == 2).any() and (label == 0).any():
            agreement.append(image[label == 2].mean() > image[label == 0].mean())
    assert agreement and all(agreement)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_classification_augmentation_resizes_the_whole_image(spatial_dims):
    shape = (50, 70) if spatial_dims == 2 else (12, 30, 20)
    patch = [32, 32] if spatial_dims == 2 else [16, 16, 16]
    t = training_transform(patch_size=patch, level="strong", spatial_dims=spatial_dims, classification=True)
    out = t({"image": np.random.rand(1, *shape).astype(np.float32), "label": np.array([1])})
    assert tuple(out["image"].shape) == (1, *patch)
    assert np.asarray(out["label"]).tolist() == [1]


def test_balanced_class_weights_by_hand():
    items = [{"label": np.array([[0, 0, 0, 1]])}, {"label": np.array([[0, 0, 0, 0]])}]
    # 7 background, 1 foreground, class 2 absent: 8 / (2 * 7) and 8 / (2 * 1).
    np.testing.assert_allclose(class_weights(items, 3).numpy(), [8 / 14, 4.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("name", SEGMENTATION_LOSSES)
@pytest.mark.parametrize("empty", [False, True])
def test_segmentation_losses_handle_empty_labels(name, empty):
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    if not empty:
        label[:, :, 4:8, 4:8] = 2
    loss_fn = make_loss(name, weights=torch.tensor([0.5, 1.0, 2.0]))
    loss = loss_fn(logits, label)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # A confident, correct prediction costs less than a confident, wrong one and less than noise.
    right = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float() * 20 - 10
    wrong = torch.roll(right, 1, dims=1)
    assert loss_fn(right, label) < min(loss_fn(logits.detach(), label), loss_fn(wrong, label))


@pytest.mark.parametrize(
    ("name", "multi_label"),
    [(n, False) for n in CLASSIFICATION_LOSSES if n != "bce"] + [("bce", True), ("focal", True)],
)
def test_classification_losses(name, multi_label):
    logits = torch.randn(4, 3, requires_grad=True)
    if multi_label:
        target = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.float32)
    else:
        target = torch.tensor([[0], [2], [1], [2]])
    loss_fn = make_loss(name, weights=torch.tensor([1.0, 2.0, 0.5]), classification=True, multi_label=multi_label)
    loss = loss_fn(logits, target)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    # A confident, correct prediction costs less than a confident, wrong one.
    if multi_label:
        right, wrong = target * 20 - 10, 10 - target * 20
    else:
        right = torch.nn.functional.one_hot(target[:, 0], 3).float() * 20 - 10
        wrong = -right
    assert loss_fn(right, target) < loss_fn(wrong, target)


def test_2d_tasks_resample_in_plane_only():
    from medtl.config import RunConfig
    from medtl.package import working_image

    image = sitk.Image(30, 40, 10, sitk.sitkFloat32)
    image.SetSpacing((0.8, 0.8, 3.0))
    cfg2d = RunConfig.from_dict({"preprocessing": {"spacing": [1.0, 1.6, 1.6]}, "model": {"pretrained": "none"}})
    assert working_image(image, cfg2d).GetSize() == (15, 20, 10), "painted slices must stay slices"
    cfg3d = RunConfig.from_dict(
        {
            "task": "segmentation_3d",
            "model": {"name": "unet3d", "pretrained": "none"},
            "strategy": {"name": "full_finetune"},
            "preprocessing": {"spacing": [1.0, 1.6, 1.6], "patch_size": [32, 32, 32]},
        }
    )
    assert working_image(image, cfg3d).GetSize() == (15, 20, 30)


def test_a_patch_as_large_as_the_sample_skips_the_class_search_and_keeps_the_sample():
    import numpy as np
    from medtl.data.presets import ClassBalancedCrop, training_transform

    rng = np.random.default_rng(0)
    item = {
        "image": rng.random((1, 32, 32), dtype=np.float32),
        "label": (rng.random((1, 32, 32)) > 0.7).astype(np.uint8),
    }
    whole = training_transform(patch_size=[32, 32], level="none", spatial_dims=2, class_ratios=[1, 2])
    crop = next(t for t in whole.transforms if isinstance(t, ClassBalancedCrop))
    searched = []
    crop.crop.randomize = lambda *a, **k: searched.append(1)  # MONAI's class search
    out = whole(dict(item))
    assert np.array_equal(np.asarray(out["image"]), item["image"]) and np.array_equal(
        np.asarray(out["label"]), item["label"]
    )
    assert searched == []
    smaller = training_transform(patch_size=[16, 16], level="none", spatial_dims=2, class_ratios=[1, 2])
    assert tuple(smaller(dict(item))["label"].shape) == (1, 16, 16)
