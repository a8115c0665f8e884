"""MedTL Training: fine-tune a pretrained network on the scene's segmentations or a data set on disk,
with live curves, cancel and resume.

The thin GUI layer: widgets bound to a parameter node. The run itself is
``MedTLExtensionLib.training_run.TrainingRun`` (config, engine process, curves and metrics as MRML
tables), which needs no Qt and is tested headless; the engine (``medtl/`` beside this file) runs as
a separate process and is never imported into Slicer's process.
"""

import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
from MedTLExtensionLib import training_run
from MedTLExtensionLib.engine_process import describe_event
from MedTLExtensionLib.run_prerequisites import ensure_default_weights, ensure_dependencies, usable_device
from MedTLExtensionLib.training_run import (
    AUGMENTATIONS,
    DEVICES,
    LOSSES,
    NETWORKS_2D,
    NETWORKS_3D,
    PRESETS,
    STRATEGIES,
    TrainingRun,
)
from MedTLExtensionLib.widget_lifecycle import WidgetLifecycleMixin, is_set
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
            "Fine-tune a pretrained 2D or 3D network on volumes and segmentations of the scene, or on a"
            " data set on disk: a CSV with one row per case (<i>image</i>, <i>label</i>, and free columns"
            " such as <i>site</i>) or a folder of images and labels. Training runs in a"
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
    """Training choices; saved with the scene. The defaults make a first run need no choice.

    dataSource - "scene" (ticked volume + segmentation pairs) or "files" (dataPath).
    dataPath - data set CSV (image, label, free columns) or a folder of images and labels.
    groupColumn - CSV column whose groups never straddle the validation split (e.g. site).
    valFraction - share of cases (or groups) held out for validation.
    outputDirectory - run directory (config, checkpoints, events, metrics, model package).
    network - network from the engine's registry.
    pretrained - "imagenet", "none" or "file" (weightsFile).
    weightsFile - state dict, checkpoint or model package to start from.
    strategy - how the pretrained encoder is trained (medtl.strategies).
    preset - intensity preset ("auto" reads it from the data).
    augmentation - augmentation level.
    loss - training loss.
    epochs - training epochs.
    earlyStopping - epochs without a better validation score before the run ends (0: never).
    domainSpecificBatchNorm - one BatchNorm per site (DSBN; the sites come from the pairs or the CSV's site column).
    learningRate - peak learning rate.
    device - "auto", "cpu" or "cuda".
    """

    dataSource: Annotated[str, Choice(("scene", "files"))] = "scene"
    dataPath: Path
    groupColumn: str = ""
    valFraction: Annotated[float, WithinRange(0.0, 0.5), Decimals(2), SingleStep(0.05)] = 0.2
    outputDirectory: Path
    network: Annotated[str, Choice(NETWORKS_2D + NETWORKS_3D)] = "unet_mobilenet_v2"
    pretrained: Annotated[str, Choice(("imagenet", "none", "file"))] = "imagenet"
    weightsFile: Path
    strategy: Annotated[str, Choice(STRATEGIES)] = "feature_extraction_then_finetune"
    preset: Annotated[str, Choice(PRESETS)] = "auto"
    augmentation: Annotated[str, Choice(AUGMENTATIONS)] = "light"
    loss: Annotated[str, Choice(LOSSES)] = "dice_ce"
    epochs: Annotated[int, WithinRange(1, 1000)] = 30
    earlyStopping: Annotated[int, WithinRange(0, 100)] = 0
    domainSpecificBatchNorm: bool = False
    learningRate: Annotated[float, WithinRange(1e-6, 1.0), Decimals(6), SingleStep(1e-4)] = 1e-3
    device: Annotated[str, Choice(DEVICES)] = "auto"


#
# MedTLTrainingWidget
#


