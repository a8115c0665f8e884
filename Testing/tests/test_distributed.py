"""Data-parallel training under torchrun, on the CPU with gloo: two processes sharing every batch
train the same network as one process with the whole batch, and rank 0 alone writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from medtl.config import RunConfig
from medtl.events import EventSink
from medtl.pipeline import run_training
from safetensors.torch import load_file
from test_classification import _config, _write_classification_set


def _torchrun(config, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "medtl"]
        + ["train", str(config), "--quiet", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


class _Stop(Exception):
    pass


def _ddp_config(csv, out) -> RunConfig:
    # DenseNet-121 has no dropout, and feature extraction keeps its BatchNorm layers in eval mode:
    # nothing depends on how the batch is split, so the two runs must agree to rounding.
    return _config(
        csv,
        out,
        model={"name": "cls_densenet121", "pretrained": "none"},
        strategy={"name": "feature_extraction"},
        preprocessing={"preset": "xray", "patch_size": [48, 48]},
        train={"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "device": "cpu"},
    )


def test_two_processes_train_what_one_process_trains_and_resume(tmp_path):
    csv = _write_classification_set(tmp_path, n=12)
    torch.set_num_threads(1)
    single = _ddp_config(csv, tmp_path / "single")
    run_training(single, events=EventSink())

    ddp = _ddp_config(csv, tmp_path / "ddp")
    ddp.save(tmp_path / "ddp.json")
    proc = _torchrun(tmp_path / "ddp.json")
    assert proc.returncode == 0, proc.stderr[-4000:]

    reference = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    trained = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert reference.keys() == trained.keys()
    head = [k for k in reference if "classifier" in k]
    assert head and not torch.allclose(reference[head[0]], _initial_head(single)[head[0].split("core.")[-1]])
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-6, msg=key)

    # Rank 0 alone wrote the run: one start (saying two processes), one line per epoch, one done.
    events = [json.loads(line) for line in (tmp_path / "ddp" / "events.jsonl").read_text("utf-8").splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("epoch") == 2 and kinds.count("done") == 1
    assert next(e for e in events if e["event"] == "start")["processes"] == 2
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text("utf-8"))
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text("utf-8"))
    assert metrics["final_loss"] == pytest.approx(single_metrics["final_loss"], rel=1e-4)
    assert metrics["val_auroc"] == pytest.approx(single_metrics["val_auroc"], abs=1e-6)
    assert (tmp_path / "ddp" / "report.html").is_file()

    # Cut after epoch 1 in one process, finished by two: still the same network.
    cut = _ddp_config(csv, tmp_path / "cut")
    cut.save(tmp_path / "cut.json")

    def stop_after_first_epoch(record):
        if record["event"] == "checkpoint" and record["epoch"] == 1:
            raise _Stop

    with pytest.raises(_Stop):
        run_training(cut, events=EventSink(listeners=[stop_after_first_epoch]))
    proc = _torchrun(tmp_path / "cut.json", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-6, msg=key)
    lines = (tmp_path / "cut" / "events.jsonl").read_text("utf-8")
    assert "resuming from epoch 1" in lines


def _initial_head(cfg: RunConfig) -> dict[str, torch.Tensor]:
    from medtl.models.registry import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, num_classes=cfg.num_classes, pretrained="none")
    return {k: v for k, v in model.core.state_dict().items() if "classifier" in k}


def test_a_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path):
    csv = _write_classification_set(tmp_path, n=8)
    cfg = _ddp_config(csv, tmp_path / "odd")
    cfg.train.batch_size = 3
    cfg.save(tmp_path / "odd.json")
    proc = _torchrun(tmp_path / "odd.json")
    assert proc.returncode != 0
    assert "'train.batch_size': 3 does not divide among 2 processes" in proc.stderr


def test_only_training_runs_under_torchrun(tmp_path, monkeypatch, capsys):
    from medtl.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["cv", str(tmp_path / "run.json"), "--folds", "2"]) == 2
    assert "only 'medtl train' runs under torchrun" in capsys.readouterr().err
