import shutil

import pytest
import torch
import torchvision
from medtl.errors import WeightsError
from medtl.models.registry import MODELS, build_model
from medtl.models.weights import hub_checkpoint_path, imagenet_state_dict, load_matching


def _input_for(spec):
    if spec.spatial_dims == 3:
        side = max(32, spec.min_size)
        return torch.rand(2 if side == 32 else 1, 1, side, side, side)
    side = spec.exact_size or max(64, spec.min_size + (-spec.min_size % 32))
    return torch.rand(2, 1, side, side)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_network_builds_and_runs_forward_and_backward(name):
    spec = MODELS[name]
    model = build_model(name, num_classes=3, pretrained="none").train()
    x = _input_for(spec)
    y = model(x)
    expected = (x.shape[0], 3) if spec.task == "classification" else (x.shape[0], 3, *x.shape[2:])
    assert y.shape == expected
    assert torch.isfinite(y).all()
    y.float().square().mean().backward()
    stages = model.encoder_stages()
    assert bool(stages) == spec.has_encoder
    stage_params = [p for stage in stages for p in stage.parameters()]
    assert len({id(p) for p in stage_params}) == len(stage_params), "a parameter sits in two stages"
    head = [p for p in model.parameters() if id(p) not in {id(q) for q in stage_params}]
    assert head, "nothing left to train as the head"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    if stages:
        assert stages[0].parameters().__next__().grad is not None, "gradient does not reach the input stage"


def test_classifier_stages_are_the_whole_pretrained_part():
    model = build_model("cls_densenet121", num_classes=2)
    in_stages = {id(p) for stage in model.encoder_stages() for p in stage.parameters()}
    head = [n for n, p in model.named_parameters() if id(p) not in in_stages]
    assert head == ["core.classifier.weight", "core.classifier.bias"]


def test_imagenet_classifier_keeps_every_pretrained_tensor_but_the_head(hub_cache):
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").state_dict()
    model = build_model("cls_mobilenet_v2", num_classes=4, pretrained="imagenet")
    state = {k.removeprefix("core."): v for k, v in model.state_dict().items()}
    for key, value in reference.items():
        if key.startswith("classifier.1."):
            assert state[key].shape[0] == 4
        else:
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_two_and_a_half_d_input_uses_the_neighbours_as_channels():
    model = build_model("unet_resnet18", num_classes=2).eval()
    stack = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        three = model(stack)
        middle_only = model(stack[:, 1:2].expand(-1, 3, -1, -1))
    assert not torch.allclose(three, middle_only), "the neighbouring slices changed nothing"


def test_swin_encoder_loads_self_supervised_weights_from_a_file(tmp_path):
    # The published self-supervised SwinUNETR file holds the Swin encoder alone, under "module."
    # (DataParallel) and a "state_dict" key; a made-up file with that layout stands in for it.
    source = build_model("swinunetr3d", num_classes=2)
    encoder = {f"module.{k}": v + 0.5 for k, v in source.core.swinViT.state_dict().items() if v.is_floating_point()}
    encoder["module.contrastive_head.weight"] = torch.zeros(512, 768)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": encoder}, path)
    target = build_model("swinunetr3d", num_classes=2, pretrained=str(path))
    report = target.load_report
    assert len(report.matched) == len(encoder) - 1 and report.skipped == ["contrastive_head.weight"]
    assert all(k.startswith("core.swinViT.") for k in report.matched)
    torch.testing.assert_close(
        target.core.swinViT.patch_embed.proj.weight, source.core.swinViT.patch_embed.proj.weight + 0.5
    )


def test_medicalnet_file_loads_into_the_3d_classifier_with_a_new_head(tmp_path):
    source = build_model("cls3d_resnet10", num_classes=5)
    state = {f"module.{k}": v + 1.0 for k, v in source.core.state_dict().items() if v.is_floating_point()}
    torch.save({"state_dict": state}, tmp_path / "resnet_10.pth")
    target = build_model("cls3d_resnet10", num_classes=2, pretrained=str(tmp_path / "resnet_10.pth"))
    report = target.load_report
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"], "the 5-class head has no place in a 2-class one"
    assert set(report.new) >= {"core.fc.weight", "core.fc.bias"}
    torch.testing.assert_close(target.core.layer4[0].conv1.weight, source.core.layer4[0].conv1.weight + 1.0)


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


@pytest.mark.parametrize(("depth", "shortcut_a"), [(10, False), (18, True), (34, True), (50, False)])
def test_3d_classifiers_have_medicalnets_layout(depth, shortcut_a):
    # MedicalNet (Chen et al. 2019): conv1 7x7x7 stride 2; shortcut A (no downsample weights) for
    # ResNet-18/34, B (a 1x1x1 convolution) for 10 and 50.
    core = build_model(f"cls3d_resnet{depth}", num_classes=2).core
    assert core.conv1.kernel_size == (7, 7, 7) and core.conv1.stride == (2, 2, 2)
    has_downsample = any("downsample" in key for key in core.state_dict())
    assert has_downsample != shortcut_a


def test_inception_rebuilt_from_a_package_normalises_its_input_as_trained():
    assert build_model("cls_inception_v3", num_classes=2, pretrained="none").core.transform_input
