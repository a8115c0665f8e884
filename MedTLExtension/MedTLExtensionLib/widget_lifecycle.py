"""The life of a MedTL module panel, written once for both modules: loading the .ui, the parameter
node (bound to the widgets, re-made when the scene closes), Slicer's enter/exit/cleanup calls, and
polling the engine process while a job runs.

Slicer's scripted-module template repeats this in every widget. Here it is the mixin
:class:`WidgetLifecycleMixin`, inherited by ``MedTLExtensionWidget`` and ``MedTLTrainingWidget``
beside ``ScriptedLoadableModuleWidget`` and ``VTKObservationMixin``; each widget keeps only what
is its own (its buttons, what a finished job shows) and answers a few hooks. This module imports
no Qt: the widget hands in its poll timer (a ``qt.QTimer``), and ``slicer.util``'s GUI helpers are
used only when the panel is built or an error is shown, so a test drives the lifecycle headless
with stand-ins.

Example (a module widget)::

    class MyWidget(WidgetLifecycleMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
        def setup(self):
            ScriptedLoadableModuleWidget.setup(self)
            self.logic = MyLogic()
            self.setupLifecycle("UI/My.ui", self.logic.run, qt.QTimer(), pollIntervalMs=500)
            self.ui.startButton.connect("clicked(bool)", self.onStartButton)
            self.initializeParameterNode()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import vtk

from .engine_process import describe_event
from .i18n import tr as _


def is_set(path: Path | str | None) -> bool:
    """Whether a path parameter holds a path. An unset pathlib parameter reads back as ``Path(".")``."""
    return path is not None and str(path) not in ("", ".")


class EngineJob(Protocol):
    """What the panel polls: ``SliceLearner`` and ``TrainingRun`` both fit."""

    is_running: bool
    last_log: str

    def poll(self) -> list[dict[str, Any]]: ...

    def cancel(self) -> None: ...


class WidgetLifecycleMixin:
    """Parameter node, scene close, enter/exit/cleanup and the poll loop of a MedTL module widget.

    The widget provides ``self.logic`` (with ``getParameterNode()``), ``self.parent``, the
    ``VTKObservationMixin`` methods and ``_updateButtons()``, and may override the hooks
    :meth:`setDefaultParameters`, :meth:`describeEvent`, :meth:`onJobFinished`,
    :meth:`onSceneClosing` and :meth:`stopJob`. Every ``self.ui.<name>`` used here must be in
    both modules' .ui files (Testing/tests/test_ui_consistency.py checks it).
    """

    logic = None
    job: EngineJob | None = None  # what the panel starts and polls, set by setupLifecycle
    _parameterNode = None
    _parameterNodeGuiTag = None
    _pollTimer = None

    # ------------------------------------------------------------------ hooks

    def setDefaultParameters(self, parameterNode) -> None:
        """Fills what the parameter node leaves unset (called whenever the node is (re)connected)."""

    def describeEvent(self, event: dict) -> tuple[int | None, str]:
        """Progress (0-100, or None to leave it) and status text for one engine event."""
        return describe_event(event)

    def onJobFinished(self, job: EngineJob) -> None:
        """Shows what a job that ended without an error left behind."""

    def onSceneClosing(self) -> None:
        """What the job must do when the scene closes (before the parameter node is dropped)."""

    def stopJob(self) -> None:
        """Stops the job when the module is cleaned up (Slicer closes or the module reloads)."""
        self.job.cancel()

    # ------------------------------------------------------------------ setup and Slicer's calls

    def setupLifecycle(self, uiFile: str, job: EngineJob, pollTimer, *, pollIntervalMs: int) -> None:
        """Loads ``Resources/<uiFile>`` into the panel, observes the scene closing, prepares polling ``job``."""
        import slicer

        uiWidget = slicer.util.loadUI(self.resourcePath(uiFile))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects mrmlSceneChanged to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.observeScene(slicer.mrmlScene, job, pollTimer, pollIntervalMs=pollIntervalMs)

    def observeScene(self, scene, job: EngineJob, pollTimer, *, pollIntervalMs: int) -> None:
        """The Qt-free part of :meth:`setupLifecycle`: scene observers, progress bar, poll timer."""
        self.job = job
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self._pollTimer = pollTimer
        self._pollTimer.setInterval(pollIntervalMs)
        self._pollTimer.connect("timeout()", self.onPollTimer)

    def cleanup(self) -> None:
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.job is not None:
            self.stopJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Disconnect so that parameter changes made elsewhere do not update a hidden GUI;
        # a running job keeps being polled.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self.job is not None:
            self.onSceneClosing()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.setDefaultParameters(self._parameterNode)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self.blankUnsetPaths()
        self._updateButtons()

    def blankUnsetPaths(self) -> None:
        """Path fields left unset show an empty box, not the "." an unset ``pathlib.Path`` parameter
        writes into its path widget (with the widget's signals blocked: nothing is written back)."""
        node = self._parameterNode
        if node is None:
            return
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "currentPath") else None
            if name and isinstance(getattr(node, name, None), Path) and not is_set(getattr(node, name)):
                if widget.currentPath:
                    blocked = widget.blockSignals(True)
                    widget.currentPath = ""
                    widget.blockSignals(blocked)

    # ------------------------------------------------------------------ the running job

    def _onJobStarted(self, message: str) -> None:
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = message
        self._pollTimer.start()
        self._updateButtons()

    def onPollTimer(self) -> None:
        job = self.job
        try:
            for event in job.poll():
                progress, text = self.describeEvent(event)
                if progress is not None:
                    self.ui.progressBar.value = progress
                if text:
                    self.ui.statusLabel.text = text
        except Exception as error:
            self._pollTimer.stop()
            self.ui.statusLabel.text = _("Failed: {message}").format(message=error)
            self._updateButtons()
            self.showError(str(error), detailedText=job.last_log)
            return
        if job.is_running:
            return
        self._pollTimer.stop()
        self.onJobFinished(job)
        self._updateButtons()

    def showError(self, text: str, detailedText: str = "") -> None:
        """Shows a failed job's message with the engine's log as details."""
        import slicer.util

        slicer.util.errorDisplay(text, detailedText=detailedText)
