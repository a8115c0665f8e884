"""MedTL: learn a segmentation from a few painted slices, apply model packages, review the result.

The module file is the thin GUI layer of MedTL: widgets bound to a parameter node, and a logic that
moves data between the scene and files (through ``MedTLExtensionLib.mrml_bridge``) and runs the
engine (``python -m medtl``) as a separate process whose JSON-lines events are polled.
"""

import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import qt
import slicer
import vtk
from MedTLExtensionLib import mrml_bridge
from MedTLExtensionLib.engine_process import EngineRun
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEVICES = ("auto", "cpu", "cuda")

# Engine packages installed with pip on first use (import name, requirement). torch and
# torchvision are not here: they come from the PyTorch extension, which picks the build that
# matches the GPU driver.
PIP_REQUIREMENTS = (
    ("monai", "monai>=1.4"),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("safetensors", "safetensors>=0.4"),
    ("matplotlib", "matplotlib>=3.7"),
)

PACKAGE_MANIFEST = "medtl_package.json"


#
# MedTLExtension
#


class MedTLExtension(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedTL")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedTL team"]
        self.parent.helpText = _(
            "Paint a few slices of a structure with the Segment Editor, then click <b>Learn from my"
            " slices</b>: MedTL fine-tunes a pretrained network on those slices and segments the whole"
            " volume into a new segmentation (yours is never changed). Correct the result, paint more"
            " slices and learn again. <b>Apply model</b> segments a volume with a saved model package."
            " See the <a href='https://github.com/medtl/SlicerMedTL'>documentation</a>."
        )
        self.parent.acknowledgementText = _(
            "MedTL builds on MONAI, PyTorch, torchvision and SimpleITK, and on the 3D Slicer scripted-module template."
        )


#
# MedTLExtensionParameterNode
#


