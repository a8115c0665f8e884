"""Drift monitoring: a shifted set is flagged and named, an unshifted one passes, a single odd
image is pointed out, and `medtl drift` works from the profile a training run stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import synthetic_case, tiny_config
from medtl.adaptation.dann import DomainAdversary
from medtl.cli import main
from medtl.config import RunConfig
from medtl.drift import (
    REFERENCE_FILE,
    _embedding,
    _embedding_module,
    compare_profiles,
    profile_images,
    reduce_reference,
)
from medtl.errors import DataError
from medtl.models.registry import build_model


def _images(seeds, *, offset=0.0, noise=0.0):
    out = []
    for seed in seeds:
        image, _ = synthetic_case(seed)
        array = sitk.GetArrayFromImage(image)
        array = array + offset + np.random.default_rng(seed).normal(0, noise, array.shape).astype(np.float32)
        shifted = sitk.GetImageFromArray(array.astype(np.float32))
        shifted.CopyInformation(image)
        out.append(shifted)
    return out


@pytest.fixture(scope="module")
def profiled():
    cfg = RunConfig.from_dict(
        {"model": {"name": "unet_resnet18", "pretrained": "none"}, "preprocessing": {"patch_size": [32, 32]}}
    )
    torch.manual_seed(0)
    net = build_model("unet_resnet18", num_classes=2).eval()

    def profile(images):
        return profile_images(net, cfg, images)

    return profile, reduce_reference(profile(_images(range(12))))


def test_a_shifted_set_is_flagged_and_named_and_a_like_set_passes(profiled):
    profile, reference = profiled
    same = compare_profiles(reference, profile(_images(range(100, 112))))
    assert not same["drift"] and same["summary"].startswith("no drift")
    assert not same["embedding"]["drifted"]
    shifted = compare_profiles(reference, profile(_images(range(200, 212), offset=120.0)))  # +120 HU
    assert shifted["drift"] and shifted["summary"].startswith("DRIFT")
    assert shifted["embedding"]["drifted"]  # the network's features moved too
    drifted = {e["feature"] for e in shifted["features"] if e["drifted"]}
    assert {"mean", "raw_mean"} <= drifted and "spacing_z" not in drifted
    raw = next(e for e in shifted["features"] if e["feature"] == "raw_mean")
    assert raw["new_mean"] - raw["reference_mean"] == pytest.approx(120.0, abs=15) and raw["shift_sd"] > 3


def test_one_odd_image_among_normal_ones_is_pointed_out(profiled):
    profile, reference = profiled
    images = _images(range(300, 308)) + _images([308], noise=150.0)
    result = compare_profiles(reference, profile(images))
    flagged = [im["index"] for im in result["images"] if im["flags"]]
    assert flagged == [8]
    assert any("std" in flag for flag in result["images"][8]["flags"])
    small = compare_profiles(reference, profile(images[:2]))
    assert "the tests can hardly detect anything" in small["summary"]


def test_medtl_drift_uses_the_profile_a_run_stores(tmp_path, synthetic_dataset, capsys):
    cfg = tiny_config(synthetic_dataset, tmp_path / "run", model={"name": "unet_resnet18", "pretrained": "none"})
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "run.json"), "--quiet"]) == 0
    capsys.readouterr()
    package = tmp_path / "run" / "model"
    manifest = json.loads((package / "medtl_package.json").read_text(encoding="utf-8"))
    assert REFERENCE_FILE in manifest["files"]
    reference = json.loads((package / REFERENCE_FILE).read_text(encoding="utf-8"))
    assert len(reference["values"]) == 3 and len(reference["embedding"]["vectors"]) == 3

    rows = ["image"]
    for i, image in enumerate(_images(range(400, 406), offset=300.0)):
        sitk.WriteImage(image, str(tmp_path / f"new{i}.nrrd"))
        rows.append(f"new{i}.nrrd")
    (tmp_path / "new.csv").write_text("\n".join(rows) + "\n")
    args = ["drift", "--model", str(package), "--data", str(tmp_path / "new.csv"), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "d1")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("DRIFT") and "CSV row 2" in printed
    result = json.loads((tmp_path / "d1" / "drift.json").read_text(encoding="utf-8"))
    assert result["drift"] and (tmp_path / "d1" / "drift.png").stat().st_size > 1000
    assert main([*args, "--out", str(tmp_path / "d2"), "--fail-on-drift"]) == 1

    # A package without a profile needs the training images.
    (package / REFERENCE_FILE).unlink()
    del manifest["files"][REFERENCE_FILE]
    (package / "medtl_package.json").write_text(json.dumps(manifest))
    assert main([*args, "--out", str(tmp_path / "d3")]) == 2
    assert "--reference train.csv" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "d4"), "--reference", str(synthetic_dataset)]) == 0


def _rescaled(seeds, *, slope=1.3, intercept=150.0, noise=20.0):
    """The issue's drift: a scanner mapping HU as 1.3·HU + 150, with noise, on the same anatomy."""
    out = []
    for seed in seeds:
        image, _ = synthetic_case(seed)
        array = sitk.GetArrayFromImage(image) * slope + intercept
        array = array + np.random.default_rng(seed + 1).normal(0, noise, array.shape)
        shifted = sitk.GetImageFromArray(array.astype(np.float32))
        shifted.CopyInformation(image)
        out.append(shifted)
    return out


