"""Interactive rounds in the engine: the handlers that end a round (time budget, loss plateau, a
user's stop) and show previews, a stop in the middle of an epoch, the pre-flight planner's fit logic
with a stubbed device, and the warm engine (``medtl.serve``) in-process: previews land exactly on the
input's grid, corrected slices are emphasised, bad requests and bad labels are one error each and
the engine stays up."""

from __future__ import annotations

import io
import json
import queue
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from medtl.config import RunConfig
from medtl.errors import ConfigError
from medtl.events import EventSink
from medtl.planner import RoundPlan, budgeted, fit_to_memory, plan_run
from medtl.serve import CORRECTION_EMPHASIS, Preview, WarmSession, read_requests, serve
from medtl.training import Trainer
from medtl.training.interactive import LivePreview, LossPlateau, StopSignal, TimeBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _stub(**fields):
    stops: list[str] = []
    return SimpleNamespace(request_stop=stops.append, stops=stops, steps_done=0, stop_reason=None, **fields)


def test_time_budget_stops_once_the_budget_is_spent():
    clock, trainer = FakeClock(), _stub()
    budget = TimeBudget(10, clock=clock)
    budget.on_train_start(trainer)
    for now in (3, 6, 9.9):
        clock.now = now
        budget.on_step_end(trainer, 1.0)
    assert trainer.stops == []
    clock.now = 10.2
    budget.on_step_end(trainer, 1.0)
    assert trainer.stops == ["time budget of 10 s spent"]


def test_loss_plateau_waits_for_min_steps_and_resets_on_progress():
    trainer = _stub()
    plateau = LossPlateau(patience=3, min_steps=6, smoothing=1.0)
    for loss in [1.0, 0.9, 0.9, 0.9, 0.9]:  # three stalled steps, but before min_steps: goes on
        trainer.steps_done += 1
        plateau.on_step_end(trainer, loss)
    assert trainer.stops == [] and plateau.stall == 3
    trainer.steps_done += 1
    plateau.on_step_end(trainer, 0.5)  # progress: the count starts again
    assert plateau.stall == 0
    for loss in [0.5, 0.5, 0.5]:
        trainer.steps_done += 1
        plateau.on_step_end(trainer, loss)
    assert len(trainer.stops) == 1 and "stopped falling" in trainer.stops[0]


def test_stop_signal_and_preview_cadence():
    trainer = _stub()
    reason = {"why": None}
    signal = StopSignal(lambda: reason["why"])
    signal.on_step_end(trainer, 1.0)
    reason["why"] = "good enough"
    signal.on_step_end(trainer, 1.0)
    assert trainer.stops == ["good enough"]

    clock, shown = FakeClock(), []
    preview = LivePreview(shown.append, every_s=3, first_s=1, clock=clock)
    preview.on_train_start(trainer)
    for now in (0.5, 1.2, 2.0, 4.1, 4.3, 7.2, 7.4):
        clock.now = now
        preview.on_step_end(trainer, 1.0)
    assert len(shown) == 3  # at 1.2, then 3 s after each preview: 4.3 (not 4.1), 7.4 (not 7.2)
    trainer.stop_reason = "good enough"
    clock.now = 20
    preview.on_step_end(trainer, 1.0)
    assert len(shown) == 3  # after a stop the prediction comes at once


def _cfg(tmp_path: Path, **train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"name": "unet_resnet18", "pretrained": "none"},
            "data": {"label_names": ["organ"]},
            "preprocessing": {"patch_size": [32, 32], "preset": "none", "window": [-200, 250]},
            "augmentation": "none",
            "strategy": {"name": "full_finetune"},
            "train": {"epochs": 3, "steps_per_epoch": 5, "batch_size": 2, "device": "cpu", **train},
            "output_dir": str(tmp_path / "run"),
        }
    )


def _items(n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"image": rng.random((1, 32, 32), dtype=np.float32), "label": (rng.random((1, 32, 32)) > 0.5).astype(np.uint8)}
        for _ in range(n)
    ]


def test_a_stop_in_the_middle_of_an_epoch_ends_the_run_with_that_epoch_checkpointed(tmp_path):
    class StopAtStep7(StopSignal):
        def __init__(self) -> None:
            super().__init__(lambda: None)

        def on_step_end(self, trainer, loss):
            if trainer.steps_done == 7:
                trainer.request_stop("good enough")

    seen: list[dict] = []
    trainer = Trainer(
        _cfg(tmp_path),
        _items(),
        run_dir=tmp_path / "run",
        events=EventSink(listeners=[seen.append]),
        handlers=[StopAtStep7()],
    )
    state = trainer.run_training()
    assert trainer.steps_done == 7 and trainer.stop_reason == "good enough"
    assert [r["epoch"] for r in state.history] == [1, 2]
    assert state.history[-1]["steps"] == 2 and state.history[-1]["stopped"] == "good enough"
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1  # 0-based: epoch 2
    assert [e["step"] for e in seen if e["event"] == "epoch"] == [5, 7]


