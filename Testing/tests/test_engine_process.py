"""The Slicer modules' process runner driving the real engine in a real child process."""

import json
import sys
import time

import pytest
from conftest import tiny_config
from MedTLExtensionLib.engine_process import EngineProcess, EngineRun


def _wait_for(run: EngineProcess, predicate, timeout: float = 300.0) -> list[dict]:
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += run.poll()
        if predicate(seen) or run.returncode is not None:
            seen += run.poll()
            return seen
        time.sleep(0.05)
    run.cancel()
    pytest.fail(f"engine did not get there in {timeout} s; log:\n{run.log}")


def test_start_cancel_resume_and_result(tmp_path, synthetic_dataset, hub_cache):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_config(synthetic_dataset, tmp_path / "run", train={"epochs": 6})))
    run = EngineProcess(["train", str(config)], python=sys.executable)
    assert isinstance(run, EngineRun)
    seen = _wait_for(run, lambda ev: any(e["event"] == "checkpoint" for e in ev))
    assert seen[0]["event"] == "start" and seen[0]["total_steps"] == 24
    assert any(e["event"] == "step" and "eta_s" in e for e in seen)
    run.cancel()
    assert run.returncode not in (None, 0)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert not (tmp_path / "run" / "model").exists()

    resumed = EngineProcess(["train", str(config), "--resume"], python=sys.executable)
    events = _wait_for(resumed, lambda ev: False)
    assert resumed.returncode == 0, resumed.log
    messages = [e["message"] for e in events if e["event"] == "message"]
    assert any(m.startswith("resuming from epoch") for m in messages)
    first_epoch = min(e["epoch"] for e in events if e["event"] == "epoch")
    assert first_epoch > 1
    done = events[-1]
    assert done["event"] == "done" and (tmp_path / "run" / "model" / "medtl_package.json").is_file()
    assert "val_dice" in done["metrics"]


def test_engine_error_reaches_the_caller_as_one_message(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": {"name": "unet_vgg"}}))
    run = EngineProcess(["train", str(config)], python=sys.executable)
    assert run.wait(120) == 2
    events = run.poll()
    assert [e["event"] for e in events] == ["error"]
    assert run.error_message and "'model.name'" in run.error_message and "unet_resnet18" in run.error_message
