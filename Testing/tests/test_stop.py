"""The engine's side of a cooperative stop: the training loop sees the stop file at its next step,
the command line reports ``cancelled`` and exits with its own status."""

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
from conftest import tiny_config
from medtl import cli
from medtl.config import RunConfig
from medtl.stop import CANCELLED_EXIT_CODE, STOP_FILE_ENV, Cancelled, check_stop, stop_requested
from medtl.train import fit


def test_no_stop_file_means_no_stop(monkeypatch, tmp_path):
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    assert not stop_requested()
    monkeypatch.setenv(STOP_FILE_ENV, str(tmp_path / "stop"))
    check_stop()  # named but not created yet
    (tmp_path / "stop").touch()
    with pytest.raises(Cancelled, match="during epoch 3"):
        check_stop("epoch 3")


def test_fit_stops_at_the_next_step(monkeypatch, tmp_path):
    cfg = RunConfig.from_dict(
        {
            "model": {"name": "unet_resnet18", "pretrained": "none"},
            "preprocessing": {"patch_size": [32, 32]},
            "augmentation": "none",
            "strategy": {"name": "full_finetune"},
            "train": {"epochs": 3, "steps_per_epoch": 2, "batch_size": 2, "device": "cpu"},
        }
    )
    rng = np.random.default_rng(0)
    items = [
        {"image": rng.random((1, 32, 32), dtype=np.float32), "label": (rng.random((1, 32, 32)) > 0.5).astype("int64")}
    ]
    stop = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    steps = []

    class Listener:
        def emit(self, event, **fields):
            steps.append((event, fields.get("epoch")))
            if event == "epoch" and fields["epoch"] == 1:
                stop.touch()  # asked while epoch 1's checkpoint is being written
            return {}

    with pytest.raises(Cancelled, match="epoch 2"):
        fit(cfg, items, run_dir=tmp_path / "run", events=Listener())
    assert ("checkpoint", 1) in steps and not any(e == "step" and epoch == 2 for e, epoch in steps)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_the_command_line_reports_a_stop_with_its_own_status(monkeypatch, tmp_path, synthetic_dataset):
    monkeypatch.setenv(STOP_FILE_ENV, "")  # --stop-file sets it for the process; undone after the test
    config = tmp_path / "run.json"
    cfg = tiny_config(synthetic_dataset, tmp_path / "run", model={"name": "unet_mobilenet_v2", "pretrained": "none"})
    config.write_text(json.dumps(cfg))
    stop = tmp_path / "stop"
    stop.touch()
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["train", str(config), "--events", "-", "--stop-file", str(stop)])
    assert code == CANCELLED_EXIT_CODE
    events = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "cancelled" and "epoch 1" in events[-1]["message"]
    assert not (tmp_path / "run" / "model").exists()