@parameterNodeWrapper
class MedTLExtensionParameterNode:
    """What the user chose in the module panel; saved with the scene.

    inputVolume - image to learn from and to segment.
    inputSegmentation - the user's sparse segmentation (painted slices); only read.
    modelPackage - model package folder for "Apply model" (set after "Learn from my slices").
    device - "auto", "cpu" or "cuda".
    epochs - training epochs for "Learn from my slices".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    modelPackage: Path
    device: Annotated[str, Choice(DEVICES)] = "auto"
    epochs: Annotated[int, WithinRange(1, 500)] = 20


#
# Engine process
#


# Starts ``medtl <args>``; the logics take another one in tests (see EngineRun for what it returns).
EngineFactory = Callable[[Sequence[str]], EngineRun]


def startEngine(args: Sequence[str]) -> EngineRun:
    """Starts ``PythonSlicer -m medtl <args>`` with the engine importable, as both MedTL modules do."""
    from MedTLExtensionLib.engine_process import EngineProcess

    env = {}
    trainingModule = getattr(slicer.modules, "medtltraining", None)
    if trainingModule is not None:
        # medtl/ sits beside MedTLTraining.py, wherever the extension is installed or built.
        engineDir = os.path.dirname(trainingModule.path)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (engineDir, os.environ.get("PYTHONPATH", "")) if p)
    # Inside Slicer, PythonSlicer is the interpreter that sees Slicer's Python packages.
    return EngineProcess(list(args), python=shutil.which("PythonSlicer") or sys.executable, env=env)


def _isSet(path: Path | str | None) -> bool:
    # An unset pathlib parameter reads back as Path("."), not as None or "".
    return path is not None and str(path) not in ("", ".")


#
# MedTLExtensionWidget
#


class MedTLExtensionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 300

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedTLExtensionLogic | None = None
        self._parameterNode: MedTLExtensionParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._pollTimer: qt.QTimer | None = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedTLExtension.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects mrmlSceneChanged to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedTLExtensionLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.learnButton.connect("clicked(bool)", self.onLearnButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Disconnect so that parameter changes made elsewhere do not update a hidden GUI;
        # a running job keeps being polled.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        # Slicer reloads only the module file; reload the library too so edits to it take effect.
        for name in ("MedTLExtensionLib.mrml_bridge", "MedTLExtensionLib.engine_process"):
            module = sys.modules.get(name)
            if module is not None:
                importlib.reload(module)
        super().onReload()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.inputSegmentation:
            firstSegmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if firstSegmentationNode:
                self._parameterNode.inputSegmentation = firstSegmentationNode

    def setParameterNode(self, inputParameterNode: MedTLExtensionParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self.logic is not None and self.logic.isRunning
        node = self._parameterNode
        hasVolume = bool(node and node.inputVolume)
        canLearn = hasVolume and bool(node.inputSegmentation) and not running
        canApply = hasVolume and _isSet(node.modelPackage) and not running
        self.ui.learnButton.enabled = canLearn
        self.ui.learnButton.toolTip = (
            _("Fine-tune a pretrained network on the painted slices, then segment the whole volume.")
            if canLearn
            else _("Select a volume and a segmentation painted on a few of its slices.")
        )
        self.ui.applyButton.enabled = canApply
        self.ui.applyButton.toolTip = (
            _("Segment the volume with the model package into a new segmentation.")
            if canApply
            else _("Select a volume and a model package.")
        )
        self.ui.cancelButton.enabled = running

    def onLearnButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start learning from the painted slices."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            self.logic.startLearning(p.inputVolume, p.inputSegmentation, epochs=p.epochs, device=p.device)
            self._onJobStarted(_("Preparing the painted slices..."))

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not apply the model."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            self.logic.startPrediction(p.inputVolume, p.modelPackage, device=p.device)
            self._onJobStarted(_("Segmenting the volume..."))

    def onCancelButton(self) -> None:
        self.logic.cancel()

    def _onJobStarted(self, message: str) -> None:
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = message
        self._pollTimer.start()
        self._updateButtons()

    def onPollTimer(self) -> None:
        try:
            for event in self.logic.poll():
                progress, text = self.logic.describeEvent(event)
                if progress is not None:
                    self.ui.progressBar.value = progress
                if text:
                    self.ui.statusLabel.text = text
        except Exception as error:
            self._pollTimer.stop()
            self.ui.statusLabel.text = _("Failed: {message}").format(message=error)
            self._updateButtons()
            slicer.util.errorDisplay(str(error), detailedText=self.logic.lastLog)
            return
        if self.logic.isRunning:
            return
        self._pollTimer.stop()
        if self.logic.lastPackage is not None and self._parameterNode is not None:
            # The package just learned is what "Apply model" should use next (e.g. on another volume).
            self._parameterNode.modelPackage = self.logic.lastPackage
        if self.logic.resultSegmentation is not None:
            self._showResult(self.logic.resultSegmentation)
        self._updateButtons()

    def _showResult(self, segmentationNode: vtkMRMLSegmentationNode) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is not None:
            slicer.util.setSliceViewerLayers(background=volume)
        segmentationNode.CreateClosedSurfaceRepresentation()


#
# MedTLExtensionLogic
#


class MedTLExtensionLogic(ScriptedLoadableModuleLogic):
    """Learn from painted slices and apply model packages, without a GUI.

    One job runs at a time. ``startLearning`` / ``startPrediction`` export what the engine needs
    and start it; ``poll`` (called from a timer, or from ``runToCompletion``) forwards the
    engine's events and moves the job on: training, then prediction, then import of the result as
    a new segmentation node. The user's segmentation is only read.

    Example (Python console)::

        logic = MedTLExtensionLogic()
        logic.ensureDependencies()
        logic.startLearning(volumeNode, segmentationNode, epochs=10, device="cpu")
        newSegmentation = logic.runToCompletion()
    """

    DEFAULT_NETWORK = "unet_mobilenet_v2"

    def __init__(
        self,
        scene=None,
        segmentationsLogic=None,
        engineFactory: EngineFactory | None = None,
        workRoot: Path | None = None,
    ) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else slicer.mrmlScene
        self._segmentationsLogic = segmentationsLogic
        self.engineFactory: EngineFactory = engineFactory or startEngine
        # Runs are kept (they hold the learned model package); exported inputs are removed.
        self.workRoot = Path(workRoot) if workRoot else Path(slicer.app.defaultScenePath) / "MedTL" / "runs"
        self._job: dict[str, Any] | None = None
        self.resultSegmentation: vtkMRMLSegmentationNode | None = None
        self.lastPackage: Path | None = None
        self.lastLog = ""

    def getParameterNode(self) -> MedTLExtensionParameterNode:
        return MedTLExtensionParameterNode(super().getParameterNode())

    @property
    def segmentationsLogic(self):
        if self._segmentationsLogic is None:
            self._segmentationsLogic = slicer.modules.segmentations.logic()
        return self._segmentationsLogic

    @property
    def isRunning(self) -> bool:
        return self._job is not None

    # ------------------------------------------------------------------ dependencies

    @staticmethod
    def ensureDependencies() -> None:
        """Installs what the engine needs, after one confirmation (see ``ensureDependencies``)."""
        ensureDependencies()

    # ------------------------------------------------------------------ jobs

    def startLearning(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode,
        *,
        epochs: int = 20,
        device: str = "auto",
        network: str = DEFAULT_NETWORK,
        pretrained: str = "imagenet",
        stepsPerEpoch: int = 20,
    ) -> Path:
        """Exports the volume and the painted slices, writes a run config and starts training.

        Returns:
            The run directory (config, checkpoints, events and, when done, ``model/``).
        """
        self._checkIdle()
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError(_("Select a volume that holds image data."))
        if segmentationNode is None or segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise ValueError(_("Select a segmentation with at least one segment painted on a few slices."))

        labels, segments = mrml_bridge.segmentation_to_labelmap(
            self.scene, self.segmentationsLogic, segmentationNode, volumeNode
        )
        painted = mrml_bridge.painted_slices(labels, axis=0)
        if not painted:
            raise ValueError(
                _("The segmentation '{name}' has no painted voxels inside volume '{volume}'.").format(
                    name=segmentationNode.GetName(), volume=volumeNode.GetName()
                )
            )
        # The engine wants classes 1..N; the user's segments may carry other (tagged) values.
        lookup = np.zeros(max(value for value, _name, _color in segments) + 1, dtype=np.min_scalar_type(len(segments)))
        for index, (value, _name, _color) in enumerate(segments, start=1):
            lookup[value] = index
        labels = lookup[labels]
        outputSegments = [(index, name, color) for index, (_value, name, color) in enumerate(segments, start=1)]

        runDir = self._newRunDir(volumeNode.GetName())
        inputsDir = runDir / "inputs"
        inputsDir.mkdir(parents=True)
        imagePath = inputsDir / "image.nrrd"
        labelPath = inputsDir / "label.nrrd"
        _writeVolume(volumeNode, imagePath)
        _writeArray(labels, ijkToRasOf(volumeNode), labelPath)
        (inputsDir / "cases.csv").write_text("image,label\nimage.nrrd,label.nrrd\n", encoding="utf-8")

        config = self.learningConfig(
            volumeNode,
            labelNames=[name for _value, name, _color in outputSegments],
            csv=inputsDir / "cases.csv",
            outputDir=runDir,
            imageShape=labels.shape,
            epochs=epochs,
            device=device,
            network=network,
            pretrained=pretrained,
            stepsPerEpoch=stepsPerEpoch,
        )
        configPath = runDir / "config.json"
        configPath.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

        logging.info(f"MedTL: learning from slices {painted} of {volumeNode.GetName()} in {runDir}")
        self._begin(
            kind="learn",
            stage="train",
            args=["train", str(configPath), "--events", "-"],
            volume=volumeNode,
            segments=outputSegments,
            runDir=runDir,
            inputsDir=inputsDir,
            imagePath=imagePath,
            device=device,
            outputName=f"{segmentationNode.GetName()} (MedTL)",
        )
        return runDir

    def startPrediction(
        self, volumeNode: vtkMRMLScalarVolumeNode, package: Path | str, *, device: str = "auto"
    ) -> None:
        """Segments ``volumeNode`` with a model package into a new segmentation node."""
        self._checkIdle()
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError(_("Select a volume that holds image data."))
        package = Path(package)
        if not _isSet(package) or not (package / PACKAGE_MANIFEST).is_file():
            raise ValueError(
                _("'{path}' is not a MedTL model package (it has no {manifest}).").format(
                    path=package, manifest=PACKAGE_MANIFEST
                )
            )
        runDir = self._newRunDir(volumeNode.GetName(), prefix="apply")
        inputsDir = runDir / "inputs"
        inputsDir.mkdir(parents=True)
        imagePath = inputsDir / "image.nrrd"
        _writeVolume(volumeNode, imagePath)
        job = self._begin(
            kind="apply",
            stage="predict",
            args=None,
            volume=volumeNode,
            segments=packageSegments(package),
            runDir=runDir,
            inputsDir=inputsDir,
            imagePath=imagePath,
            device=device,
            outputName=f"{volumeNode.GetName()} (MedTL)",
        )
        self._startPredict(job, package)

    def cancel(self) -> None:
        """Stops the engine; nothing is added to the scene and the run directory is kept."""
        if self._job is not None:
            self._job["cancelled"] = True
            self._job["process"].cancel()

    def poll(self) -> list[dict[str, Any]]:
        """Forwards new engine events and advances the job; raises if the engine failed.

        Besides the engine's events (see ``medtl.events``) it returns ``stage`` (prediction
        started), ``finished`` (result imported) and ``cancelled`` events.
        """
        job = self._job
        if job is None:
            return []
        process = job["process"]
        # Read the exit status first: events written just before the exit are then in this poll.
        finished = process.returncode is not None
        events = process.poll()
        for event in events:
            kind = event.get("event")
            if kind == "error":
                job["error"] = event.get("message")
            elif kind == "done" and job["stage"] == "train":
                job["package"] = event.get("package")
        if not finished:
            return events
        self.lastLog = getattr(process, "log", "")
        if job.get("cancelled"):
            self._job = None
            return [*events, {"event": "cancelled"}]
        if process.returncode != 0:
            self._job = None
            raise RuntimeError(
                job.get("error")
                or getattr(process, "error_message", None)
                or _("The MedTL engine stopped with exit status {code} (details: {log}).").format(
                    code=process.returncode, log=_lastLine(self.lastLog) or job["runDir"]
                )
            )
        if job["stage"] == "train":
            package = Path(job.get("package") or job["runDir"] / "model")
            self.lastPackage = package
            self._startPredict(job, package)
            return [*events, {"event": "stage", "name": "predict"}]
        try:
            node = self._importPrediction(job)
        finally:
            self._job = None
        shutil.rmtree(job["inputsDir"], ignore_errors=True)
        self.resultSegmentation = node
        return [*events, {"event": "finished", "segmentation": node.GetID()}]

    def runToCompletion(self, timeoutSeconds: float = 3600.0, interval: float = 0.2) -> vtkMRMLSegmentationNode | None:
        """Polls until the job ends (for scripts and tests); returns the new segmentation."""
        deadline = time.monotonic() + timeoutSeconds
        while self.isRunning:
            self.poll()
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"MedTL job did not finish within {timeoutSeconds} s")
            slicer.app.processEvents()
            time.sleep(interval)
        return self.resultSegmentation

    @staticmethod
    def describeEvent(event: dict[str, Any]) -> tuple[int | None, str]:
        """Progress (0-100, or None to leave as is) and a status line for one event."""
        kind = event.get("event")
        if kind in ("epoch", "step"):
            total = event.get("total_steps") or 0
            progress = int(100 * event.get("step", 0) / total) if total else None
            if event.get("label") == "predict":
                return progress, _("Segmenting the volume...")
            text = _("Training: epoch {epoch}/{epochs}, loss {loss:.3f}").format(
                epoch=event.get("epoch", "?"),
                epochs=event.get("epochs", "?"),
                loss=float(event.get("loss", float("nan"))),
            )
            text += _remaining(event.get("eta_s"))
            return progress, text
        if kind == "start":
            return 0, _("Training on {device}...").format(device=event.get("device", "?"))
        if kind == "phase":
            return None, _("Training: {name}").format(name=event.get("name", ""))
        if kind in ("warning", "message"):
            return None, str(event.get("message", ""))
        if kind == "stage":
            return 0, _("Segmenting the volume with the learned model...")
        if kind == "finished":
            return 100, _("Done: the prediction is in a new segmentation.")
        if kind == "cancelled":
            return 0, _("Cancelled. Your segmentation is unchanged.")
        if kind == "error":
            return None, _("Error: {message}").format(message=event.get("message", ""))
        return None, ""

    # ------------------------------------------------------------------ config

    @staticmethod
    def learningConfig(
        volumeNode: vtkMRMLScalarVolumeNode,
        *,
        labelNames: list[str],
        csv: Path,
        outputDir: Path,
        imageShape: tuple[int, ...],
        epochs: int,
        device: str,
        network: str,
        pretrained: str,
        stepsPerEpoch: int,
    ) -> dict[str, Any]:
        """Run configuration (``medtl.config.RunConfig`` as JSON) for learning from painted slices."""
        window = displayWindow(volumeNode)
        # FlexibleUNet halves the size five times: a multiple of 32, at most 256 to keep steps fast;
        # the engine pads smaller images.
        patch = int(min(256, max(32, (min(imageShape[1:]) // 32) * 32)))
        if pretrained == "none":
            # From random weights there are no features to extract: train all layers from the start.
            strategy = {"name": "full_finetune", "encoder_lr_factor": 1.0}
        else:
            strategy = {
                "name": "feature_extraction_then_finetune",
                "feature_extraction_epochs": max(1, epochs // 3),
            }
        return {
            "task": "segmentation_2d",
            # Only painted slices are examples; unpainted slices are unknown, not background.
            "data": {
                "csv": str(csv),
                "label_names": labelNames,
                "val_fraction": 0.0,
                "labelled_slices": True,
            },
            # What the user sees (and painted on) is the display window, so that is the intensity range.
            "preprocessing": {
                "preset": "none" if window else "mri",
                "window": window,
                "patch_size": [patch, patch],
            },
            "model": {"name": network, "pretrained": pretrained},
            "strategy": strategy,
            "train": {"epochs": int(epochs), "steps_per_epoch": int(stepsPerEpoch), "device": device},
            "output_dir": str(outputDir),
        }

    # ------------------------------------------------------------------ internals

    def _checkIdle(self) -> None:
        if self._job is not None:
            raise RuntimeError(_("MedTL is already running; cancel it or wait for it to finish."))
        self.resultSegmentation = None
        self.lastPackage = None

    def _newRunDir(self, volumeName: str, prefix: str = "learn") -> Path:
        safeName = "".join(c if c.isalnum() or c in "-_" else "_" for c in volumeName)[:40] or "volume"
        runDir = self.workRoot / f"{time.strftime('%Y%m%d-%H%M%S')}-{prefix}-{safeName}"
        suffix = 1
        while runDir.exists():
            suffix += 1
            runDir = runDir.with_name(f"{runDir.name.split('~')[0]}~{suffix}")
        runDir.mkdir(parents=True)
        return runDir

    def _begin(self, *, args: list[str] | None, **job: Any) -> dict[str, Any]:
        newJob = {"cancelled": False, "error": None, **job}
        if args is not None:
            # Started before the job is recorded: if starting fails, MedTL is not left "running".
            newJob["process"] = self.engineFactory(args)
        self._job = newJob
        return newJob

    def _startPredict(self, job: dict[str, Any], package: Path) -> None:
        outputPath = job["inputsDir"] / "prediction.nrrd"
        args = [
            "predict",
            "--model",
            str(package),
            "--image",
            str(job["imagePath"]),
            "--out",
            str(outputPath),
        ]
        args += ["--device", job["device"], "--events", "-"]
        try:
            process = self.engineFactory(args)
        except Exception:
            if self._job is job:
                self._job = None
            raise
        job.update(stage="predict", outputPath=outputPath, error=None, process=process)
        self._job = job

    def _importPrediction(self, job: dict[str, Any]) -> vtkMRMLSegmentationNode:
        labels, ijkToRas = _readArray(job["outputPath"])
        # The reference volume makes the bridge check that the prediction is on the volume's grid.
        return mrml_bridge.labelmap_to_segmentation(
            self.scene,
            self.segmentationsLogic,
            labels,
            ijkToRas,
            job["segments"],
            reference_volume=job["volume"],
            name=job["outputName"],
        )


def displayWindow(volumeNode: vtkMRMLScalarVolumeNode) -> list[float] | None:
    """The intensity window the volume is displayed with, as [low, high], if it has one."""
    display = volumeNode.GetDisplayNode()
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        return None
    width, level = display.GetWindow(), display.GetLevel()
    if not width > 0:
        return None
    return [float(level - width / 2), float(level + width / 2)]


def packageSegments(package: Path) -> list[mrml_bridge.SegmentSpec]:
    """(value, name, colour) of the labels of a model package, read from its manifest."""
    manifest = json.loads((Path(package) / PACKAGE_MANIFEST).read_text(encoding="utf-8"))
    segments = []
    for entry in manifest.get("labels", []):
        if int(entry["value"]) == 0:
            continue
        segments.append((int(entry["value"]), str(entry["name"]), tuple(float(c) for c in entry["color"])))
    if not segments:
        raise ValueError(_("The model package '{path}' lists no labels.").format(path=package))
    return segments


def _writeVolume(volumeNode: vtkMRMLScalarVolumeNode, path: Path) -> None:
    # A storage node of our own, so the user's volume keeps its file name and modified state.
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(volumeNode):
        raise RuntimeError(_("Could not write '{name}' to {path}.").format(name=volumeNode.GetName(), path=path))


def _writeArray(array: np.ndarray, ijkToRas: np.ndarray, path: Path) -> None:
    # A node outside the scene: the label map only passes through on its way to a file.
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
    slicer.util.updateVolumeFromArray(node, array)
    _writeVolume(node, path)


def ijkToRasOf(volumeNode: vtkMRMLScalarVolumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _readArray(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # Read outside the scene: the label map only passes through on its way into a segmentation.
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(_("Could not read the prediction {path}.").format(path=path))
    return mrml_bridge.volume_to_array(node)


def _remaining(etaSeconds: float | None) -> str:
    if not etaSeconds or etaSeconds <= 0:
        return ""
    if etaSeconds < 60:
        return _(", less than a minute left")
    return _(", about {minutes} min left").format(minutes=round(etaSeconds / 60))


def _lastLine(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def missingDependencies() -> tuple[bool, list[str]]:
    """(torch or torchvision missing, pip requirements missing), checked without importing them."""
    torchMissing = any(importlib.util.find_spec(name) is None for name in ("torch", "torchvision"))
    missing = [req for name, req in PIP_REQUIREMENTS if importlib.util.find_spec(name) is None]
    return torchMissing, missing


def ensureDependencies() -> None:
    """Installs what the engine needs, after one confirmation that lists all of it.

    Called when the engine is first needed, never on import. PyTorch comes from the PyTorch
    extension (its PyTorch Utils module installs the build that matches the GPU driver); without
    that extension the user is told to install it. In testing mode nothing is asked.
    """
    torchMissing, pipMissing = missingDependencies()
    if not torchMissing and not pipMissing:
        return
    if torchMissing and not hasattr(slicer.modules, "pytorchutils"):
        raise RuntimeError(
            _(
                "MedTL needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager"
                " and restart Slicer; MedTL then installs PyTorch through its 'PyTorch Utils' module"
                " (or install it there yourself)."
            )
        )
    items = ([_("PyTorch and torchvision (through PyTorch Utils)")] if torchMissing else []) + pipMissing
    if not slicer.app.testingEnabled():
        message = _(
            "MedTL needs these Python packages, which will now be downloaded and installed"
            " (this may take several minutes):\n\n{items}"
        ).format(items="\n".join(f"  - {item}" for item in items))
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle=_("MedTL: install packages")):
            raise RuntimeError(_("MedTL cannot run without these packages: {items}").format(items=", ".join(items)))
    # torch first: monai's requirements would otherwise pull a generic torch build from PyPI.
    if torchMissing:
        import PyTorchUtils

        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
            raise RuntimeError(_("PyTorch was not installed."))
    if pipMissing:
        _pipInstall(pipMissing)
    importlib.invalidate_caches()


def _pipInstall(requirements: list[str]) -> None:
    """pip-installs requirements with Slicer's helpers, newest API first."""
    from packaging.requirements import Requirement

    for moduleName in ("slicer.pydeps", "slicer.packaging"):
        try:
            pipEnsure = importlib.import_module(moduleName).pip_ensure
        except (ImportError, AttributeError):
            continue
        # Already confirmed (or testing): no second dialog, and install even in testing mode.
        pipEnsure(
            [Requirement(r) for r in requirements],
            prompt_install=False,
            requester="MedTL",
            skip_in_testing=False,
        )
        return
    slicer.util.pip_install(" ".join(requirements))