class MedTLTrainingWidget(WidgetLifecycleMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The training panel; parameter node, scene close and polling the run: :class:`WidgetLifecycleMixin`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedTLTrainingLogic | None = None
        self._pairs: list = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = MedTLTrainingLogic()
        self.setupLifecycle("UI/MedTLTraining.ui", self.logic.run, qt.QTimer(), pollIntervalMs=500)
        self.ui.refreshPairsButton.connect("clicked(bool)", self.refreshPairs)
        self.ui.estimateButton.connect("clicked(bool)", self.onEstimateButton)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReportButton)
        self.ui.pairsTable.setHorizontalHeaderLabels([_("Use"), _("Volume / segmentation"), _("Site")])
        self.ui.pairsTable.horizontalHeader().setStretchLastSection(True)

        self.initializeParameterNode()
        self.refreshPairs()

    def enter(self) -> None:
        super().enter()
        self.refreshPairs()

    def setDefaultParameters(self, parameterNode: MedTLTrainingParameterNode) -> None:
        if not is_set(parameterNode.outputDirectory):
            parameterNode.outputDirectory = Path(slicer.app.defaultScenePath) / "MedTL" / "training"

    def refreshPairs(self) -> None:
        """Lists the scene's segmentations with their reference volumes, all ticked."""
        self._pairs = training_run.scene_training_pairs(slicer.mrmlScene)
        table = self.ui.pairsTable
        table.setRowCount(len(self._pairs))
        for row, (volume, segmentation) in enumerate(self._pairs):
            use = qt.QTableWidgetItem()
            use.setCheckState(qt.Qt.Checked)
            table.setItem(row, 0, use)
            name = qt.QTableWidgetItem(f"{volume.GetName()} / {segmentation.GetName()}")
            name.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, 1, name)
            table.setItem(row, 2, qt.QTableWidgetItem(""))
        self._updateButtons()

    def _chosenPairs(self) -> list:
        table = self.ui.pairsTable
        return [
            (volume, segmentation, table.item(row, 2).text().strip())
            for row, (volume, segmentation) in enumerate(self._pairs)
            if table.item(row, 0).checkState() == qt.Qt.Checked
        ]

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self.logic is not None and self.logic.run.is_running
        node = self._parameterNode
        fromScene = bool(node) and node.dataSource == "scene"
        self.ui.pairsTable.visible = self.ui.refreshPairsButton.visible = fromScene
        self.ui.dataPathPathLineEdit.visible = self.ui.dataPathLabel.visible = not fromScene
        self.ui.weightsFilePathLineEdit.enabled = bool(node) and node.pretrained == "file"
        hasData = bool(self._pairs) if fromScene else bool(node) and is_set(node.dataPath)
        ready = bool(node) and hasData and is_set(node.outputDirectory)
        self.ui.startButton.enabled = ready and not running
        self.ui.estimateButton.enabled = ready and not running
        self.ui.resumeButton.enabled = bool(node) and not running and training_run.can_resume(node.outputDirectory)
        self.ui.cancelButton.enabled = running
        self.ui.openReportButton.enabled = self.logic is not None and self.logic.reportPath() is not None

    def onStartButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start training."), waitCursor=True):
            p = self._parameterNode
            if training_run.can_resume(p.outputDirectory) and not slicer.util.confirmYesNoDisplay(
                _("{dir} already holds a run. Start a new run there (its checkpoint is replaced)?").format(
                    dir=p.outputDirectory
                )
            ):
                return
            ensure_dependencies("train")
            ensure_default_weights(p.network, p.pretrained)
            config = self.logic.buildConfig(p, self._chosenPairs(), device=usable_device(p.device))
            self.logic.run.start(config)
            self._onJobStarted(_("Starting training in {dir}...").format(dir=config["output_dir"]))

    def onEstimateButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not estimate the run."), waitCursor=True):
            p = self._parameterNode
            ensure_dependencies("train")
            ensure_default_weights(p.network, p.pretrained)
            self.logic.run.estimate(self.logic.buildConfig(p, self._chosenPairs(), device=usable_device(p.device)))
            super()._onJobStarted(_("Timing a few training steps..."))

    def onResumeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not resume training."), waitCursor=True):
            ensure_dependencies("train")
            device = usable_device(self._parameterNode.device)
            self.logic.run.resume(self._parameterNode.outputDirectory, device=device)
            self._onJobStarted(_("Resuming from the last checkpoint..."))

    def onCancelButton(self) -> None:
        self.logic.run.cancel()

    def onOpenReportButton(self) -> None:
        report = self.logic.reportPath()
        if report is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(report)))

    def _onJobStarted(self, message: str) -> None:
        # The curves fill in as epochs end, in the layout's plot view.
        slicer.modules.plots.logic().ShowChartInLayout(self.logic.run.curves.chart)
        super()._onJobStarted(message)

    def describeEvent(self, event: dict) -> tuple[int | None, str]:
        if event.get("event") == "cancelled":
            return None, _("Cancelled. The last checkpoint is kept: Resume continues from it.")
        return describe_event(event)

    def onJobFinished(self, run: TrainingRun) -> None:
        if run.result is not None:
            self.ui.progressBar.value = 100
            table = self.logic.showMetrics()
            self.ui.statusLabel.text = _("Done. Model package: {package} (metrics in the table '{table}').").format(
                package=run.result.get("package"), table=table.GetName()
            )


#
# MedTLTrainingLogic
#


