"""Ensembles: a package of packages, combined by mean probability or vote, with uncertainty; an
ensemble of identical members is that member; cross-validation folds become one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import synthetic_case
from medtl.any_package import classify_image, describe, load_package, segment_image
from medtl.cli import main
from medtl.config import RunConfig
from medtl.ensemble import combine_probabilities, ensemble_uncertainty, save_ensemble
from medtl.errors import DataError, WeightsError
from medtl.models.registry import build_model
from medtl.package import save_package


def _member(path, *, seed: int, name="unet_resnet18", preset="ct_abdomen", labels=("disc", "blob"), task=None):
    task = task or ("classification_2d" if name.startswith("cls") else "segmentation_2d")
    cfg = RunConfig.from_dict(
        {
            "task": task,
            "model": {"name": name, "pretrained": "none"},
            "data": {"label_names": list(labels)},
            "preprocessing": {"preset": preset, "patch_size": [32, 32]},
            "strategy": {"name": "full_finetune"},
            "loss": "ce" if task.startswith("classification") else "dice_ce",
        }
    )
    torch.manual_seed(seed)
    return save_package(path, build_model(name, num_classes=cfg.num_classes), cfg)


def test_an_ensemble_of_identical_members_is_that_member(tmp_path):
    member = _member(tmp_path / "a", seed=0)
    image, _ = synthetic_case(3)
    labels, probs = segment_image(load_package(member), image)
    for combine in ("mean", "vote"):
        ensemble = load_package(save_ensemble(tmp_path / combine, [member, member, member], combine=combine))
        e_labels, e_probs = segment_image(ensemble, image)
        assert np.array_equal(sitk.GetArrayFromImage(e_labels), sitk.GetArrayFromImage(labels))
        assert e_labels.GetDirection() == image.GetDirection() and e_labels.GetSpacing() == image.GetSpacing()
        if combine == "mean":
            np.testing.assert_allclose(e_probs, probs, atol=1e-6)
    same = [probs, probs, probs]
    assert ensemble_uncertainty(same, "variance").max() < 1e-12  # float rounding of a zero variance
    assert ensemble_uncertainty(same, "mutual_information").max() < 1e-5
    np.testing.assert_allclose(
        ensemble_uncertainty(same, "entropy"), ensemble_uncertainty([probs], "entropy"), atol=1e-6
    )


def test_different_members_average_and_disagreement_shows(tmp_path):
    a, b = _member(tmp_path / "a", seed=0), _member(tmp_path / "b", seed=1, preset="ct_liver")
    image, _ = synthetic_case(4)
    pa = segment_image(load_package(a), image)[1]
    pb = segment_image(load_package(b), image)[1]
    ensemble = load_package(save_ensemble(tmp_path / "e", [a, b], weights=[3, 1]))
    labels, probs = segment_image(ensemble, image)
    np.testing.assert_allclose(probs, (3 * pa + pb) / 4, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(labels), probs.argmax(0))
    variance = ensemble_uncertainty([pa, pb], "variance")
    assert variance.max() > 0 and np.allclose(variance, np.clip(4 * np.var([pa, pb], 0).mean(0), 0, 1))
    text = describe(tmp_path / "e")
    assert "ensemble:      mean of 2 members" in text and "preset ct_liver, weight 1" in text

    # The CLI: an uncertainty volume of the members' disagreement beside the prediction.
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    args = ["predict", "--model", str(tmp_path / "e"), "--image", str(tmp_path / "ct.nrrd")]
    out = [*args, "--out", str(tmp_path / "seg.nrrd"), "--uncertainty", str(tmp_path / "mi.nrrd")]
    assert main([*out, "--uncertainty-kind", "mutual_information", "--quiet"]) == 0
    mi = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mi.nrrd")))
    np.testing.assert_allclose(mi, ensemble_uncertainty([pa, pb], "mutual_information"), atol=1e-5)
    single = ["predict", "--model", str(a), "--image", str(tmp_path / "ct.nrrd"), "--out", str(tmp_path / "s.nrrd")]
    assert main([*single, "--uncertainty", str(tmp_path / "u.nrrd"), "--uncertainty-kind", "variance"]) == 2


def test_vote_goes_with_the_majority_and_breaks_ties_by_probability():
    p = lambda *v: np.array(v, np.float32).reshape(3, 1)  # noqa: E731 - three classes, one voxel
    members = [p(0.1, 0.5, 0.4), p(0.1, 0.45, 0.45 + 1e-3), p(0.2, 0.2, 0.6)]
    assert combine_probabilities(members, "vote", [1, 1, 1]).argmax(0)[0] == 2  # two votes for class 2
    tie = [p(0.6, 0.3, 0.1), p(0.2, 0.7, 0.1)]
    assert combine_probabilities(tie, "vote", [1, 1]).argmax(0)[0] == 1  # mean 0.5 beats 0.4


def test_mismatched_members_and_tampered_files_are_refused(tmp_path):
    a = _member(tmp_path / "a", seed=0)
    other = _member(tmp_path / "b", seed=1, labels=("liver", "tumour"))
    with pytest.raises(DataError, match="must give each label value the same meaning"):
        save_ensemble(tmp_path / "e", [a, other])
    with pytest.raises(DataError, match="at least two"):
        save_ensemble(tmp_path / "e", [a])
    ensemble = save_ensemble(tmp_path / "e", [a, a])
    manifest = ensemble / "members" / "1" / "medtl_package.json"
    manifest.write_text(manifest.read_text(encoding="utf-8").replace('"disc"', '"DISC"'))
    with pytest.raises(WeightsError, match="sha256 does not match the ensemble manifest"):
        load_package(ensemble)


def test_the_one_network_loader_sends_an_ensemble_to_any_package(tmp_path):
    """medtl.package loads one network's package (and an ensemble's members); an ensemble handed to
    it is refused with the loader that takes it, not loaded half-way."""
    import medtl.package

    a = _member(tmp_path / "a", seed=0)
    ensemble = save_ensemble(tmp_path / "e", [a, a])
    with pytest.raises(DataError, match="is an ensemble package.*medtl.any_package.load_package"):
        medtl.package.load_package(ensemble)
    assert len(load_package(ensemble).members) == 2


def test_a_classifier_ensemble_averages_class_probabilities(tmp_path):
    a = _member(tmp_path / "a", seed=0, name="cls_mobilenet_v2", preset="xray", labels=("normal", "lesion"))
    b = _member(tmp_path / "b", seed=1, name="cls_mobilenet_v2", preset="xray", labels=("normal", "lesion"))
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 10, (32, 32)).astype(np.float32))
    pa, pb = (classify_image(load_package(m), image) for m in (a, b))
    both = classify_image(load_package(save_ensemble(tmp_path / "e", [a, b])), image)
    assert both == pytest.approx({k: (pa[k] + pb[k]) / 2 for k in pa}, abs=1e-6)
    assert (
        json.loads((tmp_path / "e" / "medtl_package.json").read_text(encoding="utf-8"))["task"] == "classification_2d"
    )


def test_an_ensemble_explains_as_its_members_do(tmp_path):
    from medtl.explain import gradcam_image

    member = _member(tmp_path / "a", seed=0)
    image, _ = synthetic_case(5)
    single = sitk.GetArrayFromImage(gradcam_image(load_package(member), image))
    assert single.max() == pytest.approx(1.0)  # a map with something in it, not all zeros
    ensemble = load_package(save_ensemble(tmp_path / "e", [member, member]))
    cam = gradcam_image(ensemble, image)
    assert cam.GetDirection() == image.GetDirection() and cam.GetOrigin() == image.GetOrigin()
    np.testing.assert_allclose(sitk.GetArrayFromImage(cam), single, atol=1e-5)