#
# MedTLExtensionTest
#


class MedTLExtensionTest(ScriptedLoadableModuleTest):
    """Learns from 3 painted slices of a synthetic sphere on the CPU and checks the prediction."""

    SHAPE_KJI = (16, 64, 64)
    PAINTED_SLICES = (3, 8, 12)

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_LearnFromSlices()

    def makeSphereScene(self) -> tuple[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, np.ndarray]:
        k, j, i = np.indices(self.SHAPE_KJI)
        # Anisotropic voxels (2.5 mm slices) as in a clinical scan; the sphere is round in mm.
        radius = np.sqrt(((k - 8) * 2.5) ** 2 + (j - 32.0) ** 2 + (i - 30.0) ** 2)
        sphere = radius < 16.0
        rng = np.random.default_rng(0)
        image = np.where(sphere, 200.0, 20.0) + rng.normal(0.0, 10.0, self.SHAPE_KJI)
        ijkToRas = np.diag([1.0, 1.0, 2.5, 1.0])
        ijkToRas[:3, 3] = (-32.0, -32.0, -20.0)
        volume = mrml_bridge.array_to_volume(slicer.mrmlScene, image.astype(np.float32), ijkToRas, "MedTLSphere")

        painted = np.zeros(self.SHAPE_KJI, dtype=np.uint8)
        for index in self.PAINTED_SLICES:
            painted[index] = sphere[index]
        segmentation = mrml_bridge.labelmap_to_segmentation(
            slicer.mrmlScene,
            slicer.modules.segmentations.logic(),
            painted,
            ijkToRas,
            [(1, "sphere", (0.9, 0.3, 0.2))],
            reference_volume=volume,
            name="MedTLSphere painted",
        )
        return volume, segmentation, sphere

    def test_LearnFromSlices(self) -> None:
        import tempfile

        self.delayDisplay("Learning from 3 painted slices of a synthetic sphere")
        volume, painted, sphere = self.makeSphereScene()
        logic = MedTLExtensionLogic(workRoot=Path(tempfile.mkdtemp(prefix="MedTLSelfTest-")))
        before, _segments = mrml_bridge.segmentation_to_labelmap(
            slicer.mrmlScene, logic.segmentationsLogic, painted, volume
        )
        segmentationsBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

        logic.ensureDependencies()
        # A tiny budget from random weights: no download, a few seconds on a CPU.
        logic.startLearning(volume, painted, epochs=4, device="cpu", pretrained="none", stepsPerEpoch=8)
        result = logic.runToCompletion(timeoutSeconds=600)

        self.assertIsNotNone(result)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), segmentationsBefore + 1)
        self.assertNotEqual(result.GetID(), painted.GetID())
        predicted, segments = mrml_bridge.segmentation_to_labelmap(
            slicer.mrmlScene, logic.segmentationsLogic, result, volume
        )
        self.assertEqual([name for _value, name, _color in segments], ["sphere"])
        unpainted = [index for index in range(self.SHAPE_KJI[0]) if index not in self.PAINTED_SLICES]
        truth = sphere[unpainted]
        guess = predicted[unpainted] == segments[0][0]
        dice = 2.0 * np.logical_and(truth, guess).sum() / (truth.sum() + guess.sum())
        self.delayDisplay(f"Dice on unpainted slices: {dice:.3f}")
        self.assertGreater(dice, 0.5)

        after, _segments = mrml_bridge.segmentation_to_labelmap(
            slicer.mrmlScene, logic.segmentationsLogic, painted, volume
        )
        np.testing.assert_array_equal(after, before, err_msg="the user's segmentation was modified")
        self.assertIsNotNone(logic.lastPackage)
        self.assertTrue((logic.lastPackage / PACKAGE_MANIFEST).is_file())
        self.delayDisplay("Test passed")
