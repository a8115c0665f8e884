"""The warm engine (``medtl serve``) behind the semi-automatic loop, headless on slicer-core, against
the real engine in a real child process: two rounds on one process, live previews while it learns,
"Good enough", cancel, and a crash the next round recovers from."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("slicer", reason="the Slicer-side tests need slicer-core")

from MedTLExtensionLib import mrml_bridge  # noqa: E402
from MedTLExtensionLib.headless_scene import create_headless_scene  # noqa: E402
from MedTLExtensionLib.slice_learning import LearningOptions, SliceLearner  # noqa: E402
from MedTLExtensionLib.warm_engine import WarmEngine  # noqa: E402

SHAPE = (16, 64, 64)  # K, J, I
PAINTED = (4, 8, 11)
SEGMENTS = [(1, "organ", (0.9, 0.5, 0.3))]
# Small rounds: the protocol is under test here, not what the network learns.
OPTIONS = LearningOptions(
    epochs=3,
    steps_per_epoch=6,
    batch_size=2,
    device="cpu",
    pretrained="none",
    network="unet_resnet18",
    budget_s=0,
    later_budget_s=0,
    preview_every_s=0.3,
)


def drain(learner: SliceLearner, until=None, timeout_s: float = 300) -> list[dict]:
    events: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while learner.is_running and not (until and until(events)):
        events += learner.poll()
        assert time.monotonic() < deadline, "the round did not end"
        time.sleep(0.02)
    return events


@pytest.fixture()
def scene_with_painting():
    headless = create_headless_scene()
    k, j, i = np.indices(SHAPE, dtype=float)
    organ = ((k - 8) / 6) ** 2 + ((j - 32) / 18) ** 2 + ((i - 30) / 20) ** 2 < 1
    image = np.where(organ, 160.0, -90.0) + np.random.default_rng(0).normal(0, 10, SHAPE)
    ijk_to_ras = np.diag([0.8, 0.8, 2.5, 1.0])
    volume = mrml_bridge.array_to_volume(headless.scene, image.astype(np.float32), ijk_to_ras, "phantom")
    painted = np.zeros(SHAPE, np.uint8)
    painted[list(PAINTED)] = organ[list(PAINTED)]
    user = mrml_bridge.labelmap_to_segmentation(
        headless.scene, headless.segmentations_logic, painted, ijk_to_ras, SEGMENTS, reference_volume=volume
    )
    return headless, volume, user, painted


def test_two_rounds_on_one_warm_engine_with_previews(scene_with_painting, tmp_path):
    headless, volume, user, painted = scene_with_painting
    warm = WarmEngine()
    learner = SliceLearner(headless.scene, headless.segmentations_logic, work_root=tmp_path, warm_engine=warm)
    try:
        learner.set_view(0, 8)  # the user looks at slice 8
        learner.start_learning(volume, user, OPTIONS)
        overlay_seen = []

        def preview_seen(events):
            if any(e["event"] == "preview" for e in events) and learner.preview.node is not None:
                overlay_seen.append(mrml_bridge.volume_to_array(learner.preview.node)[0].copy())
            return False

        first = drain(learner, until=preview_seen)
        kinds = [e["event"] for e in first]
        previews = [e for e in first if e["event"] == "preview"]
        # Previews arrive while it learns, before the round's end, for the slice in view.
        assert previews and kinds.index("preview") < kinds.index("done")
        assert all((e["axis"], e["index"]) == (0, 8) for e in previews)
        assert overlay_seen and set(np.unique(overlay_seen[-1])) <= {0, 1}
        assert learner.preview.node is None  # the overlay goes when the prediction arrives
        assert learner.result_segmentation is not None and learner.rounds == 1
        pid = warm.process.pid

        # A second round (a correction erased on slice 2) on the same process, without a new start-up.
        review = learner.under_review
        predicted, _ = mrml_bridge.segmentation_to_labelmap(
            headless.scene, headless.segmentations_logic, review, volume
        )
        predicted[2] = 0
        mrml_bridge.replace_segment_voxels(
            review, mrml_bridge.list_segment_ids(review.GetSegmentation())[0], predicted == 1, volume
        )
        learner.start_learning(volume, user, OPTIONS)
        second = drain(learner)
        assert warm.process.pid == pid and warm.starts == 1
        assert not any(e["event"] == "ready" for e in second)  # torch, MONAI and the network stayed loaded
        done = next(e for e in second if e["event"] == "done")
        assert done["planned"]["seconds_per_step"] > 0
        assert learner.rounds == 2 and learner.last_package is not None and learner.last_package.is_dir()
    finally:
        learner.close()


def test_good_enough_stops_within_a_step_and_predicts(scene_with_painting, tmp_path):
    headless, volume, user, _painted = scene_with_painting
    learner = SliceLearner(headless.scene, headless.segmentations_logic, work_root=tmp_path, warm_engine=WarmEngine())
    long = LearningOptions(**{**OPTIONS.__dict__, "epochs": 50, "steps_per_epoch": 20})
    try:
        learner.start_learning(volume, user, long)
        events = drain(learner, until=lambda ev: sum(e["event"] == "step" for e in ev) >= 3)
        assert learner.good_enough()
        asked_at = max(e["step"] for e in events if e["event"] == "step")
        events += drain(learner)
        done = next(e for e in events if e["event"] == "done")
        assert done["stopped"] == "good enough"
        # The request file is read within 50 ms; the step running then finishes, at most one more starts.
        assert done["steps"] <= asked_at + 2 < 1000
        assert learner.result_segmentation is not None
    finally:
        learner.close()


def test_cancel_keeps_the_warm_engine_and_a_crash_starts_a_fresh_one(scene_with_painting, tmp_path):
    headless, volume, user, painted = scene_with_painting
    warm = WarmEngine()
    learner = SliceLearner(headless.scene, headless.segmentations_logic, work_root=tmp_path, warm_engine=warm)
    long = LearningOptions(**{**OPTIONS.__dict__, "epochs": 50, "steps_per_epoch": 20})
    try:
        learner.start_learning(volume, user, long)
        drain(learner, until=lambda ev: any(e["event"] == "step" for e in ev))
        learner.cancel()
        events = drain(learner, timeout_s=60)
        assert events[-1]["event"] == "cancelled" and warm.alive and warm.starts == 1

        # The engine dies mid-round (a crash, the out-of-memory killer): one message, nothing lost.
        learner.start_learning(volume, user, long)
        drain(learner, until=lambda ev: any(e["event"] == "step" for e in ev))
        os.killpg(warm.process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="stopped unexpectedly.*next round starts a fresh engine"):
            drain(learner, timeout_s=60)
        assert not learner.is_running
        labels, _ = mrml_bridge.segmentation_to_labelmap(headless.scene, headless.segmentations_logic, user, volume)
        assert np.array_equal(labels > 0, painted > 0)  # the user's painting untouched

        learner.start_learning(volume, user, OPTIONS)
        events = drain(learner)
        assert any(e["event"] == "done" for e in events) and warm.starts == 2
        assert learner.result_segmentation is not None
    finally:
        learner.close()


def test_the_slice_in_view_is_the_slice_a_jump_shows(scene_with_painting):
    from MedTLExtensionLib.slice_learning import slice_center_ras, slice_index_at_ras

    headless, volume, _user, _painted = scene_with_painting
    for axis, size in enumerate(SHAPE):
        for index in (0, size // 2, size - 1):
            assert slice_index_at_ras(volume, axis, slice_center_ras(volume, axis, index)) == index
    assert slice_index_at_ras(volume, 0, (0.0, 0.0, -500.0)) is None  # outside the volume


def test_the_preview_overlay_updates_one_slice_in_place_and_goes(scene_with_painting):
    from MedTLExtensionLib.live_preview import PreviewOverlay

    headless, volume, _user, _painted = scene_with_painting
    overlay = PreviewOverlay(headless.scene)
    plane = np.zeros(SHAPE[1:], np.uint8)
    plane[10:20, 5:9] = 1
    overlay.show(volume, axis=0, index=3, plane=plane)
    node = overlay.node
    overlay.show(volume, axis=2, index=7, plane=np.ones((SHAPE[0], SHAPE[1]), np.uint8))
    assert overlay.node is node  # updated in place, not a node per preview
    voxels = mrml_bridge.volume_to_array(node)[0]
    assert np.array_equal(voxels[3][:, :7], plane[:, :7]) and voxels[:, :, 7].all()
    assert np.allclose(mrml_bridge.ijk_to_ras_of(node), mrml_bridge.ijk_to_ras_of(volume))
    with pytest.raises(ValueError, match="does not fit"):
        overlay.show(volume, axis=0, index=3, plane=np.zeros((5, 5), np.uint8))
    overlay.clear()
    assert headless.scene.GetNodeByID(node.GetID()) is None and overlay.node is None


class FakeEngineProcess:
    """An engine that takes its time to die after a kill, as a real process tree does."""

    def __init__(self, args) -> None:
        self.args, self.sent, self.killed, self.log = list(args), [], False, ""

    @property
    def returncode(self):
        return None  # still running: the kill has not landed yet

    def poll(self):
        return []

    def send(self, request) -> bool:
        self.sent.append(dict(request))
        return True

    def kill(self) -> None:
        self.killed = True


def test_a_killed_engine_is_replaced_at_once_not_sent_the_next_round():
    started: list[FakeEngineProcess] = []
    warm = WarmEngine(starter=lambda args: started.append(FakeEngineProcess(args)) or started[-1])
    warm.start()
    assert started[0].args[:1] == ["serve"] and warm.starts == 1
    warm.kill()  # new packages were installed: the old engine must not take the next round
    warm.round({"request": "learn"})
    assert started[0].killed and started[0].sent == []
    assert warm.starts == 2 and started[1].sent[0]["request"] == "learn" and started[1].sent[0]["id"] == "round-1"
