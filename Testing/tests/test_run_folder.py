"""A run folder is never overwritten without being asked, never written by two runs at once, and
``--resume`` checks the checkpoint before it writes anything (issue 20)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config
from medtl.errors import OutputError
from medtl.run_folder import LOCK, RunLock
from test_bad_input import cli, fingerprint


def earlier_run(folder: Path, cfg: dict) -> dict[str, str]:
    """A folder as a finished run leaves it (its files' content does not matter here)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save({"model": {}, "optimizer": {}, "epoch": 0}, folder / "checkpoint.pt")
    (folder / "metrics.json").write_text('{"val_dice": 0.9}')
    (folder / "events.jsonl").write_text('{"event": "done"}\n')
    return fingerprint(folder)


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def cfg(tmp_path, synthetic_dataset) -> dict:
    return tiny_config(
        synthetic_dataset,
        tmp_path / "run",
        data={"val_fraction": 0.0},
        model={"name": "unet_resnet18", "pretrained": "none"},
        train={"epochs": 1, "steps_per_epoch": 1, "batch_size": 2},
    )


def test_a_folder_holding_a_run_is_not_overwritten_unless_asked(tmp_path, capsys, cfg):
    before = earlier_run(tmp_path / "run", cfg)
    config = write_config(tmp_path, cfg)
    code, lines = cli(capsys, "train", str(config))
    assert code == 2 and lines == [
        f"medtl: error: output_dir {tmp_path / 'run'} already holds a run (config.json, checkpoint.pt, metrics.json); "
        "continue it with --resume, replace it with --overwrite, or choose another output_dir"
    ]
    assert fingerprint(tmp_path / "run") == before
    code, lines = cli(capsys, "train", str(config), "--overwrite")
    assert code == 0, lines
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs_trained"] == 1
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start", "--overwrite starts a new event log"
    assert not (tmp_path / "run" / LOCK).exists()


def test_the_config_inside_the_run_folder_is_not_another_run(tmp_path, capsys, cfg):
    # The Slicer module writes config.json into a fresh run folder, then trains on it.
    (tmp_path / "run").mkdir()
    config = tmp_path / "run" / "config.json"
    config.write_text(json.dumps(cfg))
    code, lines = cli(capsys, "train", str(config))
    assert code == 0, lines
    assert (tmp_path / "run" / "model" / "medtl_package.json").is_file()


def test_a_run_that_failed_before_its_first_checkpoint_may_be_retried(tmp_path):
    from medtl.run_folder import FAILED, holds_run

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert holds_run(folder, None) == ["config.json"]
    (folder / FAILED).write_text('{"failed": true, "resumable": false}')
    assert holds_run(folder, None) == []
    (folder / "checkpoint.pt").write_bytes(b"")
    assert holds_run(folder, None) == ["config.json", "checkpoint.pt"]


def test_resume_without_a_checkpoint_is_an_error_and_writes_nothing(tmp_path, capsys, cfg):
    (tmp_path / "run").mkdir()
    code, lines = cli(capsys, "train", str(write_config(tmp_path, cfg)), "--resume")
    assert code == 2 and lines == [
        f"medtl: error: --resume: {tmp_path / 'run'} holds no checkpoint.pt to resume from; start without --resume"
    ]
    assert list((tmp_path / "run").iterdir()) == []


def damaged(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_weights_only(path: Path) -> None:
    torch.save({"model": argparse.Namespace(payload="code"), "optimizer": {}, "epoch": 0}, path)


@pytest.mark.parametrize("spoil", [damaged, not_weights_only])
def test_resume_checks_the_checkpoint_before_writing(tmp_path, capsys, cfg, spoil):
    earlier_run(tmp_path / "run", cfg)
    torch.save({"model": {"w": torch.zeros(1000)}, "optimizer": {}, "epoch": 0}, tmp_path / "run" / "checkpoint.pt")
    spoil(tmp_path / "run" / "checkpoint.pt")
    before = fingerprint(tmp_path / "run")
    code, lines = cli(
        capsys, "train", str(write_config(tmp_path, {**cfg, "train": {**cfg["train"], "epochs": 2}})), "--resume"
    )
    assert (
        code == 2
        and len(lines) == 1
        and lines[0].startswith(
            f"medtl: error: --resume: {tmp_path / 'run' / 'checkpoint.pt'} is damaged or not a MedTL checkpoint"
        )
    )
    assert fingerprint(tmp_path / "run") == before, "config.json was not replaced"


def test_resume_with_another_model_is_refused_before_config_json_changes(tmp_path, capsys, cfg):
    before = earlier_run(tmp_path / "run", cfg)
    changed = {**cfg, "model": {"name": "unet_resnet34", "pretrained": "none"}}
    code, lines = cli(capsys, "train", str(write_config(tmp_path, changed)), "--resume")
    assert code == 2 and len(lines) == 1
    assert "was trained with other model.name ('unet_resnet18', now 'unet_resnet34')" in lines[0]
    assert fingerprint(tmp_path / "run") == before


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys, cfg):
    (tmp_path / "run").write_text("not a folder")
    code, lines = cli(capsys, "train", str(write_config(tmp_path, cfg)))
    assert code == 2 and lines == [f"medtl: error: output_dir {tmp_path / 'run'}: is a file, not a folder"]
    assert (tmp_path / "run").read_text() == "not a folder"


def test_a_live_lock_is_an_error_and_a_stale_one_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK).write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename}))
        with pytest.raises(OutputError, match=f"another medtl run \\(process {other.pid}\\) is writing to this folder"):
            RunLock(folder).acquire()
    finally:
        other.kill()
        other.wait()
    # The process is gone: its lock is stale.
    with RunLock(folder):
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK).exists()


