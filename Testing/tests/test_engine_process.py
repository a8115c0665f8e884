"""The Slicer modules' process runner driving the real engine in a real child process, and behind a
launcher that, like CTKAppLauncher (``PythonSlicer``), starts the engine as its own child and forwards
no signal."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import tiny_config
from medtl.stop import CANCELLED_EXIT_CODE, STOP_FILE_ENV
from MedTLExtensionLib.engine_process import EngineJob, EngineProcess, EngineRun, engine_environment, popen_options

LAUNCHER = """
import os, subprocess, sys
from pathlib import Path

# What CTKAppLauncher does: start the real Python as a child, forward no signal, exit with its status.
command = [sys.executable, *sys.argv[1:]]
if os.environ.get("STANDIN_CHILD") == "stubborn":
    # An engine deaf to everything but SIGKILL, as one stuck in a long native call.
    command = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "time.sleep(600)"]
child = subprocess.Popen(command)
Path(os.environ["STANDIN_PID_FILE"]).write_text(str(child.pid))
sys.exit(child.wait())
"""


@pytest.fixture
def launcher(tmp_path) -> Path:
    script = tmp_path / "PythonSlicer.py"
    script.write_text(textwrap.dedent(LAUNCHER))
    # A wrapper executable, so that EngineProcess runs "<launcher> -m medtl ..." as it runs PythonSlicer.
    wrapper = tmp_path / "PythonSlicer"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that never reaps it counts as gone)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").is_file():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def engine_pid(pid_file: Path, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while not (pid_file.is_file() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the launcher stand-in did not start its child"
        time.sleep(0.05)
    return int(pid_file.read_text())


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_for(run: EngineProcess, predicate, timeout: float = 300.0) -> list[dict]:
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += run.poll()
        if predicate(seen) or run.returncode is not None:
            seen += run.poll()
            return seen
        time.sleep(0.05)
    run.kill()
    pytest.fail(f"engine did not get there in {timeout} s; log:\n{run.log}")


@pytest.mark.skipif(os.name == "nt", reason="the stand-in launcher is a POSIX shell wrapper")
def test_cancel_through_a_launcher_stops_the_engine_and_resume_continues(
    tmp_path, synthetic_dataset, hub_cache, launcher
):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_config(synthetic_dataset, tmp_path / "run", train={"epochs": 12})))
    pid_file = tmp_path / "engine.pid"
    run = EngineProcess(["train", str(config)], python=str(launcher), env={"STANDIN_PID_FILE": str(pid_file)})
    job = EngineJob(run, "Training")
    assert isinstance(run, EngineRun)
    engine = engine_pid(pid_file)
    assert engine != run.pid
    seen = _wait_for(run, lambda ev: any(e["event"] == "checkpoint" for e in ev))
    assert seen[0]["event"] == "start" and seen[0]["total_steps"] == 48
    assert any(e["event"] == "step" and "eta_s" in e for e in seen)

    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 0.5, "cancel blocked the caller"
    assert gone_within(engine, 30), "the engine (the launcher's child) still runs after cancel"
    deadline = time.monotonic() + 30
    while not job.finished:
        seen += job.poll()  # must not raise: a requested stop is not a failure
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert run.returncode == CANCELLED_EXIT_CODE, run.log
    assert job.cancelled and job.error is None
    assert seen[-1]["event"] == "cancelled"
    last = max(e["epoch"] for e in seen if e["event"] == "checkpoint")
    assert last < 12

    import torch

    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] + 1 == last and len(checkpoint["history"]) == last
    assert not (tmp_path / "run" / "model").exists()
    assert not run.stop_file.exists()

    resumed = EngineProcess(["train", str(config), "--resume"], python=sys.executable)
    events = _wait_for(resumed, lambda ev: False)
    assert resumed.returncode == 0, resumed.log
    messages = [e["message"] for e in events if e["event"] == "message"]
    assert f"resuming from epoch {last}" in " ".join(messages)
    assert min(e["epoch"] for e in events if e["event"] == "epoch") == last + 1
    done = events[-1]
    assert done["event"] == "done" and (tmp_path / "run" / "model" / "medtl_package.json").is_file()
    assert "val_dice" in done["metrics"]


@pytest.mark.skipif(os.name == "nt", reason="the stand-in launcher is a POSIX shell wrapper")
def test_an_engine_that_does_not_stop_is_killed_with_its_launcher(tmp_path, launcher):
    pid_file = tmp_path / "engine.pid"
    run = EngineProcess(
        ["models"], python=str(launcher), env={"STANDIN_PID_FILE": str(pid_file), "STANDIN_CHILD": "stubborn"}
    )
    engine = engine_pid(pid_file)
    started = time.monotonic()
    run.cancel(grace_s=1.0)
    assert time.monotonic() - started < 0.5
    assert alive(engine), "killed before its grace period"
    assert gone_within(engine, 10)
    deadline = time.monotonic() + 10
    while run.returncode is None:
        assert time.monotonic() < deadline, "the run never reported its end"
        time.sleep(0.05)
    assert run.returncode != 0


@pytest.mark.skipif(os.name == "nt", reason="the stand-in launcher is a POSIX shell wrapper")
def test_engines_die_with_the_application(tmp_path, launcher):
    """Slicer's exit: an engine still running is killed, even one whose launcher forwards nothing."""
    pid_file = tmp_path / "engine.pid"
    host = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path[:0] = {[str(Path(__file__).resolve().parents[2] / d) for d in ("MedTLTraining", "MedTLExtension")]!r}
        from MedTLExtensionLib.engine_process import EngineProcess
        run = EngineProcess(["models"], python={str(launcher)!r},
                            env={{"STANDIN_PID_FILE": {str(pid_file)!r}, "STANDIN_CHILD": "stubborn"}})
        while not Path({str(pid_file)!r}).is_file():
            time.sleep(0.05)
        """
    )
    subprocess.run([sys.executable, "-c", host], check=True, timeout=60)
    assert gone_within(engine_pid(pid_file), 10)


def test_a_stop_the_engine_recognised_is_not_an_error():
    class Stopped:
        returncode = CANCELLED_EXIT_CODE
        log = "medtl: stopped on request during epoch 2"

        def poll(self):
            return [{"event": "cancelled", "message": "stopped on request during epoch 2"}]

        def cancel(self):
            raise AssertionError("not asked to cancel")

    job = EngineJob(Stopped())
    assert job.poll()[0]["event"] == "cancelled"
    assert job.finished and job.cancelled


def test_processes_start_hidden_in_their_own_group_with_a_stop_file():
    assert popen_options(windows=False) == {"start_new_session": True}
    windows = popen_options(windows=True)
    assert windows["creationflags"] & 0x200  # CREATE_NEW_PROCESS_GROUP
    env = engine_environment({STOP_FILE_ENV: "/tmp/x"}, base={"PYTHONPATH": "/elsewhere", "HOME": "/h"})
    assert env[STOP_FILE_ENV] == "/tmp/x" and env["HOME"] == "/h"
    assert env["PYTHONPATH"].endswith(os.pathsep + "/elsewhere") and env["PYTHONUNBUFFERED"] == "1"
    run = EngineProcess(["models"], python=sys.executable)
    if os.name != "nt":
        assert os.getpgid(run.pid) == run.pid != os.getpgid(0)  # its own group, which cancel kills as a whole
    assert run.wait(120) == 0


def test_engine_error_reaches_the_caller_as_one_message(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": {"name": "unet_vgg"}}))
    run = EngineProcess(["train", str(config)], python=sys.executable)
    assert run.wait(120) == 2
    events = run.poll()
    assert [e["event"] for e in events] == ["error"]
    assert run.error_message and "'model.name'" in run.error_message and "unet_resnet18" in run.error_message
