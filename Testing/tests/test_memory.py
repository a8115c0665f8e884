"""Memory: the estimate before a run, and running out of memory in the middle of one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medtl.config import RunConfig
from medtl.distributed import World
from medtl.errors import MedTLError
from medtl.events import EventSink
from medtl.memory import MARGIN, estimate_training_memory, smaller_patch
from medtl.models.registry import build_model
from medtl.train import _memory_check, fit
from medtl.training.backoff import center_crop


def test_estimate_counts_weights_gradients_moments_and_saved_activations():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1)
    )
    net[0].requires_grad_(False)  # a frozen first layer has no gradient and no AdamW moments
    est = estimate_training_memory(net, (1, 16, 16), batch_size=4)
    n_all = sum(p.numel() for p in net.parameters())
    n_trainable = n_all - sum(p.numel() for p in net[0].parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    assert est.weights == 4 * n_all + buffers
    assert est.gradients == 4 * n_trainable and est.optimizer == 8 * n_trainable
    # Saved for backward, per sample: the BatchNorm input (8x16x16; the frozen conv needs nothing
    # of its input) and the ReLU output, which the last conv saves too (kept once); plus half of
    # BatchNorm's batch mean and inverse deviation (8 channels each), traced with two samples.
    assert est.activations_per_sample == 4 * (8 * 16 * 16) * 2 + 4 * 8 * 2 // 2
    assert est.activations == 4 * est.activations_per_sample
    assert est.total == int(MARGIN * (est.weights + est.gradients + est.optimizer + est.activations))
    doubled = est.with_batch(8)
    assert doubled.total - est.total == pytest.approx(MARGIN * 4 * est.activations_per_sample, abs=2)
    assert est.largest_batch(est.total) == 4 and est.largest_batch(est.with_batch(7).total + 1) == 7
    assert est.largest_batch(est.weights) == 0


def test_estimate_of_a_registered_network_grows_with_batch_and_patch():
    model = build_model("unet_mobilenet_v2", num_classes=2)
    model.train()
    small = estimate_training_memory(model, (1, 64, 64), batch_size=2)
    large = estimate_training_memory(model, (1, 128, 128), batch_size=2)
    # Activations scale with the voxels (4x), weights do not.
    assert large.activations_per_sample == pytest.approx(4 * small.activations_per_sample, rel=0.02)
    assert large.weights == small.weights
    assert small.activations_per_sample > 1e6  # megabytes per 64x64 slice for a U-Net, not bytes


def test_smaller_patch_respects_the_network_divisor():
    assert smaller_patch([128, 128], divisor=32) == [96, 96]
    assert smaller_patch([64, 96, 96], divisor=16) == [48, 64, 64]
    assert smaller_patch([32, 32], divisor=32) is None
    assert smaller_patch([64, 64, 64], divisor=16, min_size=64) is None


def test_a_smaller_training_patch_is_the_centre_of_each_sample_as_a_plain_tensor():
    batch = torch.arange(2 * 3 * 8 * 10, dtype=torch.float32).reshape(2, 3, 8, 10)
    cropped = center_crop(batch, [4, 6])
    assert type(cropped) is torch.Tensor, "the trainer's batches carry no MONAI metadata"
    torch.testing.assert_close(cropped, batch[:, :, 2:6, 2:8])
    assert center_crop(None, [4, 6]) is None


def test_a_gpu_without_room_for_the_batch_starts_in_micro_batches(monkeypatch):
    cfg = RunConfig.from_dict(
        {
            "model": {"name": "unet_mobilenet_v2"},
            "preprocessing": {"patch_size": [128, 128]},
            "train": {"batch_size": 8},
        }
    )
    model = build_model("unet_mobilenet_v2", num_classes=cfg.num_classes)
    model.train()
    estimate = estimate_training_memory(model, (1, 128, 128), batch_size=8)
    room = estimate.with_batch(3).total + 1
    monkeypatch.setattr("medtl.training.backoff.available_memory", lambda device: room)
    seen = []
    micro = _memory_check(
        model, cfg, torch.device("cuda"), World(0, 1, 0), 8, 8, False, EventSink(listeners=[seen.append])
    )
    assert micro == 3
    assert seen[0]["memory_estimate_bytes"] == estimate.total and seen[0]["memory_available_bytes"] == room
    assert "micro-batches of 3" in seen[1]["message"] and seen[1]["event"] == "warning"
    # On the CPU the run is not changed, only warned about.
    seen.clear()
    assert (
        _memory_check(model, cfg, torch.device("cpu"), World(0, 1, 0), 8, 8, False, EventSink(listeners=[seen.append]))
        == 8
    )
    assert seen[-1]["event"] == "warning" and "lower train.batch_size" in seen[-1]["message"]


def _out_of_memory_above(model, *, batch: int = 1, size: int = 10_000):
    """Makes ``model`` raise CUDA's out-of-memory error for more than ``batch`` samples or a side
    longer than ``size``, as a GPU of that size would."""
    forward = model.forward

    def limited(x):
        if x.shape[0] > batch or max(x.shape[2:]) > size:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(x)

    model.forward = limited
    return model


def _classifier_cfg(**train) -> RunConfig:
    # Frozen BatchNorm and no dropout: splitting a batch does not change the gradient.
    return RunConfig.from_dict(
        {
            "task": "classification_2d",
            "data": {"label_names": ["a", "b"]},
            "model": {"name": "cls_densenet121", "pretrained": "none"},
            "preprocessing": {"patch_size": [32, 32]},
            "strategy": {"name": "feature_extraction"},
            "augmentation": "light",
            "loss": "ce",
            "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "device": "cpu", **train},
        }
    )


def _classifier_items(n=8):
    rng = np.random.default_rng(0)
    return [
        {"image": rng.random((1, 32, 32), dtype=np.float32), "label": np.array([i % 2], np.int64)} for i in range(n)
    ]


def test_out_of_memory_lowers_the_batch_and_trains_the_same_network(tmp_path):
    cfg = _classifier_cfg()
    reference = fit(cfg, _classifier_items(), run_dir=tmp_path / "whole")
    torch.manual_seed(cfg.train.seed)
    model = _out_of_memory_above(build_model(cfg.model.name, num_classes=2), batch=1)
    seen = []
    result = fit(
        cfg, _classifier_items(), run_dir=tmp_path / "split", model=model, events=EventSink(listeners=[seen.append])
    )
    warnings = [e["message"] for e in seen if e["event"] == "warning" and "going on with" in e["message"]]
    assert len(warnings) == 2 and "micro-batches of 2" in warnings[0] and "micro-batches of 1" in warnings[1]
    assert "simulated" in warnings[0]
    assert [h.get("micro_batch") for h in result.history] == [1, 1]
    assert len([e for e in seen if e["event"] == "step"]) == 6  # no step lost
    np.testing.assert_allclose([h["loss"] for h in result.history], [h["loss"] for h in reference.history], rtol=1e-5)
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_out_of_memory_at_one_sample_shrinks_the_patch_then_gives_up(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "model": {"name": "unet_mobilenet_v2", "pretrained": "none"},
            "preprocessing": {"patch_size": [128, 128]},
            "augmentation": "none",
            "strategy": {"name": "full_finetune"},
            "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "device": "cpu"},
        }
    )
    rng = np.random.default_rng(1)
    items = [
        {
            "image": rng.random((1, 128, 128), dtype=np.float32),
            "label": (rng.random((1, 128, 128)) > 0.5).astype(np.int64),
        }
    ]
    model = _out_of_memory_above(build_model(cfg.model.name, num_classes=cfg.num_classes), batch=1, size=96)
    seen = []
    result = fit(cfg, items, run_dir=tmp_path / "a", model=model, events=EventSink(listeners=[seen.append]))
    assert result.history[0]["train_patch"] == [96, 96] and result.history[0]["micro_batch"] == 1
    assert any("training patches of 96x96" in e.get("message", "") for e in seen)
    assert np.isfinite(result.history[0]["loss"])

    hopeless = _out_of_memory_above(build_model(cfg.model.name, num_classes=cfg.num_classes), batch=0)
    with pytest.raises(MedTLError, match="out of memory with one sample of 32x32"):
        fit(cfg, items, run_dir=tmp_path / "b", model=hopeless)
