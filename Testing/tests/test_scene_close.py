"""Closing the scene or the module during a job, headless on slicer-core against the real engine:
the job stops at once, the engine process goes, and nothing is imported into the scene afterwards."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("slicer", reason="the Slicer-side tests need slicer-core")

from MedTLExtensionLib import mrml_bridge  # noqa: E402
from MedTLExtensionLib.engine_process import EngineProcess, start_engine  # noqa: E402
from MedTLExtensionLib.headless_scene import create_headless_scene  # noqa: E402
from MedTLExtensionLib.slice_learning import LearningOptions, SliceLearner  # noqa: E402

SHAPE = (8, 48, 48)
OPTIONS = LearningOptions(epochs=200, steps_per_epoch=8, batch_size=2, device="cpu", pretrained="none")


def painted_scene():
    headless = create_headless_scene()
    k, j, i = np.indices(SHAPE, dtype=float)
    truth = (((j - 24) / 12) ** 2 + ((i - 24) / 10) ** 2 < 1).astype(np.uint8)
    image = np.where(truth > 0, 150.0, -80.0).astype(np.float32)
    ijk_to_ras = np.diag([0.8, 0.8, 2.5, 1.0])
    volume = mrml_bridge.array_to_volume(headless.scene, image, ijk_to_ras, "phantom")
    painted = np.zeros(SHAPE, np.uint8)
    painted[[2, 5]] = truth[[2, 5]]
    segmentation = mrml_bridge.labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        painted,
        ijk_to_ras,
        [(1, "organ", (0.9, 0.5, 0.3))],
        reference_volume=volume,
    )
    return headless, volume, segmentation


def started_learner(tmp_path):
    headless, volume, segmentation = painted_scene()
    engines: list[EngineProcess] = []

    def engine(args):
        engines.append(start_engine(args))
        return engines[-1]

    learner = SliceLearner(headless.scene, headless.segmentations_logic, work_root=tmp_path, engine_factory=engine)
    learner.start_learning(volume, segmentation, OPTIONS)
    events: list[dict] = []
    deadline = time.monotonic() + 300
    while not any(e["event"] == "step" for e in events):
        assert learner.is_running and time.monotonic() < deadline, learner.last_log
        events += learner.poll()
        time.sleep(0.05)
    return headless, learner, engines[0]


def ends_within(run: EngineProcess, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while run.returncode is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_closing_the_scene_stops_the_job_and_imports_nothing(tmp_path):
    headless, learner, engine = started_learner(tmp_path)
    started = time.monotonic()
    learner.on_scene_closed()
    assert time.monotonic() - started < 0.5, "the scene close waited for the engine"
    headless.scene.Clear(0)
    assert not learner.is_running and learner.poll() == []
    assert ends_within(engine, 30), "the engine still runs after the scene was closed"
    assert engine.returncode != 0
    nodes = headless.scene.GetNumberOfNodes()
    time.sleep(0.5)
    assert learner.poll() == [] and headless.scene.GetNumberOfNodes() == nodes
    assert learner.result_segmentation is None and learner.under_review is None


def test_closing_the_module_kills_the_engine_at_once(tmp_path):
    _headless, learner, engine = started_learner(tmp_path)
    started = time.monotonic()
    learner.close()
    assert time.monotonic() - started < 0.5
    assert not learner.is_running
    assert ends_within(engine, 5), "killed, not left to a grace period"
    assert engine.returncode < 0  # by a signal, not the engine's own exit
