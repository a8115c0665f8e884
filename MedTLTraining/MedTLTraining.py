"""MedTL Training: fine-tune a pretrained network on a dataset CSV, with live progress, cancel and resume.

The module writes a run configuration (``medtl.config.RunConfig`` as JSON) into the run directory
and runs ``python -m medtl train CONFIG`` as a separate process; the engine itself lives next to
this file in ``medtl/`` and is never imported into Slicer's process.
"""

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import qt
import slicer
import vtk
from MedTLExtensionLib.engine_process import EngineRun
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The engine's model registry (``medtl models``), by dimension. Listed here because importing the
# registry would import torch into Slicer's process.
NETWORKS_2D = (
    "unet_mobilenet_v2",
    "unet_resnet18",
    "unet_resnet34",
    "unet_resnet50",
    "unet_densenet121",
    "unet_efficientnet_b0",
)
NETWORKS_3D = (
    "unet3d_resnet10",
    "unet3d_resnet18",
    "unet3d_resnet34",
    "unet3d_resnet50",
    "unet3d",
    "segresnet3d",
)
STRATEGIES = ("feature_extraction", "full_finetune", "feature_extraction_then_finetune")
DEVICES = ("auto", "cpu", "cuda")

CONFIG_NAME = "config.json"
CHECKPOINT_NAME = "checkpoint.pt"


#
# MedTLTraining
#


class MedTLTraining(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedTL Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedTL team"]
        self.parent.helpText = _(
            "Fine-tune a pretrained 2D or 3D network on a dataset: a CSV with one row per case"
            " (<i>image</i>, <i>label</i>, and free columns such as <i>site</i>). Training runs in a"
            " separate process; <b>Cancel</b> keeps the last checkpoint and <b>Resume</b> continues"
            " from it. The run directory receives the configuration, checkpoints, metrics and the"
            " model package that the MedTL module applies."
        )
        self.parent.acknowledgementText = _("MedTL builds on MONAI, PyTorch, torchvision and SimpleITK.")


#
# MedTLTrainingParameterNode
#


@parameterNodeWrapper
class MedTLTrainingParameterNode:
    """Training choices; saved with the scene.

    trainingCsv - dataset CSV (image, label, free columns).
    outputDirectory - run directory (config, checkpoints, events, metrics, model package).
    network - network from the engine's registry.
    strategy - how the pretrained encoder is trained.
    epochs - training epochs.
    learningRate - peak learning rate.
    device - "auto", "cpu" or "cuda".
    """

    trainingCsv: Path
    outputDirectory: Path
    network: Annotated[str, Choice(NETWORKS_2D + NETWORKS_3D)] = "unet_mobilenet_v2"
    strategy: Annotated[str, Choice(STRATEGIES)] = "feature_extraction_then_finetune"
    epochs: Annotated[int, WithinRange(1, 1000)] = 30
    learningRate: Annotated[float, WithinRange(1e-6, 1.0), Decimals(6), SingleStep(1e-4)] = 1e-3
    device: Annotated[str, Choice(DEVICES)] = "auto"


# Starts ``medtl <args>``; the logic takes another one in tests.
EngineFactory = Callable[[Sequence[str]], EngineRun]


def _defaultEngineFactory(args: Sequence[str]) -> EngineRun:
    # The MedTL module (same extension) knows how to start the engine inside Slicer.
    import MedTLExtension

    return MedTLExtension.startEngine(args)


def _isSet(path: Path | str | None) -> bool:
    # An unset pathlib parameter reads back as Path("."), not as None or "".
    return path is not None and str(path) not in ("", ".")


#
# MedTLTrainingWidget
#


class MedTLTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 500

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedTLTrainingLogic | None = None
        self._parameterNode: MedTLTrainingParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._pollTimer: qt.QTimer | None = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedTLTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedTLTrainingLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
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
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: MedTLTrainingParameterNode | None) -> None:
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
        ready = bool(node) and _isSet(node.trainingCsv) and _isSet(node.outputDirectory)
        self.ui.startButton.enabled = ready and not running
        self.ui.resumeButton.enabled = bool(node) and not running and self.logic.canResume(node.outputDirectory)
        self.ui.cancelButton.enabled = running

    def onStartButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start training."), waitCursor=True):
            p = self._parameterNode
            if self.logic.canResume(p.outputDirectory) and not slicer.util.confirmYesNoDisplay(
                _("{dir} already holds a run. Start a new run there (its checkpoint is replaced)?").format(
                    dir=p.outputDirectory
                )
            ):
                return
            self.logic.ensureDependencies()
            configPath = self.logic.start(
                trainingCsv=p.trainingCsv,
                outputDirectory=p.outputDirectory,
                network=p.network,
                strategy=p.strategy,
                epochs=p.epochs,
                learningRate=p.learningRate,
                device=p.device,
            )
            self._onJobStarted(_("Starting training ({config})...").format(config=configPath))

    def onResumeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not resume training."), waitCursor=True):
            self.logic.ensureDependencies()
            self.logic.resume(self._parameterNode.outputDirectory, device=self._parameterNode.device)
            self._onJobStarted(_("Resuming from the last checkpoint..."))

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
        if not self.logic.isRunning:
            self._pollTimer.stop()
            self._updateButtons()