def test_images_far_outside_a_small_reference_are_drift(profiled):
    profile, _ = profiled
    reference = reduce_reference(profile(_images(range(3))))  # a 4-case run profiles its 3 training images
    shifted = compare_profiles(reference, profile(_rescaled(range(3))))
    assert shifted["drift"] and shifted["outside_reference"] == 3
    assert all(im["intensity_sd"] > 6 for im in shifted["images"])
    assert "3 of 3 image(s) far outside the reference (intensity > 6 reference SDs)" in shifted["summary"]
    assert shifted["summary"].startswith("DRIFT")
    like = compare_profiles(reference, profile(_images(range(20, 32))))
    assert not like["drift"] and like["outside_reference"] == 0, like["summary"]
    two = compare_profiles(reduce_reference(profile(_images(range(2)))), profile(_rescaled(range(2))))
    assert "not even far outliers are found" in two["summary"], "two reference images give no SD to trust"


def test_fail_on_drift_exits_1_for_a_rescaled_copy_of_the_reference(tmp_path, capsys):
    from medtl.package import save_package

    cfg = RunConfig.from_dict(
        tiny_config("x.csv", tmp_path / "run", model={"name": "unet_resnet18", "pretrained": "none"})
    )
    torch.manual_seed(0)
    package = save_package(tmp_path / "model", build_model("unet_resnet18", num_classes=3), cfg)
    for name, images in (("reference", _images(range(3))), ("new", _rescaled(range(3)))):
        rows = ["image"]
        for i, image in enumerate(images):
            sitk.WriteImage(image, str(tmp_path / f"{name}{i}.nrrd"))
            rows.append(f"{name}{i}.nrrd")
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    args = ["drift", "--model", str(package), "--data", str(tmp_path / "new.csv"), "--quiet"]
    args += ["--reference", str(tmp_path / "reference.csv"), "--out", str(tmp_path / "d"), "--fail-on-drift"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("DRIFT") and "far outside the reference" in printed and "CSV row 4" in printed
    # A NaN image would make every statistic NaN and every test pass: it is refused, by name.
    array = sitk.GetArrayFromImage(_images([0])[0])
    array[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nrrd"))
    (tmp_path / "nan.csv").write_text("image\nnan.nrrd\n")
    args[args.index("--data") + 1] = str(tmp_path / "nan.csv")
    assert main(args) == 2
    assert "nan.nrrd: 1 NaN and 0 infinite voxel(s)" in capsys.readouterr().err


def test_the_embedding_of_a_vit_is_its_last_stage_pooled_over_tokens_as_dann_pools_it():
    """ViT stages give tokens (N, L, C): averaging each token over its channels would give an
    embedding as long as the token count, blind to what the channels hold."""
    cfg = RunConfig.from_dict(
        {
            "task": "classification_2d",
            "data": {"label_names": ["normal", "lesion"]},
            "model": {"name": "cls_vit_b_16", "pretrained": "none"},
            "preprocessing": {"patch_size": [224, 224]},
            "loss": "ce",
        }
    )
    torch.manual_seed(0)
    model = build_model("cls_vit_b_16", num_classes=2).eval()
    image = np.random.default_rng(0).random((224, 224), dtype=np.float32)
    embedding = torch.tensor(_embedding(model, _embedding_module(model), cfg, image, "cpu"))

    adversary = DomainAdversary(model, torch.zeros(1, 1, 224, 224))
    seen = []
    adversary.classifier.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    with torch.no_grad(), adversary.capturing():
        model(torch.from_numpy(image)[None, None])
        adversary(1.0)
    (classifier_input,) = seen  # every stage pooled, concatenated: the last stage comes last
    assert embedding.shape == (model.core.hidden_dim,)
    torch.testing.assert_close(embedding, classifier_input[0, -len(embedding) :], rtol=1e-5, atol=1e-6)


def test_a_reference_of_other_embedding_width_asks_for_the_training_images():
    """References stored before a ViT's tokens were pooled over the tokens hold one number per token."""
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1, (6, 1)).tolist()
    reference = {"features": ["mean"], "values": values, "embedding": {"vectors": rng.normal(size=(6, 197)).tolist()}}
    new = {"features": ["mean"], "values": values, "embedding": {"vectors": rng.normal(size=(6, 768)).tolist()}}
    with pytest.raises(DataError, match="--reference train.csv"):
        compare_profiles(reference, new)
    reduced = reduce_reference({**reference, "embedding": {"vectors": rng.normal(size=(2100, 197)).tolist()}})
    assert "components" in reduced["embedding"]
    with pytest.raises(DataError, match="197 dimensions, these images give 768"):
        compare_profiles(reduced, new)
