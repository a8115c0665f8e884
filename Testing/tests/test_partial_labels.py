"""Partial labels end to end in the engine: unknown (255) voxels never count in a loss, a patch
sampler or a metric; background painted or erased does; fully labelled volumes train on every
slice; labels on another grid than their image are refused with the CSV row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import synthetic_case, tiny_config
from medtl.config import RunConfig
from medtl.data.dataset import load_cases
from medtl.data.partial_labels import UNKNOWN, unpainted_slices_unknown
from medtl.data.presets import default_class_ratios, training_transform
from medtl.errors import ConfigError, DataError
from medtl.evaluate import dice_per_class, segmentation_case_metrics, voxel_confusion
from medtl.losses import class_weights, make_loss
from medtl.pipeline import load_case_arrays, training_items


@pytest.mark.parametrize("name", ["dice_ce", "dice", "ce", "ce_weighted", "dice_ce_weighted", "focal", "dice_focal"])
def test_unknown_voxels_push_no_gradient_and_do_not_change_the_loss(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 12, 12, requires_grad=True)
    label = torch.zeros(2, 1, 12, 12, dtype=torch.long)
    label[:, :, 2:6, 2:6] = 2
    label[:, :, 8:10, 8:10] = 1
    partial = label.clone()
    partial[:, :, :, 6:] = UNKNOWN  # the right half: nobody said anything there
    loss_fn = make_loss(name, weights=torch.tensor([0.5, 1.0, 2.0]))
    loss = loss_fn(logits, partial)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[..., 6:].abs().max() == 0, "an unknown voxel moved the network"
    assert logits.grad[..., :6].abs().sum() > 0
    # The loss of the known half alone, whatever the network says where nothing is known.
    other = logits.detach().clone()
    other[..., 6:] = torch.randn_like(other[..., 6:]) * 10
    assert loss_fn(other, partial).item() == pytest.approx(loss.item(), rel=1e-5)
    # ...and exactly the cropped known region's loss for the voxel-averaged terms.
    if name in ("ce", "ce_weighted", "focal"):
        cropped = loss_fn(logits.detach()[..., :6], label[..., :6])
        assert cropped.item() == pytest.approx(loss.item(), rel=1e-5)


def test_without_unknown_voxels_the_loss_is_monais_dice_ce():
    from monai.losses import DiceCELoss

    torch.manual_seed(1)
    logits = torch.randn(3, 3, 16, 16)
    label = torch.randint(0, 3, (3, 1, 16, 16))
    ours = make_loss("dice_ce")(logits, label)
    assert ours.item() == pytest.approx(DiceCELoss(to_onehot_y=True, softmax=True)(logits, label).item(), rel=1e-6)


def test_dice_ce_weighted_is_monais_dice_plus_class_weighted_cross_entropy():
    from monai.losses import DiceLoss

    torch.manual_seed(2)
    logits = torch.randn(3, 3, 16, 16)
    label = torch.randint(0, 3, (3, 1, 16, 16))
    weights = torch.tensor([0.5, 1.0, 4.0])
    ours = make_loss("dice_ce_weighted", weights=weights)(logits, label)
    dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, label)
    weighted_ce = torch.nn.functional.cross_entropy(logits, label[:, 0], weight=weights)
    assert ours.item() == pytest.approx((dice + weighted_ce).item(), rel=1e-6)
    # The weights are what sets it apart from dice_ce: a missed rare class costs more.
    assert ours.item() != pytest.approx(make_loss("dice_ce")(logits, label).item(), rel=1e-3)
    with pytest.raises(ValueError, match="class weights"):
        make_loss("dice_ce_weighted")


def test_a_batch_with_nothing_annotated_costs_zero_not_nan():
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    loss = make_loss("dice_ce")(logits, torch.full((1, 1, 8, 8), UNKNOWN))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum() == 0


def test_class_weights_count_annotated_voxels_only():
    items = [{"label": np.array([[0, 0, 0, 1, UNKNOWN, UNKNOWN, UNKNOWN]], np.uint8)}]
    np.testing.assert_allclose(class_weights(items, 2).numpy(), [4 / 6, 4 / 2], rtol=1e-6)


def _sparse_sample(shape=(96, 96)):
    label = np.full((1, *shape), UNKNOWN, np.uint8)
    label[0, 10:80, 10:80] = 0  # a painted region: background...
    label[0, 40:43, 60:63] = 2  # ...holding a 3 x 3 lesion
    label[0, 20:40, 20:40] = 1
    image = np.random.default_rng(0).random((1, *shape)).astype(np.float32)
    return {"image": image, "label": label}


def test_patches_are_centred_on_the_classes_in_the_configured_ratios_never_on_unknown_voxels():
    sample = _sparse_sample()
    lesion_only = training_transform(patch_size=[16, 16], level="none", spatial_dims=2, class_ratios=[0, 0, 1])
    lesion_only.set_random_state(seed=0)
    for _ in range(10):
        out = lesion_only(dict(sample))
        assert isinstance(out, dict) and tuple(out["label"].shape) == (1, 16, 16)
        assert (np.asarray(out["label"]) == 2).any(), "a patch centred on the lesion misses it"
    background = training_transform(patch_size=[8, 8], level="none", spatial_dims=2, class_ratios=[1, 0, 0])
    background.set_random_state(seed=0)
    for _ in range(20):
        centre = np.asarray(background(dict(sample))["label"])[0, 4, 4]
        assert centre == 0, "a background patch centred on an unknown voxel"


def test_the_default_sampling_shows_a_small_structure_far_more_often_than_uniform_crops():
    sample = _sparse_sample()
    sample["label"][sample["label"] == UNKNOWN] = 0  # fully labelled: uniform crops could go anywhere

    def share_with_lesion(ratios) -> float:
        t = training_transform(patch_size=[16, 16], level="none", spatial_dims=2, class_ratios=ratios)
        t.set_random_state(seed=1)
        return float(np.mean([(np.asarray(t(dict(sample))["label"]) == 2).any() for _ in range(150)]))

    assert default_class_ratios(3) == pytest.approx([2 / 3, 1 / 6, 1 / 6])
    balanced, uniform = share_with_lesion(default_class_ratios(3)), share_with_lesion(None)
    # A 3 x 3 lesion in a 96 x 96 slice: about 3 % of uniform 16 x 16 crops hold it; one in six
    # balanced patches is centred on it, and background centres near it add a few more.
    assert balanced > 0.15 and uniform < 0.08, (balanced, uniform)


def test_config_checks_class_ratios_and_the_reserved_value():
    base = {"model": {"pretrained": "none"}, "data": {"label_names": ["a", "b"]}}
    RunConfig.from_dict({**base, "train": {"class_ratios": [1, 1, 2]}})
    with pytest.raises(ConfigError, match="train.class_ratios"):
        RunConfig.from_dict({**base, "train": {"class_ratios": [1, 1]}})
    with pytest.raises(ConfigError, match="255 is reserved"):
        RunConfig.from_dict({"model": {"pretrained": "none"}, "data": {"label_names": [f"s{i}" for i in range(255)]}})


def test_dice_is_one_convention_false_positives_on_empty_truth_count_and_unknown_voxels_do_not():
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[1, 2:5, 2:5] = 1
    pred = truth.copy()
    assert dice_per_class(pred, truth, [1, 2]) == {1: 1.0, 2: 1.0}  # nothing to find, nothing found
    pred[3, 0, 0] = 2  # a false positive of a structure the truth does not hold
    assert dice_per_class(pred, truth, [2])[2] == 0.0
    sparse = truth.copy()
    sparse[3] = UNKNOWN  # nobody looked at slice 3: its false positive is not known to be one
    assert dice_per_class(pred, sparse, [1, 2]) == {1: 1.0, 2: 1.0}
    pred[0, 0, 0] = 1  # on an annotated slice a false positive counts
    assert dice_per_class(pred, sparse, [1])[1] == pytest.approx(2 * 9 / (10 + 9))
    assert math.isnan(dice_per_class(pred, np.full_like(truth, UNKNOWN), [1])[1])


def test_evaluation_of_sparse_labels_scores_annotated_voxels_only():
    truth = np.full((6, 8, 8), UNKNOWN, np.uint8)
    truth[2] = 0
    truth[2, 2:6, 2:6] = 1
    pred = np.zeros((6, 8, 8), np.uint8)
    pred[:, 2:6, 2:6] = 1  # right on slice 2, and "wrong" everywhere nobody annotated
    metrics = segmentation_case_metrics(pred, truth, spacing=(1, 1, 1), classes=[1])[1]
    assert metrics["dice"] == 1.0
    assert math.isnan(metrics["hd95_mm"]) and math.isnan(metrics["volume_ml"])
    assert voxel_confusion(pred, truth, 2).tolist() == [[48, 0], [0, 16]]


def _write_case(folder, name, image, label):
    sitk.WriteImage(image, str(folder / f"{name}.nrrd"))
    sitk.WriteImage(label, str(folder / f"{name}_label.nrrd"))
    return f"{name}.nrrd,{name}_label.nrrd"


def test_a_fully_labelled_volume_trains_on_every_slice_a_sparse_one_on_its_annotated_slices(tmp_path):
    image, label = synthetic_case(0)
    truth = sitk.GetArrayFromImage(label)
    sparse = np.full_like(truth, UNKNOWN)
    sparse[[2, 5]] = truth[[2, 5]]
    sparse_image = sitk.GetImageFromArray(sparse)
    sparse_image.CopyInformation(image)
    rows = [
        "image,label",
        _write_case(tmp_path, "full", image, label),
        _write_case(tmp_path, "sparse", image, sparse_image),
    ]
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    cfg = RunConfig.from_dict(tiny_config(tmp_path / "set.csv", tmp_path / "run", data={"val_fraction": 0.0}))
    full, partial = load_cases(tmp_path / "set.csv")
    items = training_items([full], cfg)
    assert len(items) == truth.shape[0], "organ-free slices of a fully labelled volume are background, not unknown"
    assert [i["slice"] for i in training_items([partial], cfg)] == [2, 5]
    # A label file that cannot say "unknown": the legacy switch makes unpainted slices unknown.
    painted_only = np.where(np.isin(np.arange(truth.shape[0]), [2, 5])[:, None, None], truth, 0)
    assert unpainted_slices_unknown(painted_only)[3].max() == UNKNOWN
    assert (unpainted_slices_unknown(painted_only)[2] == truth[2]).all()


def test_a_label_on_another_grid_is_an_error_naming_the_row_or_resampled_when_asked(tmp_path):
    image, label = synthetic_case(1)
    shifted = sitk.Image(label)
    origin = np.array(label.GetOrigin())
    shifted.SetOrigin(tuple(origin + [2.0, 0.0, 0.0]))  # two millimetres off: same size, wrong place
    rows = ["image,label", _write_case(tmp_path, "ok", image, label), _write_case(tmp_path, "off", image, shifted)]
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    cfg = RunConfig.from_dict(tiny_config(tmp_path / "set.csv", tmp_path / "run"))
    good, bad = load_cases(tmp_path / "set.csv")
    load_case_arrays(good, cfg)
    with pytest.raises(DataError, match=r"row 3: label off_label.nrrd .*origin"):
        load_case_arrays(bad, cfg)
    cfg.data.resample_labels = True
    _volume, labels = load_case_arrays(bad, cfg)
    # Resampled onto the image: the structures move by the offset, and no voxel is invented.
    assert set(np.unique(labels)) <= {0, 1, 2, UNKNOWN}
    assert (labels == 1).sum() == pytest.approx((sitk.GetArrayFromImage(label) == 1).sum(), rel=0.15)


class _BrightIsStructure(torch.nn.Module):
    """Class 1 wherever the windowed intensity is above one half (the disc and the blob)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, :1] - 0.5
        return torch.cat([-centre, centre], dim=1) * 20


