"""Domain adaptation: AdaBN, domain-specific BatchNorm (DSBN), adversarial training (DANN)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import synthetic_case, tiny_config
from medtl.adaptation.adapt_package import statistics_pass, target_record
from medtl.adaptation.batchnorm import adapt_batchnorm, batchnorm_layers
from medtl.adaptation.dann import DomainAdversary, ramp, reverse_gradient
from medtl.adaptation.dsbn import DomainBatchNorm, DomainBatchSampler, add_domain, convert_to_dsbn, use_domain
from medtl.any_package import load_package
from medtl.cli import main
from medtl.config import RunConfig
from medtl.errors import ConfigError, DataError
from medtl.events import EventSink
from medtl.models.registry import build_model
from medtl.package import save_package
from medtl.pipeline import run_training
from medtl.provenance import combined_sha256
from medtl.train import fit

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _shifted_volume(seed: int = 0, shape=(16, 32, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 + 0.4 * rng.random(shape)).astype(np.float32)


# ------------------------------------------------------------------ AdaBN


@pytest.mark.parametrize(
    ("name", "task", "patch"),
    [("unet_resnet18", "segmentation_2d", [32, 32]), ("unet3d", "segmentation_3d", [32, 32, 32])],
)
def test_adabn_changes_batchnorm_statistics_and_nothing_else(name, task, patch):
    cfg = RunConfig.from_dict(
        {
            "task": task,
            "model": {"name": name, "pretrained": "none"},
            "preprocessing": {"patch_size": patch},
            "strategy": {"name": "full_finetune"},
        }
    )
    torch.manual_seed(0)
    model = build_model(name, num_classes=2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    volume = _shifted_volume(shape=(16, 32, 32) if task.endswith("2d") else (32, 48, 48))

    n = adapt_batchnorm(model, statistics_pass([volume], cfg, "cpu"))

    after = model.state_dict()
    assert n == len(batchnorm_layers(model)) > 0
    for key, value in after.items():
        if key.endswith(STATISTICS):
            assert not torch.equal(value, before[key]), f"{key} was not re-estimated"
        else:
            assert torch.equal(value, before[key]), f"{key} changed"
    assert not model.training and all(not m.training for m in model.modules())
    assert all(layer.momentum == 0.1 for layer in batchnorm_layers(model)), "momentum not restored"


def test_adabn_statistics_are_those_of_the_target_batch():
    """With one batch (16 slices), the first BatchNorm's running mean is the mean of what the
    convolution before it produced on the target slices."""
    cfg = RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"}})
    model = build_model("unet_resnet18", num_classes=2).eval()
    conv = model.core.encoder.stages[0][0]
    bn = model.core.encoder.stages[0][1]
    assert isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
    seen = []
    hook = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    adapt_batchnorm(model, statistics_pass([_shifted_volume(1)], cfg, "cpu"), layers=[bn])
    hook.remove()
    (features,) = seen
    torch.testing.assert_close(bn.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, features.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)


def test_adabn_refuses_a_network_without_batchnorm():
    model = build_model("cls_vit_b_16", num_classes=2)
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(model, lambda m: None)


# ------------------------------------------------------------------ DSBN


def test_domain_batchnorm_routes_each_sample_through_its_domains_layer():
    torch.manual_seed(0)
    template = torch.nn.BatchNorm2d(3)
    layer = DomainBatchNorm(template, 2)
    reference = [DomainBatchNorm(template, 1).bns[0] for _ in range(2)]
    # Domain 0 images are dark, domain 1 images bright: each layer must see only its own.
    x = torch.cat([torch.rand(3, 3, 8, 8) * 0.2, torch.rand(3, 3, 8, 8) * 0.2 + 0.8])
    ids = torch.tensor([0, 1, 0, 1, 0, 1])
    x = x[torch.tensor([0, 3, 1, 4, 2, 5])]  # interleaved: the routing, not the order, must do it
    layer.domain = ids
    out = layer(x)
    for d in (0, 1):
        expected = reference[d](x[ids == d])
        torch.testing.assert_close(out[ids == d], expected)
        torch.testing.assert_close(layer.bns[d].running_mean, reference[d].running_mean)
    assert layer.bns[0].running_mean.mean() < 0.05 < 0.07 < layer.bns[1].running_mean.mean()

    layer.eval()
    with use_domain(torch.nn.Sequential(layer), 1):
        dark_as_bright = layer(x[ids == 0])
    layer.domain = 0
    assert not torch.allclose(dark_as_bright, layer(x[ids == 0]))


def test_dsbn_network_needs_a_domain_and_checks_its_range():
    net = convert_to_dsbn(build_model("unet_resnet18", num_classes=2), 2).eval()
    with pytest.raises(RuntimeError, match="use_domain"):
        net(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="out of range"), use_domain(net, 2):
        pass
    assert add_domain(net) == 2
    with use_domain(net, 2):
        assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_domain_batches_hold_one_domain_each_and_take_turns():
    domains = [0] * 10 + [1] * 2 + [2] * 5
    sampler = DomainBatchSampler(domains, batch_size=4, n_batches=9, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    owners = [{domains[i] for i in batch} for batch in batches]
    assert all(len(o) == 1 for o in owners) and all(len(b) == 4 for b in batches)
    counts = np.bincount([next(iter(o)) for o in owners], minlength=3)
    assert counts.tolist() == [3, 3, 3]


def _site_csv(folder: Path, sites: list[str | None], column: str = "site") -> Path:
    rows = []
    for i, site in enumerate(sites):
        image, labels = synthetic_case(10 + i)
        if site == "B":  # another scanner: brighter and noisier
            image = sitk.Cast(image, sitk.sitkFloat32) * 1.3 + 120.0
        sitk.WriteImage(image, str(folder / f"case{i}.nrrd"))
        sitk.WriteImage(labels, str(folder / f"case{i}_label.nrrd"))
        rows.append({"image": f"case{i}.nrrd", "label": f"case{i}_label.nrrd", column: site or ""})
    path = folder / "sites.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", column])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_dsbn_run_trains_one_batchnorm_per_site_and_round_trips_through_the_package(tmp_path, hub_cache):
    data = _site_csv(tmp_path, ["A", "B", "A", "B"])
    raw = tiny_config(data, tmp_path / "run", adaptation={"method": "dsbn"}, train={"epochs": 2, "keep_best": False})
    cfg = RunConfig.from_dict(raw)
    metrics = run_training(cfg, events=EventSink())
    assert 0.0 <= metrics["val_dice"]["disc"] <= 1.0

    package = load_package(tmp_path / "run" / "model")
    assert package.domains == ["A", "B"]
    (record,) = package.manifest["adaptation"]
    assert record["method"] == "dsbn" and record["domain_column"] == "site"
    layers = [m for m in package.model.modules() if isinstance(m, DomainBatchNorm)]
    assert layers and all(layer.n_domains == 2 for layer in layers)
    # Both domains' statistics were trained, and they differ (site B is brighter).
    first = layers[0]
    assert all(int(bn.num_batches_tracked) > 0 for bn in first.bns)
    assert not torch.allclose(first.bns[0].running_mean, first.bns[1].running_mean)

    def predict(domain: str) -> np.ndarray:
        out = tmp_path / f"pred_{domain}.nrrd"
        args = ["--image", str(tmp_path / "case1.nrrd"), "--out", str(out), "--domain", domain, "--quiet"]
        assert main(["predict", "--model", str(package.path), *args]) == 0
        return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))

    as_a, as_b = predict("A"), predict("B")
    assert as_a.shape == as_b.shape and (as_a != as_b).any(), "the domain's BatchNorm made no difference"

    # The package holds what was trained: the last checkpoint's weights, every domain's layers.
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert trained.keys() == package.model.state_dict().keys()
    for key, value in package.model.state_dict().items():
        assert torch.equal(value, trained[key]), key

    # As the starting point of another run, the package gives its first domain's BatchNorm.
    plain = build_model("unet_mobilenet_v2", num_classes=3, pretrained=str(package.path))
    assert not plain.load_report.skipped and not plain.load_report.new
    key = next(k for k in trained if k.endswith(".bns.0.running_mean"))
    torch.testing.assert_close(plain.state_dict()[key.replace(".bns.0.", ".")], trained[key])


def test_dsbn_package_needs_a_known_domain_and_adapts_to_a_new_one(tmp_path, capsys):
    cfg = RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"}})
    model = convert_to_dsbn(build_model("unet_resnet18", num_classes=2), 2)
    path = save_package(tmp_path / "pkg", model, cfg, extra={"domains": ["A", "B"]})
    image, _ = synthetic_case(3)
    sitk.WriteImage(image, str(tmp_path / "c.nrrd"))
    args = ["predict", "--model", str(path), "--image", str(tmp_path / "c.nrrd"), "--out", str(tmp_path / "o.nrrd")]

    assert main([*args, "--quiet"]) == 2
    assert "name one of A, B" in capsys.readouterr().err
    assert main([*args, "--domain", "C", "--quiet"]) == 2
    assert "unknown domain 'C'" in capsys.readouterr().err

    adapt = ["adapt", "--model", str(path), "--image", str(tmp_path / "c.nrrd"), "--out", str(tmp_path / "pkg2")]
    assert main([*adapt, "--quiet"]) == 2
    assert "--domain" in capsys.readouterr().err
    assert main([*adapt, "--domain", "C", "--quiet"]) == 0
    adapted = load_package(tmp_path / "pkg2")
    assert adapted.domains == ["A", "B", "C"] and adapted.manifest["default_domain"] == "C"
    old, new = load_package(path).model.state_dict(), adapted.model.state_dict()
    for key, value in old.items():
        assert torch.equal(value, new[key]), f"{key}: adapting to C changed domain A or B"
    c_stats = [k for k in new if ".bns.2." in k and k.endswith("running_mean")]
    assert c_stats and all(not torch.equal(new[k], torch.zeros_like(new[k])) for k in c_stats)
    args[2] = str(tmp_path / "pkg2")
    assert main([*args, "--quiet"]) == 0  # the new domain is now the default


def test_dsbn_needs_a_domain_for_every_row(tmp_path):
    data = _site_csv(tmp_path, ["A", None, "B", "A"])
    cfg = RunConfig.from_dict(tiny_config(data, tmp_path / "run", adaptation={"method": "dsbn"}))
    with pytest.raises(DataError, match=r"adaptation.domain_column 'site': no value in CSV row\(s\) \[3\]"):
        run_training(cfg, events=EventSink())
    cfg = RunConfig.from_dict(
        tiny_config(data, tmp_path / "run", adaptation={"method": "dsbn", "domain_column": "scanner"})
    )
    with pytest.raises(DataError, match="'scanner': no such column"):
        run_training(cfg, events=EventSink())
    with pytest.raises(ConfigError, match="holding out whole domains"):
        RunConfig.from_dict(
            tiny_config(data, tmp_path / "run", data={"group_column": "site"}, adaptation={"method": "dsbn"})
        )


# ------------------------------------------------------------------ DANN


def test_gradient_reversal_negates_and_scales_exactly():
    x = torch.randn(4, 5, requires_grad=True)
    upstream = torch.randn(4, 5)
    y = reverse_gradient(x, 0.37)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream.neg() * 0.37)
    assert ramp(0.0) == 0.0 and 0.99 < ramp(1.0) < 1.0 and ramp(0.2) < ramp(0.5)


def test_domain_classifier_sends_the_reversed_gradient_into_the_encoder():
    torch.manual_seed(0)
    model = build_model("unet_resnet18", num_classes=2).eval()
    adversary = DomainAdversary(model, torch.zeros(1, 1, 32, 32)).eval()
    x = torch.rand(4, 1, 32, 32)
    target = torch.tensor([0, 0, 1, 1])
    first = model.encoder_stages()[0][0].weight

    def encoder_grad(weight: float) -> torch.Tensor:
        model.zero_grad()
        adversary.zero_grad()
        with adversary.capturing():
            model(x)
            loss = torch.nn.functional.cross_entropy(adversary(weight), target)
        loss.backward()
        return first.grad.clone(), adversary.classifier[0].weight.grad.clone()

    g1, c1 = encoder_grad(1.0)
    g2, c2 = encoder_grad(2.0)
    g0, c0 = encoder_grad(0.0)
    assert g1.abs().sum() > 0 and torch.count_nonzero(g0) == 0
    torch.testing.assert_close(g2, 2 * g1)
    torch.testing.assert_close(c0, c1)  # the classifier itself learns at full strength
    torch.testing.assert_close(c2, c1)


def test_dann_training_confuses_the_domain_classifier_and_resumes(tmp_path, hub_cache):
    rng = np.random.default_rng(0)
    items, targets = [], []
    for i in range(6):
        image, labels = synthetic_case(20 + i, shape=(1, 48, 48))
        array = np.clip((sitk.GetArrayFromImage(image)[0] + 200) / 500, 0, 1).astype(np.float32)
        items.append({"image": array[None], "label": sitk.GetArrayFromImage(labels)[0][None].astype(np.int64)})
        shifted = np.clip(array * 0.6 + 0.3 + rng.normal(0, 0.05, array.shape), 0, 1).astype(np.float32)
        targets.append({"image": shifted[None], "label": np.zeros((1, 48, 48), np.int64)})
    raw = tiny_config("", tmp_path / "run", strategy={"name": "full_finetune"}, train={"epochs": 3})
    cfg = RunConfig.from_dict(raw)
    result = fit(cfg, items, run_dir=tmp_path / "run", target_items=targets)
    losses = [h["domain_loss"] for h in result.history]
    assert all(0.0 <= h["domain_accuracy"] <= 1.0 for h in result.history)
    # The domain classifier starts at chance on two domains: its cross-entropy near ln 2.
    assert abs(losses[0] - np.log(2)) < 0.1, losses
    # The reversed domain gradient reaches the encoder: the same run with weight 0 (same seeds, same
    # batches, the classifier still learning) ends with other encoder weights; without the reversal
    # reaching it, they would be identical.
    blind = RunConfig.from_dict({**raw, "adaptation": {"dann_weight": 0.0}})
    plain = fit(blind, items, run_dir=tmp_path / "blind", target_items=targets)
    encoder = [k for k in result.model.state_dict() if ".encoder." in k and k.endswith("weight")]
    assert encoder
    moved = [k for k in encoder if not torch.equal(result.model.state_dict()[k], plain.model.state_dict()[k])]
    assert len(moved) > len(encoder) // 2, f"{len(moved)} of {len(encoder)} encoder weights moved"
    weights = [h["dann_weight"] for h in result.history]
    assert weights == sorted(weights) and 0 < weights[0] < weights[-1] < 1
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("classifier.") for k in state["adversary"])
    assert state["adaptation"] == {"adversarial": True, "n_domains": 0}

    # Cut after epoch 2 and resumed (adversary and all), the run is the uninterrupted one.
    class Stop(Exception):
        pass

    def stop_after_second_epoch(record):
        if record["event"] == "checkpoint" and record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(
            cfg,
            items,
            run_dir=tmp_path / "cut",
            target_items=targets,
            events=EventSink(listeners=[stop_after_second_epoch]),
        )
    resumed = fit(cfg, items, run_dir=tmp_path / "cut", target_items=targets, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    np.testing.assert_allclose(
        [h["domain_loss"] for h in resumed.history], [h["domain_loss"] for h in result.history], rtol=1e-5
    )
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # A checkpoint of another kind of run is refused, not silently half-loaded.
    more = RunConfig.from_dict({**raw, "train": {**raw["train"], "epochs": 4}})
    with pytest.raises(DataError, match="was trained with adaptation"):
        fit(more, items, run_dir=tmp_path / "cut", resume=True)


def test_dann_and_adabn_runs_record_the_method_and_the_hashed_target_data(tmp_path, hub_cache):
    data = _site_csv(tmp_path, ["A", "A", "A", "A"])
    target_folder = tmp_path / "target"
    target_folder.mkdir()
    target = _site_csv(target_folder, ["B", "B"])
    for method in ("dann", "adabn"):
        raw = tiny_config(
            data,
            tmp_path / method,
            adaptation={"method": method, "target_csv": str(target)},
            strategy={"name": "full_finetune"},
            train={"epochs": 1},
        )
        run_training(RunConfig.from_dict(raw), events=EventSink())
        manifest = json.loads((tmp_path / method / "model" / "medtl_package.json").read_text())
        (record,) = manifest["adaptation"]
        assert record["method"] == method
        assert record["target"]["images"] == 2 and len(record["target"]["combined_sha256"]) == 64
        assert "case0.nrrd" not in json.dumps(record), "a target file name leaked into the package"
        assert manifest["domains"] == []
    with pytest.raises(ConfigError, match="adaptation.target_csv"):
        RunConfig.from_dict(tiny_config(data, tmp_path / "x", adaptation={"method": "dann"}))


def test_the_target_record_hashes_its_images_the_way_provenance_does(tmp_path):
    paths = []
    for index, text in enumerate(["one", "two", "three"]):
        paths.append(tmp_path / f"image{index}.nrrd")
        paths[-1].write_text(text)
    record = target_record(paths)
    assert record["images"] == 3 and record["sha256"] == sorted(record["sha256"])
    assert record["combined_sha256"] == combined_sha256(record["sha256"])
    assert record["combined_sha256"] == combined_sha256(list(reversed(record["sha256"]))), "order must not matter"


def test_adaptation_choices_that_cannot_work_are_config_errors(tmp_path):
    swin = tiny_config(
        "d.csv",
        tmp_path,
        task="segmentation_3d",
        preprocessing={"patch_size": [64, 64, 64]},
        model={"name": "swinunetr3d", "pretrained": "none"},
        strategy={"name": "full_finetune"},
    )
    for method in ("adabn", "dsbn"):
        with pytest.raises(ConfigError, match="'swinunetr3d' has none"):
            RunConfig.from_dict({**swin, "adaptation": {"method": method, "target_csv": "t.csv"}})
    RunConfig.from_dict({**swin, "adaptation": {"method": "dann", "target_csv": "t.csv"}})  # no BatchNorm needed
    frozen = tiny_config("d.csv", tmp_path, strategy={"name": "feature_extraction"})
    with pytest.raises(ConfigError, match="keeps frozen"):
        RunConfig.from_dict({**frozen, "adaptation": {"method": "dann", "target_csv": "t.csv"}})


def test_medtl_adapt_on_a_plain_package(tmp_path, capsys):
    cfg = RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"}})
    path = save_package(tmp_path / "pkg", build_model("unet_resnet18", num_classes=2), cfg, metrics={"val": 1})
    for i in range(2):
        image, _ = synthetic_case(30 + i)
        sitk.WriteImage(image, str(tmp_path / f"t{i}.nrrd"))
    # A label column (here a classifier's class names) is not read.
    (tmp_path / "target.csv").write_text("image,label\nt0.nrrd,tumour\nt1.nrrd,normal\n")
    assert (
        main(
            [
                "adapt",
                "--model",
                str(path),
                "--data",
                str(tmp_path / "target.csv"),
                "--out",
                str(tmp_path / "adapted"),
                "--quiet",
            ]
        )
        == 0
    )
    adapted = load_package(tmp_path / "adapted")
    (record,) = adapted.manifest["adaptation"]
    assert record["method"] == "adabn" and record["target"]["images"] == 2
    assert adapted.manifest["metrics_before_adaptation"] == {"val": 1} and adapted.manifest["metrics"] == {}
    old = load_package(path).model.state_dict()
    changed = {k for k, v in adapted.model.state_dict().items() if not torch.equal(v, old[k])}
    assert changed and all(k.endswith(STATISTICS) for k in changed)

    assert (
        main(
            [
                "adapt",
                "--model",
                str(path),
                "--image",
                str(tmp_path / "t0.nrrd"),
                "--out",
                str(tmp_path / "x"),
                "--domain",
                "B",
                "--quiet",
            ]
        )
        == 2
    )
    assert "--domain does not apply" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("task", "name", "patch"),
    [("classification_2d", "cls_mobilenet_v2", [32, 32]), ("segmentation_3d", "unet3d_resnet10", [32, 32, 32])],
)
def test_dsbn_and_dann_train_classifiers_and_3d_networks(tmp_path, task, name, patch):
    rng = np.random.default_rng(0)
    classification = task.startswith("classification")
    shape = (1, *patch)

    def item(domain: int, index: int) -> dict:
        image = (rng.random(shape) * (0.5 if domain else 1.0) + 0.3 * domain).astype(np.float32)
        label = np.array([index % 2]) if classification else (rng.random(shape) > 0.5).astype(np.int64)
        return {"image": image, "label": label, "domain": domain}

    items = [item(d, i) for d in (0, 1) for i in range(4)]
    raw = {
        "task": task,
        "data": {"label_names": ["a", "b"] if classification else ["fg"]},
        "preprocessing": {"preset": "none", "patch_size": patch},
        "model": {"name": name, "pretrained": "none"},
        "strategy": {"name": "full_finetune"},
        "optim": {"warmup_steps": 1},
        "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 2, "device": "cpu"},
        "augmentation": "none",
        "loss": "ce" if classification else "dice_ce",
    }
    cfg = RunConfig.from_dict(raw)
    dsbn = fit(cfg, items, run_dir=tmp_path / "dsbn", n_domains=2)
    layers = [m for m in dsbn.model.modules() if isinstance(m, DomainBatchNorm)]
    assert layers and all(int(bn.num_batches_tracked) > 0 for layer in layers for bn in layer.bns)
    assert not torch.allclose(layers[0].bns[0].running_mean, layers[0].bns[1].running_mean)

    source = [{k: v for k, v in it.items() if k != "domain"} for it in items if it["domain"] == 0]
    target = [{k: v for k, v in it.items() if k != "domain"} for it in items if it["domain"] == 1]
    dann = fit(cfg, source, run_dir=tmp_path / "dann", target_items=target)
    assert np.isfinite(dann.history[0]["domain_loss"]) and 0 <= dann.history[0]["domain_accuracy"] <= 1


@pytest.mark.parametrize(
    ("name", "size", "dims"),
    [("unet_resnet18", 32, 2), ("cls_mobilenet_v2", 32, 2), ("cls_vit_b_16", 224, 2), ("cls3d_resnet10", 32, 3)],
)
def test_the_domain_classifier_reads_every_encoder_stage(name, size, dims):
    """Stages made up for the cut (slices of a classifier's layers, ViT's embedding holder) are
    never called by the network; the classifier must still see each stage's output."""
    model = build_model(name, num_classes=2)
    adversary = DomainAdversary(model, torch.zeros(1, 1, *[size] * dims))
    with torch.no_grad(), adversary.capturing():
        model.eval()(torch.zeros(2, 1, *[size] * dims))
        assert len(adversary._captured) == len(model.encoder_stages()) == 5