def test_fit_to_memory_picks_micro_batches_then_smaller_patches():
    def needed(patch, batch):
        return batch * patch[0] * patch[1]

    assert fit_to_memory(needed, available=None, batch=8, patch=[64, 64], divisor=32) == (8, [64, 64])
    assert fit_to_memory(needed, available=10 * 64 * 64, batch=8, patch=[64, 64], divisor=32) == (8, [64, 64])
    assert fit_to_memory(needed, available=3 * 64 * 64, batch=8, patch=[64, 64], divisor=32) == (2, [64, 64])
    # Not even one 128x128 sample fits: the patch shrinks (multiples of 32) until one does.
    assert fit_to_memory(needed, available=int(1.2 * 64 * 64), batch=8, patch=[128, 128], divisor=32) == (1, [64, 64])
    with pytest.raises(ConfigError, match="one sample of patch 32x32 needs"):
        fit_to_memory(needed, available=100, batch=8, patch=[64, 64], divisor=32)


def test_plan_on_a_stubbed_device_lowers_the_micro_batch_and_sizes_a_budgeted_round(tmp_path, monkeypatch):
    import medtl.planner as planner
    from medtl.memory import estimate_training_memory
    from medtl.models.registry import build_model

    cfg = _cfg(tmp_path, batch_size=8)
    model = build_model("unet_resnet18", num_classes=2, pretrained="none")
    one = estimate_training_memory(model, (1, 32, 32), batch_size=1).total
    eight = estimate_training_memory(model, (1, 32, 32), batch_size=8).total
    # A device with room for about half the batch.
    monkeypatch.setattr(planner, "available_memory", lambda device: int((one + eight) / 2 / planner.MEMORY_HEADROOM))
    seen: list[dict] = []
    plan = plan_run(
        cfg,
        _items(),
        model,
        device=torch.device("cpu"),
        predict_slices=40,
        budget_s=3.0,
        events=EventSink(listeners=[seen.append]),
        seconds_per_step=0.25,
    )
    assert 1 <= plan.micro_batch < 8 and plan.patch_size == [32, 32]
    assert plan.steps == 12 and plan.train_s == pytest.approx(3.0)
    assert plan.predict_s > 0 and seen[-1]["event"] == "plan" and "on the CPU" in seen[-1]["message"]
    round_cfg = budgeted(cfg, plan.steps)
    assert round_cfg.train.epochs * round_cfg.train.steps_per_epoch >= 12
    assert round_cfg.optim.warmup_steps <= 2  # a short round does not spend its length warming up


def test_plan_summary_says_time_place_and_memory():
    plan = RoundPlan("cuda", 0.05, 80, 4.0, 0.4, 2**30, 8 * 2**30, 8, 4, [128, 128])
    assert plan.summary().startswith("about 4 s on your GPU (80 steps of batch 8, micro-batches of 4, patch 128x128")


def _write(array: np.ndarray, path: Path, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 1.1, 2.0))
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image


def _session_with_image(tmp_path: Path, direction=None):
    """A warm session holding a sagittally acquired volume (array axes permuted and flipped)."""
    rng = np.random.default_rng(1)
    array = rng.normal(0, 100, (20, 24, 28)).astype(np.float32)
    _write(array, tmp_path / "image.nrrd", direction)
    cfg = _cfg(tmp_path)
    cfg.preprocessing.slice_axis = "axial"
    session = WarmSession(EventSink())
    image = session.load_image(tmp_path / "image.nrrd", cfg)
    return session, image, cfg


SAGITTAL = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # a sagittal acquisition: array axes permuted and flipped