#
# MedTLTrainingLogic
#


class MedTLTrainingLogic(ScriptedLoadableModuleLogic):
    """Writes run configurations and runs ``medtl train`` in a separate process.

    Example (Python console)::

        logic = MedTLTrainingLogic()
        logic.start(trainingCsv="/data/liver.csv", outputDirectory="/runs/liver", epochs=5, device="cpu")
        while logic.isRunning:
            print(logic.poll()); time.sleep(1)
    """

    def __init__(self, engineFactory: EngineFactory | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.engineFactory: EngineFactory = engineFactory or _defaultEngineFactory
        self._process: EngineRun | None = None
        self._runDir: Path | None = None
        self._cancelled = False
        self._error: str | None = None
        self.lastResult: dict[str, Any] | None = None
        self.lastLog = ""

    def getParameterNode(self) -> MedTLTrainingParameterNode:
        return MedTLTrainingParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._process is not None

    @staticmethod
    def ensureDependencies() -> None:
        """Installs what the engine needs (one confirmation); the MedTL module owns that check."""
        import MedTLExtension

        MedTLExtension.ensureDependencies()

    @staticmethod
    def canResume(outputDirectory: Path | str | None) -> bool:
        """True when the directory holds a run that was started (a config and a checkpoint)."""
        if not _isSet(outputDirectory):
            return False
        runDir = Path(outputDirectory)
        return (runDir / CONFIG_NAME).is_file() and (runDir / CHECKPOINT_NAME).is_file()

    # ------------------------------------------------------------------ config

    @staticmethod
    def buildConfig(
        *,
        trainingCsv: Path | str,
        outputDirectory: Path | str,
        network: str = "unet_mobilenet_v2",
        strategy: str = "feature_extraction_then_finetune",
        epochs: int = 30,
        learningRate: float = 1e-3,
        device: str = "auto",
        labelNames: list[str] | None = None,
        preset: str | None = None,
    ) -> dict[str, Any]:
        """The run configuration (``medtl.config.RunConfig`` as JSON) for the panel's choices.

        ``labelNames`` and ``preset`` are read from the dataset's first case when not given.
        """
        if network not in NETWORKS_2D + NETWORKS_3D:
            raise ValueError(_("Unknown network '{name}'.").format(name=network))
        if strategy not in STRATEGIES:
            raise ValueError(_("Unknown strategy '{name}'.").format(name=strategy))
        if device not in DEVICES:
            raise ValueError(_("Unknown device '{name}'.").format(name=device))
        trainingCsv = Path(trainingCsv)
        if not trainingCsv.is_file():
            raise ValueError(_("The training CSV '{path}' does not exist.").format(path=trainingCsv))
        if not _isSet(outputDirectory):
            raise ValueError(_("Choose a run directory."))
        if labelNames is None or preset is None:
            foundNames, foundPreset = describeDataset(trainingCsv)
            labelNames = labelNames or foundNames
            preset = preset or foundPreset
        is3D = network in NETWORKS_3D
        strategyConfig: dict[str, Any] = {"name": strategy}
        if strategy == "feature_extraction_then_finetune":
            strategyConfig["feature_extraction_epochs"] = max(1, int(epochs) // 3)
        return {
            "task": "segmentation_3d" if is3D else "segmentation_2d",
            "data": {"csv": str(trainingCsv.resolve()), "label_names": labelNames, "val_fraction": 0.2},
            "preprocessing": {"preset": preset, "patch_size": [96, 96, 96] if is3D else [128, 128]},
            # The 3D encoders' MedicalNet weights are files the user names; ImageNet is 2D only.
            "model": {"name": network, "pretrained": "none" if is3D else "imagenet"},
            "strategy": strategyConfig,
            "optim": {"lr": float(learningRate)},
            "train": {"epochs": int(epochs), "device": device},
            "output_dir": str(Path(outputDirectory).resolve()),
        }

    def writeConfig(self, **choices: Any) -> Path:
        """Writes ``config.json`` into the run directory (atomically) and returns its path."""
        config = self.buildConfig(**choices)
        runDir = Path(config["output_dir"])
        runDir.mkdir(parents=True, exist_ok=True)
        configPath = runDir / CONFIG_NAME
        # Write then rename, so an interrupted write never leaves a half config behind.
        with tempfile.NamedTemporaryFile("w", dir=runDir, suffix=".tmp", delete=False, encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        os.replace(f.name, configPath)
        return configPath

    # ------------------------------------------------------------------ runs

    def start(self, **choices: Any) -> Path:
        """Writes the run configuration and starts ``medtl train``; returns the config path."""
        self._checkIdle()
        configPath = self.writeConfig(**choices)
        self._launch(["train", str(configPath), "--events", "-"], configPath.parent)
        return configPath

    def resume(self, outputDirectory: Path | str, device: str | None = None) -> None:
        """Continues the run in ``outputDirectory`` from its last checkpoint."""
        self._checkIdle()
        if not self.canResume(outputDirectory):
            raise ValueError(
                _("'{dir}' holds no run to resume (it needs {config} and {checkpoint}).").format(
                    dir=outputDirectory, config=CONFIG_NAME, checkpoint=CHECKPOINT_NAME
                )
            )
        runDir = Path(outputDirectory)
        args = ["train", str(runDir / CONFIG_NAME), "--resume", "--events", "-"]
        if device:
            args += ["--device", device]
        self._launch(args, runDir)

    def cancel(self) -> None:
        """Stops training; the last checkpoint stays, so the run can be resumed."""
        if self._process is not None:
            self._cancelled = True
            self._process.cancel()

    def poll(self) -> list[dict[str, Any]]:
        """New engine events, plus ``cancelled`` when a cancel finished; raises if training failed."""
        process = self._process
        if process is None:
            return []
        finished = process.returncode is not None
        events = process.poll()
        for event in events:
            if event.get("event") == "error":
                self._error = event.get("message")
            elif event.get("event") == "done":
                self.lastResult = event
        if not finished:
            return events
        self._process = None
        self.lastLog = getattr(process, "log", "")
        if self._cancelled:
            return [*events, {"event": "cancelled"}]
        if process.returncode != 0:
            raise RuntimeError(
                self._error
                or getattr(process, "error_message", None)
                or _("Training stopped with exit status {code}; see the log in {dir}.").format(
                    code=process.returncode, dir=self._runDir
                )
            )
        return events

    @staticmethod
    def describeEvent(event: dict[str, Any]) -> tuple[int | None, str]:
        """Progress (0-100, or None to leave as is) and a status line for one event."""
        kind = event.get("event")
        if kind == "epoch":
            total = event.get("total_steps") or 0
            progress = int(100 * event.get("step", 0) / total) if total else None
            text = _("Epoch {epoch}/{epochs}, loss {loss:.4f}").format(
                epoch=event.get("epoch", "?"),
                epochs=event.get("epochs", "?"),
                loss=float(event.get("loss", float("nan"))),
            )
            text += _remaining(event.get("eta_s"))
            return progress, text
        if kind == "start":
            return 0, _("Training on {device}...").format(device=event.get("device", "?"))
        if kind == "phase":
            return None, str(event.get("name", ""))
        if kind in ("warning", "message"):
            return None, str(event.get("message", ""))
        if kind == "checkpoint":
            return None, _("Checkpoint saved (epoch {epoch}).").format(epoch=event.get("epoch", "?"))
        if kind == "done":
            dice = (event.get("metrics") or {}).get("val_dice")
            text = _("Done. Model package: {package}").format(package=event.get("package", "?"))
            if dice:
                text += "\n" + _("Validation Dice: {scores}").format(
                    scores=", ".join(f"{name} {value:.3f}" for name, value in dice.items())
                )
            return 100, text
        if kind == "cancelled":
            return None, _("Cancelled. The last checkpoint is kept: Resume continues from it.")
        if kind == "error":
            return None, _("Error: {message}").format(message=event.get("message", ""))
        return None, ""

    def _checkIdle(self) -> None:
        if self._process is not None:
            raise RuntimeError(_("Training is already running; cancel it or wait for it to finish."))

    def _launch(self, args: list[str], runDir: Path) -> None:
        process = self.engineFactory(args)
        self._process, self._runDir = process, runDir
        self._cancelled, self._error, self.lastResult = False, None, None
        logging.info(f"MedTL Training: started medtl {' '.join(args)}")


def describeDataset(trainingCsv: Path) -> tuple[list[str], str]:
    """Label names and an intensity preset, read from the first labelled case of a dataset CSV.

    Names come from a ``.seg.nrrd`` header when the label is one, else "label 1".."label N" for
    the largest value N. CT (air at about -1000 HU) gets the abdominal window, anything else
    per-image percentiles. The engine checks every other case against these.
    """
    import SimpleITK as sitk  # bundled with Slicer; only needed when a run is configured

    # The engine's own dataset and header readers (SimpleITK only, no torch): one set of rules
    # and error messages for the CSV, here and in the engine.
    from medtl.data.dataset import load_cases
    from medtl.data.io import read_segment_names

    case = load_cases(trainingCsv)[0]
    imagePath, labelPath = case.image, case.label
    names = read_segment_names(labelPath)
    if not names:
        maxValue = int(_intensityRange(sitk, labelPath)[1])
        names = {value: f"label {value}" for value in range(1, max(1, maxValue) + 1)}
    labelNames = [names.get(value, f"label {value}") for value in range(1, max(names) + 1)]

    minimum = _intensityRange(sitk, imagePath)[0]
    preset = "ct_abdomen" if minimum <= -500.0 else "mri"
    return labelNames, preset


def _intensityRange(sitk, path: Path) -> tuple[float, float]:
    # A filter rather than an array view: a view of a temporary image would outlive its memory.
    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(sitk.ReadImage(str(path)))
    return statistics.GetMinimum(), statistics.GetMaximum()


def _remaining(etaSeconds: float | None) -> str:
    if not etaSeconds or etaSeconds <= 0:
        return ""
    if etaSeconds < 60:
        return _(", less than a minute left")
    return _(", about {minutes} min left").format(minutes=round(etaSeconds / 60))


#
# MedTLTrainingTest
#


class MedTLTrainingTest(ScriptedLoadableModuleTest):
    """The module loads, and the logic writes a run configuration the engine accepts."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ModuleLoads()
        self.test_WritesValidConfig()

    def test_ModuleLoads(self) -> None:
        self.assertTrue(hasattr(slicer.modules, "medtltraining"))
        parameterNode = MedTLTrainingLogic().getParameterNode()
        self.assertEqual(parameterNode.network, "unet_mobilenet_v2")
        self.assertEqual(parameterNode.strategy, "feature_extraction_then_finetune")
        self.assertEqual(parameterNode.epochs, 30)

    def test_WritesValidConfig(self) -> None:
        import numpy as np
        import SimpleITK as sitk

        folder = Path(tempfile.mkdtemp(prefix="MedTLTrainingTest-"))
        image = sitk.GetImageFromArray(np.full((4, 32, 32), -1000.0, dtype=np.float32))
        labels = np.zeros((4, 32, 32), dtype=np.uint8)
        labels[1, 8:16, 8:16] = 2
        label = sitk.GetImageFromArray(labels)
        label.CopyInformation(image)
        sitk.WriteImage(image, str(folder / "case1.nrrd"))
        sitk.WriteImage(label, str(folder / "case1_label.nrrd"))
        (folder / "cases.csv").write_text("image,label,site\ncase1.nrrd,case1_label.nrrd,A\n", encoding="utf-8")

        logic = MedTLTrainingLogic()
        configPath = logic.writeConfig(
            trainingCsv=folder / "cases.csv",
            outputDirectory=folder / "run",
            network="unet_resnet18",
            strategy="full_finetune",
            epochs=7,
            learningRate=5e-4,
            device="cpu",
        )
        self.assertEqual(configPath, (folder / "run" / CONFIG_NAME).resolve())
        config = json.loads(configPath.read_text(encoding="utf-8"))
        self.assertEqual(config["task"], "segmentation_2d")
        self.assertEqual(config["model"], {"name": "unet_resnet18", "pretrained": "imagenet"})
        self.assertEqual(config["strategy"]["name"], "full_finetune")
        self.assertEqual(config["train"], {"epochs": 7, "device": "cpu"})
        self.assertAlmostEqual(config["optim"]["lr"], 5e-4)
        self.assertEqual(config["data"]["label_names"], ["label 1", "label 2"])
        self.assertEqual(config["preprocessing"]["preset"], "ct_abdomen")
        self.assertFalse(logic.canResume(folder / "run"), "a fresh run has no checkpoint to resume")

        # The engine's own validation, where its dependencies are installed in Slicer.
        try:
            from medtl.config import RunConfig
        except ImportError as error:
            logging.info(f"Skipping the engine's config validation: {error}")
            return
        try:
            cfg = RunConfig.load(configPath)
        except ImportError as error:  # the registry imports torch and MONAI
            logging.info(f"Skipping the engine's config validation: {error}")
            return
        self.assertEqual(cfg.train.epochs, 7)
        self.assertEqual(cfg.num_classes, 3)
        self.delayDisplay("Test passed")