def test_a_second_concurrent_run_is_refused_and_the_first_one_ends_interrupted(tmp_path, capsys, cfg):
    """Two real ``medtl train`` processes into one folder: the second stops at the lock without
    touching the first's files; Ctrl-C then ends the first, which records it in events.jsonl."""
    long = {**cfg, "train": {**cfg["train"], "epochs": 200}}
    config = write_config(tmp_path, long)
    env = {**os.environ, "PYTHONPATH": str(REPO / "MedTLTraining")}
    first = subprocess.Popen(
        [sys.executable, "-m", "medtl", "train", str(config), "--events", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in first.stdout:  # wait for a checkpoint: the run is well under way
            if '"event": "checkpoint"' in line:
                break
        else:
            pytest.fail(f"the first run ended early: {first.stderr.read()[-2000:]}")
        code, lines = cli(capsys, "train", str(config), "--overwrite")
        assert code == 2 and len(lines) == 1
        assert f"another medtl run (process {first.pid}) is writing to this folder" in lines[0]
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "medtl: interrupted; the last checkpoint is kept (use --resume)"
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "interrupted" and events[-1]["message"] == "medtl: interrupted"
    assert all(e["event"] != "error" for e in events), "the refused run wrote nothing into the first one's log"
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run" / LOCK).exists()
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failed["interrupted"] and failed["resumable"]


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a small tmpfs needs root on Linux")
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, cfg, monkeypatch):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not allowed here (a container without CAP_SYS_ADMIN)")
    try:
        config = write_config(tmp_path, {**cfg, "output_dir": str(disk / "run")})
        # The free space is checked before anything is written ...
        code, lines = cli(capsys, "train", str(config))
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"medtl: error: {disk / 'run'}: only 1.0 MB free on its disk, the run")
        assert list(disk.iterdir()) == []
        # ... and a disk that fills up during the run (here: one the estimate missed) is one line too.
        import medtl.run_folder

        monkeypatch.setattr(medtl.run_folder, "run_bytes", lambda cfg: -(16 << 20))
        start = time.monotonic()
        code, lines = cli(capsys, "train", str(config))
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"medtl: error: cannot write {disk / 'run'}") and "no space left" in lines[0]
        assert list(disk.iterdir()) == [], "the failed run left nothing on the full disk"
        assert time.monotonic() - start < 300
    finally:
        import gc

        gc.collect()  # torch's failed stream writer may still hold its (deleted) file open
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=False)
