"""The module panels' shared lifecycle (MedTLExtensionLib.widget_lifecycle), headless on slicer-core:
a real MRML scene and VTK observers, with stand-ins for what needs Qt (the .ui widgets, the poll
timer) and for the engine job."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("slicer", reason="the Slicer-side tests need slicer-core")

import slicer  # noqa: E402
import vtk  # noqa: E402
from MedTLExtensionLib import run_prerequisites  # noqa: E402
from MedTLExtensionLib.widget_lifecycle import WidgetLifecycleMixin, is_set  # noqa: E402
from slicer.util import VTKObservationMixin  # noqa: E402


class Timer:
    """What the mixin uses of a qt.QTimer."""

    def __init__(self) -> None:
        self.active = False
        self.interval = None
        self.slots: dict[str, object] = {}

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def connect(self, signal: str, slot) -> None:
        self.slots[signal] = slot

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class ProgressBar:
    def __init__(self) -> None:
        self.value = None
        self.visible = True
        self.range = None

    def setRange(self, low: int, high: int) -> None:
        self.range = (low, high)

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False


class ParameterNode:
    """A parameter node wrapper's GUI connection, observable as the real one is (a VTK object)."""

    def __init__(self) -> None:
        self.vtk_object = vtk.vtkObject()
        self.connected = False
        self.outputDirectory = None

    def AddObserver(self, event, method, priority=0.0):
        return self.vtk_object.AddObserver(event, method, priority)

    def RemoveObserver(self, tag) -> None:
        self.vtk_object.RemoveObserver(tag)

    def Modified(self) -> None:
        self.vtk_object.Modified()

    def connectGui(self, ui) -> str:
        self.connected = True
        return "tag"

    def disconnectGui(self, tag) -> None:
        # After exit() the tag is None, as in Slicer's template: disconnecting again does nothing.
        self.connected = False


class Job:
    def __init__(self, batches: list[list[dict] | Exception]) -> None:
        self.batches = batches
        self.last_log = "engine log"
        self.cancelled = False

    @property
    def is_running(self) -> bool:
        return bool(self.batches)

    def poll(self) -> list[dict]:
        batch = self.batches.pop(0)
        if isinstance(batch, Exception):
            raise batch
        return batch

    def cancel(self) -> None:
        self.cancelled = True


class Panel(WidgetLifecycleMixin, VTKObservationMixin):
    def __init__(self, scene, job: Job) -> None:
        VTKObservationMixin.__init__(self)
        self.parent = SimpleNamespace(isEntered=True)
        self.ui = SimpleNamespace(progressBar=ProgressBar(), statusLabel=SimpleNamespace(text=""))
        self.nodes: list[ParameterNode] = []
        self.logic = SimpleNamespace(getParameterNode=self._newNode)
        self.calls: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self.observeScene(scene, job, Timer(), pollIntervalMs=250)

    def _newNode(self) -> ParameterNode:
        self.nodes.append(ParameterNode())
        return self.nodes[-1]

    def _updateButtons(self, caller=None, event=None) -> None:
        self.calls.append("updateButtons")

    def setDefaultParameters(self, parameterNode) -> None:
        parameterNode.outputDirectory = "runs"

    def onSceneClosing(self) -> None:
        self.calls.append("sceneClosing")

    def onJobFinished(self, job) -> None:
        self.calls.append("finished")

    def showError(self, text: str, detailedText: str = "") -> None:
        self.errors.append((text, detailedText))


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    yield scene
    # A scene destroyed at exit sends close events; the panels are gone by then.
    scene.RemoveAllObservers()


def test_setup_prepares_timer_and_progress_bar(scene) -> None:
    panel = Panel(scene, Job([]))
    assert panel._pollTimer.interval == 250
    assert panel._pollTimer.slots["timeout()"] == panel.onPollTimer
    assert panel.ui.progressBar.range == (0, 100) and not panel.ui.progressBar.visible


def test_parameter_node_follows_enter_exit_and_scene_close(scene) -> None:
    panel = Panel(scene, Job([]))
    panel.enter()
    first = panel.nodes[-1]
    assert first.connected and first.outputDirectory == "runs"

    panel.calls.clear()
    first.Modified()
    assert panel.calls == ["updateButtons"], "a parameter change updates the buttons"

    panel.exit()
    assert not first.connected
    panel.calls.clear()
    first.Modified()
    assert panel.calls == [], "a hidden panel must not follow parameter changes"

    panel.enter()
    panel.calls.clear()
    scene.Clear(0)  # StartCloseEvent, then EndCloseEvent
    assert panel.calls[0] == "sceneClosing"
    assert not panel.nodes[-2].connected, "the closed scene's parameter node is let go"
    assert panel.nodes[-1].connected, "an entered panel gets the new scene's parameter node"

    panel.parent.isEntered = False
    count = len(panel.nodes)
    scene.Clear(0)
    assert len(panel.nodes) == count, "a panel not shown waits for enter() to take a parameter node"


