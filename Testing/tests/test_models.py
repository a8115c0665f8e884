import shutil

import pytest
import torch
import torchvision
from medtl.errors import WeightsError
from medtl.models.registry import MODELS, build_model
from medtl.models.weights import hub_checkpoint_path, imagenet_state_dict, load_matching


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_network_builds_and_runs(name):
    spec = MODELS[name]
    model = build_model(name, num_classes=3, pretrained="none").eval()
    x = torch.rand(2, 1, 64, 64) if spec.spatial_dims == 2 else torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (x.shape[0], 3, *x.shape[2:])
    assert torch.isfinite(y).all()
    assert (model.encoder is not None) == spec.has_encoder


def test_imagenet_weights_load_through_torchvision(hub_cache):
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").state_dict()
    model = build_model("unet_mobilenet_v2", num_classes=2, pretrained="imagenet")
    first_conv = model.encoder.stages[0][0][0].weight
    torch.testing.assert_close(first_conv, reference["features.0.0.weight"])
    last = model.encoder.stages[4][-1].conv[0][0].weight
    torch.testing.assert_close(last, reference["features.17.conv.0.0.weight"])


def test_tampered_weight_file_is_refused(hub_cache, tmp_path, monkeypatch):
    cached = hub_checkpoint_path("MobileNet_V2_Weights.IMAGENET1K_V1")
    home = tmp_path / "torch"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    tampered = home / "hub" / "checkpoints" / cached.name
    shutil.copyfile(cached, tampered)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setenv("TORCH_HOME", str(home))
    with pytest.raises(WeightsError, match="sha256"):
        imagenet_state_dict("mobilenet_v2")


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="not in the torch hub cache.*medtl weights seed"):
        build_model("unet_resnet18", num_classes=2, pretrained="imagenet")


def test_local_weight_file_matched_with_report(tmp_path):
    # A bare encoder file, as MedicalNet ships them: keys without our prefixes, wrapped in DataParallel.
    source = build_model("unet3d_resnet10", num_classes=2, pretrained="none")
    encoder_state = {f"module.{k}": v + 1.0 for k, v in source.encoder.state_dict().items() if v.is_floating_point()}
    encoder_state["module.fc.weight"] = torch.zeros(3, 3)  # a classifier head that has no place here
    path = tmp_path / "medicalnet.pth"
    torch.save({"state_dict": encoder_state}, path)
    target = build_model("unet3d_resnet10", num_classes=2, pretrained=str(path))
    report = target.load_report
    assert "fc.weight" in report.skipped
    assert len(report.matched) == len(encoder_state) - 1
    assert any(k.startswith("core.decoder") for k in report.new)
    torch.testing.assert_close(target.encoder.conv1.weight, source.encoder.conv1.weight + 1.0)


def test_load_matching_skips_shape_mismatch():
    model = build_model("unet_resnet18", num_classes=2, pretrained="none")
    head = "core.segmentation_head.0.weight"
    bad = {head: torch.zeros(5, 5, 3, 3)}
    report = load_matching(model, bad)
    assert report.skipped == [head] and report.matched == []