class MedTLTrainingLogic(ScriptedLoadableModuleLogic):
    """Builds the run configuration from the panel's choices and holds the :class:`TrainingRun`.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("MedTLTraining")
        config = training_run.training_config(csv="/data/liver.csv", output_dir="/runs/liver", epochs=5)
        logic.run.start(config)
        while logic.run.is_running:
            logic.run.poll(); slicer.app.processEvents(); time.sleep(0.5)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.run = TrainingRun(slicer.mrmlScene)

    def getParameterNode(self) -> MedTLTrainingParameterNode:
        return MedTLTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def buildConfig(p: MedTLTrainingParameterNode, scenePairs: list, device: str | None = None) -> dict:
        """The run configuration; scene pairs are first written as a data set in the run directory."""
        if not is_set(p.outputDirectory):
            raise ValueError(_("Choose a run directory."))
        runDir = Path(p.outputDirectory)
        labelNames = None
        if p.dataSource == "scene":
            csv, labelNames = training_run.export_scene_dataset(
                slicer.mrmlScene, slicer.modules.segmentations.logic(), scenePairs, runDir / "data"
            )
        elif is_set(p.dataPath) and Path(p.dataPath).is_dir():
            csv = training_run.dataset_csv_from_folder(p.dataPath, runDir / "dataset.csv")
        else:
            csv = p.dataPath
        return training_run.training_config(
            csv=csv,
            output_dir=runDir,
            label_names=labelNames,
            network=p.network,
            pretrained=p.pretrained,
            weights_file=p.weightsFile if is_set(p.weightsFile) else None,
            strategy=p.strategy,
            preset=p.preset,
            augmentation=p.augmentation,
            loss=p.loss,
            epochs=p.epochs,
            learning_rate=p.learningRate,
            device=device or p.device,
            val_fraction=p.valFraction,
            group_column=p.groupColumn.strip(),
            early_stopping_patience=p.earlyStopping,
            domain_specific_batchnorm=p.domainSpecificBatchNorm,
        )

    def showMetrics(self):
        """The finished run's metrics as a table node, shown in the layout's table view."""
        table = training_run.metrics_table(slicer.mrmlScene, self.run.result.get("metrics") or {})
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        return table

    def reportPath(self) -> Path | None:
        """The last finished run's report (its training plot), if there is one."""
        if self.run.result is None or self.run.run_dir is None:
            return None
        for name in ("report.html", "training.png"):
            if (self.run.run_dir / name).is_file():
                return self.run.run_dir / name
        return None


#
# MedTLTrainingTest
#


class MedTLTrainingTest(ScriptedLoadableModuleTest):
    """A short run from two volume + segmentation pairs of the scene, on the CPU, from random weights:
    the curves table fills per epoch and the metrics table is made."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_TrainFromScenePairs()

    def test_TrainFromScenePairs(self) -> None:
        import time

        import numpy as np
        from MedTLExtensionLib import mrml_bridge

        self.delayDisplay("Training from two scene pairs")
        ensure_dependencies("train")
        rng = np.random.default_rng(0)
        for index in range(2):
            j, i = np.indices((48, 48))
            disc = (j - 20 - 4 * index) ** 2 + (i - 24) ** 2 < 100
            labels = np.repeat(disc[None], 6, axis=0).astype(np.uint8)
            image = np.where(labels > 0, 150.0, -90.0) + rng.normal(0, 10, labels.shape)
            volume = mrml_bridge.array_to_volume(
                slicer.mrmlScene, image.astype(np.float32), np.diag([0.9, 0.9, 2.5, 1.0]), f"case{index}"
            )
            mrml_bridge.labelmap_to_segmentation(
                slicer.mrmlScene,
                slicer.modules.segmentations.logic(),
                labels,
                np.diag([0.9, 0.9, 2.5, 1.0]),
                [(1, "disc", (0.9, 0.4, 0.3))],
                reference_volume=volume,
            )
        logic = MedTLTrainingLogic()
        p = logic.getParameterNode()
        p.outputDirectory = Path(tempfile.mkdtemp(prefix="MedTLTrainingTest-"))
        p.pretrained, p.epochs, p.device, p.valFraction, p.preset = "none", 2, "cpu", 0.5, "ct_abdomen"
        pairs = [
            (v, s, site) for (v, s), site in zip(training_run.scene_training_pairs(slicer.mrmlScene), "AB", strict=True)
        ]
        self.assertEqual(len(pairs), 2)
        config = logic.buildConfig(p, pairs)
        self.assertEqual(config["data"]["label_names"], ["disc"])
        config["preprocessing"]["patch_size"] = [32, 32]
        config["train"].update(steps_per_epoch=3, batch_size=2)
        logic.run.start(config)
        while logic.run.is_running:
            logic.run.poll()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(logic.run.curves.values("epoch"), [1.0, 2.0])
        self.assertEqual(len(logic.run.curves.values("val Dice disc")), 2)
        table = logic.showMetrics()
        self.assertEqual(table.GetCellText(0, 0), "validation Dice: disc")
        self.assertIsNotNone(logic.reportPath())
        self.delayDisplay("Test passed")