class Threshold(torch.nn.Module):
    """A "network" whose labels can be computed by hand: 1 where the windowed intensity exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10


def test_a_preview_is_exactly_the_full_prediction_of_that_slice_on_the_input_grid(tmp_path):
    from medtl.package import segment_with_network

    session, image, cfg = _session_with_image(tmp_path, SAGITTAL)
    model = Threshold()
    full, _probs = segment_with_network(cfg, model, image.image, grid=image.grid, volume=image.volume)
    full = sitk.GetArrayFromImage(full)
    # Window [-200, 250] -> 0.5 at 25 HU: the labels by hand, on the input's own array.
    assert np.array_equal(full, (sitk.GetArrayFromImage(image.image) > 25).astype(np.uint8))
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"), steps_done=3, epoch_losses=[0.5])
    previewed = 0
    for axis in range(3):
        session.control.view = (axis, 5)
        seen: list[dict] = []
        session.events = EventSink(listeners=[seen.append])
        Preview(session, image, cfg, tmp_path / "preview.npy")(trainer)
        if seen[-1]["event"] == "preview":
            plane = np.load(tmp_path / "preview.npy")
            assert np.array_equal(plane, np.moveaxis(full, axis, 0)[5]), axis
            previewed += 1
        else:  # a view in another plane than the network's is said, not guessed
            assert "learns axial slices" in seen[-1]["message"]
    assert previewed == 1  # exactly one input axis is the axial one


def test_slices_corrected_since_the_last_round_are_emphasised(tmp_path):
    session, image, cfg = _session_with_image(tmp_path)
    labels = np.full(image.volume.shape, 255, np.uint8)
    labels[[3, 9]] = 0
    labels[3, 5:10, 5:10] = 1
    first = session.samples(image, labels, cfg)
    assert [item.get("emphasis", 1.0) for item in first] == [1.0, 1.0]
    image.labels = labels.copy()
    labels[9, 2:4, 2:4] = 1  # a correction on slice 9, and slice 14 painted anew
    labels[14] = 0
    second = {item["slice"]: item.get("emphasis", 1.0) for item in session.samples(image, labels, cfg)}
    assert second == {3: 1.0, 9: CORRECTION_EMPHASIS, 14: CORRECTION_EMPHASIS}


def test_bad_requests_and_unpainted_labels_are_one_error_each_and_the_engine_stays_up(tmp_path):
    session, image, cfg = _session_with_image(tmp_path)
    _write(np.full((20, 24, 28), 255, np.uint8), tmp_path / "label.nrrd")
    cfg.save(tmp_path / "config.json")
    requests = [
        "this is not json",
        json.dumps({"request": "dance"}),
        json.dumps({"request": "learn", "id": "r1", "config": str(tmp_path / "config.json")}),
        json.dumps(
            {
                "request": "learn",
                "id": "r2",
                "config": str(tmp_path / "config.json"),
                "image": str(tmp_path / "image.nrrd"),
                "label": str(tmp_path / "label.nrrd"),
                "out": str(tmp_path / "out.nrrd"),
            }
        ),
    ]
    out = io.StringIO()
    assert serve(iter(requests), out, idle_exit_s=30) == 0  # the end of the requests is a shutdown
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    errors = [e for e in events if e["event"] == "error"]
    assert [e.get("round") for e in errors] == [None, None, "r1", "r2"]
    assert "not a request" in errors[0]["message"] and "unknown request 'dance'" in errors[1]["message"]
    assert "field 'image' is missing" in errors[2]["message"]
    assert "label.nrrd: every voxel is 255 (unknown)" in errors[3]["message"]
    assert not (tmp_path / "out.nrrd").exists()


def test_view_and_stop_requests_take_effect_while_a_round_waits_in_line():
    from medtl.serve import Control

    control, jobs = Control(), queue.Queue()
    lines = [
        json.dumps({"request": "learn", "id": "a"}),
        json.dumps({"request": "view", "axis": 2, "index": 7}),
        json.dumps({"request": "good_enough"}),
    ]
    reader = threading.Thread(target=read_requests, args=(iter(lines), control, jobs, EventSink()))
    reader.start()
    reader.join(10)
    assert control.view == (2, 7) and control.stop_reason() == "good enough"
    assert [jobs.get_nowait()["request"] for _ in range(2)] == ["learn", "shutdown"]


def test_medtl_plan_says_how_long_a_run_takes_before_it_runs(synthetic_dataset, hub_cache, tmp_path, capsys):
    from conftest import tiny_config
    from medtl.cli import main

    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_config(synthetic_dataset, tmp_path / "run")))
    assert main(["plan", str(config), "--events", "-"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    plan = next(e for e in events if e["event"] == "plan")
    assert plan["steps"] == 12 and plan["seconds_per_step"] > 0 and plan["memory_bytes"] > 0
    assert plan["train_s"] == pytest.approx(12 * plan["seconds_per_step"], abs=0.01)  # rounded to 10 ms
    assert plan["message"].startswith("about ") and "on the CPU" in plan["message"]
    assert not (tmp_path / "run").exists()  # a plan writes nothing


def test_a_later_round_continues_adams_moments_with_its_own_learning_rates(tmp_path):
    first = Trainer(_cfg(tmp_path, epochs=1), _items(), run_dir=tmp_path / "a")
    first.run_training()
    earlier = first.optimizer.state_dict()
    moment = next(iter(earlier["state"].values()))["exp_avg"].clone()
    later_cfg = RunConfig.from_dict({**_cfg(tmp_path).to_dict(), "optim": {"lr": 5e-4}})
    later = Trainer(later_cfg, _items(), run_dir=tmp_path / "b", model=first.model, optimizer_state=earlier)
    state = later.optimizer.state_dict()
    assert torch.equal(next(iter(state["state"].values()))["exp_avg"], moment)
    assert state["param_groups"][0]["initial_lr"] == pytest.approx(5e-4)  # this run's schedule
    other = {"state": earlier["state"], "param_groups": earlier["param_groups"][:1]}  # other parameters
    assert not later.continue_moments(other)
