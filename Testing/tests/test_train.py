import math

import numpy as np
import pytest
import torch
from medtl.events import EventSink
from medtl.train import fit, lr_factor
from medtl.training.setup import warmup_cosine
from test_strategies import _cfg, _items


def test_loss_falls_on_a_learnable_task(tmp_path, hub_cache):
    from medtl.config import RunConfig

    cfg = RunConfig.from_dict(
        {
            "model": {"name": "unet_mobilenet_v2", "pretrained": "imagenet"},
            "preprocessing": {"patch_size": [32, 32]},
            "strategy": {"name": "full_finetune"},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"epochs": 4, "steps_per_epoch": 5, "batch_size": 4, "device": "cpu"},
            "augmentation": "none",
        }
    )
    result = fit(cfg, _items(6), run_dir=tmp_path)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses


def test_warmup_then_cosine():
    factors = [lr_factor(s, total=100, warmup=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[99] < 0.01
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def _two_group_schedule(lrs, *, total, warmup):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    optimizer = torch.optim.AdamW(groups)
    return optimizer, warmup_cosine(optimizer, total=total, warmup=warmup)


def test_the_schedule_warms_up_then_decays_each_groups_own_learning_rate_and_resumes():
    """Discriminative learning rates: the encoder's group keeps its tenth of the head's all along."""
    head, encoder = 1e-3, 1e-4
    optimizer, scheduler = _two_group_schedule([head, encoder], total=20, warmup=4)
    seen = {}
    for step in range(25):
        seen[step] = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
        if step == 9:  # a checkpoint, as the trainer writes one
            saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    expected = {
        0: 0.25,  # the first step already trains: (0 + 1) / 4
        3: 1.0,
        4: 1.0,  # the cosine starts at the top
        12: 0.5 * (1 + math.cos(math.pi * 8 / 16)),
        19: 0.5 * (1 + math.cos(math.pi * 15 / 16)),
        20: 0.0,
        24: 0.0,  # past the end it stays at 0, never rises again
    }
    for step, factor in expected.items():
        assert seen[step] == pytest.approx([head * factor, encoder * factor], abs=1e-12), step

    optimizer, resumed = _two_group_schedule([head, encoder], total=20, warmup=4)
    optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(seen[10], abs=1e-12)
    optimizer.step()
    resumed.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(seen[11], abs=1e-12)


class _Stop(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    cfg = _cfg("feature_extraction_then_finetune", epochs=3, fe_epochs=1)
    full = fit(cfg, _items(), run_dir=tmp_path / "full")

    def stop_after_second_epoch(record):
        if record["event"] == "checkpoint" and record["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        fit(cfg, _items(), run_dir=tmp_path / "cut", events=EventSink(listeners=[stop_after_second_epoch]))
    seen = []
    resumed = fit(cfg, _items(), run_dir=tmp_path / "cut", resume=True, events=EventSink(listeners=[seen.append]))
    assert [r["epoch"] for r in seen if r["event"] == "epoch"] == [3]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in full.history], rtol=1e-5)
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_events_report_progress_and_eta(tmp_path):
    seen = []
    fit(_cfg("full_finetune", epochs=2), _items(), run_dir=tmp_path, events=EventSink(listeners=[seen.append]))
    kinds = [r["event"] for r in seen]
    assert kinds[0] == "start" and kinds.count("epoch") == 2 and kinds.count("checkpoint") == 2
    steps = [r for r in seen if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["eta_s"] == 0 and all(r["eta_s"] >= 0 for r in steps)
    assert (tmp_path / "checkpoint.pt").is_file()


def test_a_network_torch_compile_cannot_run_trains_uncompiled(tmp_path, monkeypatch):
    cfg = _cfg("full_finetune", epochs=1)
    reference = fit(cfg, _items(), run_dir=tmp_path / "eager")

    class Broken(torch.nn.Module):
        """What torch.compile gives back for a network its backend mis-compiles."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            raise AssertionError("expected size 32==32, stride 1==4096 at dim=1")

    monkeypatch.setattr(torch, "compile", Broken)
    cfg.train.compile = True
    seen = []
    result = fit(cfg, _items(), run_dir=tmp_path / "compiled", events=EventSink(listeners=[seen.append]))
    warnings = [e["message"] for e in seen if e["event"] == "warning"]
    assert len(warnings) == 1 and "torch.compile could not run" in warnings[0] and "stride 1==4096" in warnings[0]
    np.testing.assert_allclose([h["loss"] for h in result.history], [h["loss"] for h in reference.history], rtol=1e-5)
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, msg=key)


def test_dataloader_workers_train_on_the_same_augmented_batches(tmp_path):
    # Each sample's augmentation is seeded from its place in the epoch, not from whichever
    # process loads it: workers (and torchrun processes) do not change the run.
    cfg = _cfg("full_finetune", epochs=2)
    cfg.augmentation = "strong"
    inline = fit(cfg, _items(), run_dir=tmp_path / "inline")
    cfg.train.num_workers = 2
    seen = []
    workers = fit(cfg, _items(), run_dir=tmp_path / "workers", events=EventSink(listeners=[seen.append]))
    assert seen[0]["event"] == "start" and seen[0]["workers"] == 2
    np.testing.assert_allclose([h["loss"] for h in workers.history], [h["loss"] for h in inline.history], rtol=1e-6)
    for key, value in inline.model.state_dict().items():
        torch.testing.assert_close(workers.model.state_dict()[key], value, msg=key)
    # And the augmentation is not a no-op: another seed gives other batches.
    cfg.train.seed = 1
    other = fit(cfg, _items(), run_dir=tmp_path / "other")
    assert other.history[0]["loss"] != inline.history[0]["loss"]


def test_training_samples_are_the_pixels_without_monai_metadata():
    from medtl.data.presets import training_transform
    from medtl.train import _SeededSamples
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import apply_transform

    items = _items(2)
    transform = training_transform(patch_size=[32, 32], level="strong", spatial_dims=2)
    sample = _SeededSamples(items, transform)[(1, 1234)]
    transform.set_random_state(seed=1234)
    with_metadata = apply_transform(transform, dict(items[1]))
    assert isinstance(with_metadata["image"], MetaTensor)  # what MONAI gives when tracking
    assert type(sample["image"]) is torch.Tensor and type(sample["label"]) is torch.Tensor
    torch.testing.assert_close(sample["image"], with_metadata["image"].as_tensor())
    torch.testing.assert_close(sample["label"], with_metadata["label"].as_tensor())
    assert get_track_meta()  # switched off for the training transforms only


def test_dice_ce_weighted_trains_with_class_weights_from_the_training_labels(tmp_path):
    from medtl.losses import class_weights

    cfg = _cfg("full_finetune", epochs=1)
    cfg.loss = "dice_ce_weighted"
    items = _items()
    seen = []
    fit(cfg, items, run_dir=tmp_path, events=EventSink(listeners=[seen.append]))
    announced = [r["message"] for r in seen if r["event"] == "message" and "class weights" in r.get("message", "")]
    expected = ", ".join(f"{w:.3g}" for w in class_weights(items, cfg.num_classes).tolist())
    assert announced == [f"class weights from the training labels: {expected}"]
