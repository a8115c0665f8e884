"""Cleaning up the MedTL module's run folders: only MedTL's own, never one still in use."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from MedTLExtensionLib.run_folders import RUN_NAME, clean_run_folders, run_folders


def make_run(root: Path, name: str, size: int = 1000, age_s: float = 0.0) -> Path:
    folder = root / name
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.safetensors").write_bytes(b"x" * size)
    stamp = time.time() - age_s
    for path in (folder / "model" / "weights.safetensors", folder / "model", folder):
        os.utime(path, (stamp, stamp))
    return folder


def test_only_medtl_runs_not_in_use_are_removed(tmp_path):
    old_learn = make_run(tmp_path, "20261101-101500-learn-phantom", 3000)
    apply = make_run(tmp_path, "20261101-111500-apply-phantom~2", 500)
    current = make_run(tmp_path, "20261102-090000-learn-liver", 7000)
    users = make_run(tmp_path, "my-own-runs", 100)  # not named by MedTL: never touched
    (tmp_path / "notes.txt").write_text("mine")

    assert [r.kind for r in run_folders(tmp_path)] == ["learn", "apply", "learn"]
    preview = clean_run_folders(tmp_path, keep=[current / "model", None, "."], dry_run=True)
    assert preview.removed == [old_learn, apply] and preview.freed == 3500 and old_learn.is_dir()

    done = clean_run_folders(tmp_path, keep=[current / "model"])
    assert done.removed == [old_learn, apply] and done.kept == [current]
    assert not old_learn.exists() and not apply.exists()
    assert current.is_dir() and users.is_dir() and (tmp_path / "notes.txt").is_file()


def test_recent_runs_can_be_kept(tmp_path):
    old = make_run(tmp_path, "20261101-101500-adapt-ct", age_s=3 * 86400)
    recent = make_run(tmp_path, "20261130-101500-learn-ct")
    result = clean_run_folders(tmp_path, older_than_s=86400)
    assert result.removed == [old] and recent.is_dir()


def test_the_learner_names_its_runs_so_that_cleanup_finds_them(tmp_path):
    pytest.importorskip("slicer", reason="the Slicer-side tests need slicer-core")
    from MedTLExtensionLib.headless_scene import create_headless_scene
    from MedTLExtensionLib.slice_learning import SliceLearner

    headless = create_headless_scene()
    learner = SliceLearner(headless.scene, headless.segmentations_logic, work_root=tmp_path)
    for kind in ("learn", "apply", "adapt"):
        run_dir = learner._new_run_dir("CT chest (2)", kind)
        assert RUN_NAME.fullmatch(run_dir.name), run_dir.name
        (run_dir.parent / f"{run_dir.name}~2").mkdir()  # what a second run in the same second is called
    assert len(run_folders(tmp_path)) == 6