def test_poll_shows_progress_then_finishes_once(scene) -> None:
    job = Job([[{"event": "epoch", "epoch": 1, "epochs": 4}], []])
    panel = Panel(scene, job)
    panel.describeEvent = lambda event: (25, "epoch 1 of 4") if event["event"] == "epoch" else (None, "")
    panel._onJobStarted("Starting")
    assert panel._pollTimer.active and panel.ui.progressBar.visible and panel.ui.statusLabel.text == "Starting"

    panel.onPollTimer()
    assert (panel.ui.progressBar.value, panel.ui.statusLabel.text) == (25, "epoch 1 of 4")
    assert panel._pollTimer.active and "finished" not in panel.calls

    panel.onPollTimer()
    assert not panel._pollTimer.active
    assert panel.calls.count("finished") == 1 and panel.calls[-1] == "updateButtons"


def test_an_event_without_progress_keeps_the_bar(scene) -> None:
    panel = Panel(scene, Job([[{"event": "cancelled"}], []]))
    panel.describeEvent = lambda event: (None, "Cancelled.")
    panel._onJobStarted("Starting")
    panel.ui.progressBar.value = 40
    panel.onPollTimer()
    assert (panel.ui.progressBar.value, panel.ui.statusLabel.text) == (40, "Cancelled.")


def test_poll_error_stops_and_shows_the_log(scene) -> None:
    panel = Panel(scene, Job([RuntimeError("out of memory"), []]))
    panel._onJobStarted("Starting")
    panel.onPollTimer()
    assert not panel._pollTimer.active
    assert panel.ui.statusLabel.text == "Failed: out of memory"
    assert panel.errors == [("out of memory", "engine log")]
    assert "finished" not in panel.calls


def test_cleanup_stops_job_timer_and_observers(scene) -> None:
    job = Job([[], []])
    panel = Panel(scene, job)
    panel._onJobStarted("Starting")
    panel.cleanup()
    assert job.cancelled and not panel._pollTimer.active and not panel.Observations
    panel.calls.clear()
    scene.Clear(0)
    assert panel.calls == [], "a cleaned-up panel no longer reacts to the scene"


def test_is_set_reads_an_unset_path_parameter() -> None:
    from pathlib import Path

    assert not is_set(None) and not is_set("") and not is_set(Path("."))
    assert is_set(Path("/data/run")) and is_set("run")


def test_unusable_gpu_is_explained_once_per_session(monkeypatch) -> None:
    warnings: list[str] = []
    report = {"device": "cpu", "warning": "CUDA driver too old"}
    monkeypatch.setattr(run_prerequisites.dependencies.DEVICE_CHECK, "report", lambda device: report)
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **kwargs: warnings.append(text), raising=False)
    monkeypatch.setattr(run_prerequisites, "_warned_devices", set())
    assert run_prerequisites.usable_device("cuda") == "cpu"
    assert run_prerequisites.usable_device("cuda") == "cpu"
    assert len(warnings) == 1 and warnings[0].startswith("CUDA driver too old.")
    assert run_prerequisites.usable_device("cpu") == "cpu"


class PathLineEdit:
    """What the mixin uses of a ctkPathLineEdit bound to a Path parameter."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.currentPath, self.signalsBlocked, self.changes = name, path, False, []

    def property(self, key: str):
        return self.name if key == "SlicerParameterName" else None

    def blockSignals(self, block: bool) -> bool:
        before, self.signalsBlocked = self.signalsBlocked, block
        return before

    def __setattr__(self, key, value) -> None:
        if key == "currentPath" and hasattr(self, "changes") and not self.signalsBlocked:
            self.changes.append(value)  # the connector would write this back into the node
        object.__setattr__(self, key, value)


def test_unset_path_fields_show_empty_not_a_dot(scene) -> None:
    from pathlib import Path

    panel = Panel(scene, Job([]))
    unset, chosen = PathLineEdit("modelPackage", "."), PathLineEdit("dataPath", "/data/cases.csv")
    panel.ui.modelPackage, panel.ui.dataPath = unset, chosen
    node = ParameterNode()
    node.modelPackage, node.dataPath = Path("."), Path("/data/cases.csv")
    panel.setParameterNode(node)
    assert unset.currentPath == "" and unset.changes == []  # blanked with its signals blocked
    assert chosen.currentPath == "/data/cases.csv"
    unset.currentPath = "."  # the wrapper writes the unset value again after a change elsewhere
    node.Modified()
    assert unset.currentPath == ""