def test_validation_on_sparse_labels_scores_the_annotated_slices_only(tmp_path):
    from medtl.pipeline import validation_scorer

    image, label = synthetic_case(2)
    structure = (sitk.GetArrayFromImage(label) > 0).astype(np.uint8)
    sparse = np.full_like(structure, UNKNOWN)
    sparse[[1, 4]] = structure[[1, 4]]
    dense_but_painted_only = np.where(sparse == UNKNOWN, 0, sparse).astype(np.uint8)  # 0 = unknown, the old way
    dense_but_painted_only[6, :4, :4] = 0
    rows = ["image,label"]
    for name, array in (("sparse", sparse), ("zeros", dense_but_painted_only)):
        label_image = sitk.GetImageFromArray(array)
        label_image.CopyInformation(image)
        rows.append(_write_case(tmp_path, name, image, label_image))
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    cfg = RunConfig.from_dict(tiny_config(tmp_path / "set.csv", tmp_path / "run", data={"label_names": ["structure"]}))
    sparse_case, zeros_case = load_cases(tmp_path / "set.csv")
    score, _ = validation_scorer([sparse_case], cfg, "cpu")
    # The network finds the structure on every slice; the user painted two. Unpainted slices are
    # not false positives.
    assert score(_BrightIsStructure())["structure"] > 0.98  # a few noisy blob voxels fall below the threshold
    score, _ = validation_scorer([zeros_case], cfg, "cpu")
    assert score(_BrightIsStructure())["structure"] < 0.5, "0 means background: the other slices count"
    cfg.data.labelled_slices = True  # the switch for files that cannot say "unknown"
    score, _ = validation_scorer([zeros_case], cfg, "cpu")
    assert score(_BrightIsStructure())["structure"] > 0.98


def test_segments_become_classes_by_name_and_an_explicit_background_makes_the_rest_unknown():
    from medtl.data.partial_labels import classes_from_segments

    labels = np.array([0, 1, 2, 3], np.uint8)
    names = ["disc", "blob"]
    # Slicer numbered the segments in painting order: blob 1, disc 2; a background segment 3.
    mapped = classes_from_segments(labels, {1: "blob", 2: "disc", 3: "Background"}, names, where="x.seg.nrrd")
    assert mapped.tolist() == [UNKNOWN, 2, 1, 0]
    assert classes_from_segments(labels, {1: "blob", 2: "disc"}, names, where="x").tolist() == [0, 2, 1, 3]
    generic = {1: "Segment_1", 2: "Segment_2"}  # no name the run knows: values are the classes
    assert classes_from_segments(labels, generic, names, where="x") is labels
    with pytest.raises(DataError, match=r"row 4, label x.seg.nrrd: segment\(s\) 'lesion' are not among"):
        classes_from_segments(labels, {1: "disc", 2: "lesion"}, names, where="row 4, label x.seg.nrrd")


def test_a_seg_nrrd_with_a_background_segment_trains_on_what_its_segments_say(tmp_path):
    from medtl.data.io import write_segmentation

    image, label = synthetic_case(0)
    truth = sitk.GetArrayFromImage(label)  # 1 disc, 2 blob
    # The user's segmentation: blob first (value 1), disc (2), and background (3) on slices 2 and 5.
    values = np.zeros_like(truth)
    for z in (2, 5):
        values[z] = np.select([truth[z] == 2, truth[z] == 1], [1, 2], 3)
    sitk.WriteImage(image, str(tmp_path / "case.nrrd"))
    segments = [(1, "blob", (0.3, 0.9, 0.3)), (2, "disc", (0.9, 0.4, 0.3)), (3, "background", (0.0, 0.0, 0.0))]
    write_segmentation(values, image, tmp_path / "case.seg.nrrd", segments)
    (tmp_path / "set.csv").write_text("image,label\ncase.nrrd,case.seg.nrrd\n")
    cfg = RunConfig.from_dict(tiny_config(tmp_path / "set.csv", tmp_path / "run", data={"val_fraction": 0.0}))
    (case,) = load_cases(tmp_path / "set.csv")
    _volume, labels = load_case_arrays(case, cfg)
    assert [i["slice"] for i in training_items([case], cfg)] == [2, 5]  # the rest is unknown
    assert np.array_equal(labels[[2, 5]], truth[[2, 5]]) and (labels[3] == UNKNOWN).all()
