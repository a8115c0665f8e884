"""MedTL: learn a segmentation from a few painted slices, apply model packages, review the result.

The thin GUI layer: widgets bound to a parameter node. The work happens in
``MedTLExtensionLib.slice_learning.SliceLearner`` (export, engine process, import, review), which
needs no Qt and is tested headless.
"""

import importlib
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from MedTLExtensionLib import dependencies, mrml_bridge, run_folders, terminology
from MedTLExtensionLib.engine_process import describe_event
from MedTLExtensionLib.run_prerequisites import ensure_default_weights, ensure_dependencies, usable_device
from MedTLExtensionLib.slice_learning import (
    SLICE_VIEWS,
    LearningOptions,
    SliceLearner,
    slice_center_ras,
    slice_index_at_ras,
)
from MedTLExtensionLib.training_run import NETWORKS_2D
from MedTLExtensionLib.warm_engine import WarmEngine
from MedTLExtensionLib.widget_lifecycle import WidgetLifecycleMixin, is_set
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

DEVICES = ("auto", "cpu", "cuda", "mps")
LIB_MODULES = (
    "MedTLExtensionLib.mrml_bridge",
    "MedTLExtensionLib.volume_files",
    "MedTLExtensionLib.engine_process",
    "MedTLExtensionLib.dependencies",
    "MedTLExtensionLib.weights_download",
    "MedTLExtensionLib.run_folders",
    "MedTLExtensionLib.terminology",
    "MedTLExtensionLib.training_run",
    "MedTLExtensionLib.live_preview",
    "MedTLExtensionLib.warm_engine",
    "MedTLExtensionLib.slice_learning",
    "MedTLExtensionLib.i18n",
    "MedTLExtensionLib.run_prerequisites",
    "MedTLExtensionLib.widget_lifecycle",
)


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
            " volume into a new segmentation (yours changes only when you accept). Correct the result and"
            " learn again from your corrections. <b>Apply model</b> segments a volume with a saved model package."
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
    inputSegmentation - the user's sparse segmentation (painted slices); only read, until Accept.
    modelPackage - model package folder for "Apply model" (set after "Learn from my slices").
    showProbability - load the foreground probability as an overlay when applying a model.
    showUncertainty - load the uncertainty (normalised entropy) as an overlay when applying a model.
    showGradCam - load the Grad-CAM map of the first label (where the network looked) as an overlay.
    site - the volume's site, for a model package with one BatchNorm per site (empty: its default).
    network - pretrained 2D network fine-tuned by "Learn from my slices".
    device - "auto", "cpu" or "cuda".
    budgetSeconds - how long "Learn from my slices" learns in its first round (later rounds: half).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    modelPackage: Path
    showProbability: bool = True
    showUncertainty: bool = False
    showGradCam: bool = False
    site: str = ""
    network: Annotated[str, Choice(NETWORKS_2D)] = "unet_mobilenet_v2"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    budgetSeconds: Annotated[int, WithinRange(5, 600)] = 30


#
# MedTLExtensionWidget
#


class MedTLExtensionWidget(WidgetLifecycleMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: Learn, review (accept, reject, learn again), Apply, Adapt, Paint next.

    Parameter node, scene close, enter/exit and polling the job come from :class:`WidgetLifecycleMixin`.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedTLExtensionLogic | None = None
        self._showOverlays = False
        self._viewObservation = None  # (slice node, tag) of the view whose slice is previewed

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = MedTLExtensionLogic()
        self.setupLifecycle("UI/MedTLExtension.ui", self.logic.learner, qt.QTimer(), pollIntervalMs=300)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self._updateButtons)

        self.ui.learnButton.connect("clicked(bool)", self.onLearnButton)
        self.ui.acceptButton.connect("clicked(bool)", self.onAcceptButton)
        self.ui.rejectButton.connect("clicked(bool)", self.onRejectButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdaptButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.cleanRunsButton.connect("clicked(bool)", self.onCleanRunsButton)
        self.ui.nextSliceButton.connect("clicked(bool)", self.onNextSliceButton)
        self.ui.goodEnoughButton.connect("clicked(bool)", self.onGoodEnoughButton)

        self.initializeParameterNode()
        # Once per session, in the background: the answer is ready when the user starts a run.
        if dependencies.installed_version("torch"):
            dependencies.DEVICE_CHECK.start(self._parameterNode.device)

    def enter(self) -> None:
        super().enter()
        # The warm engine imports torch and MONAI while the user paints, not after Learn is pressed.
        if dependencies.installed_version("torch"):
            self.logic.warmEngine.start()

    def onSceneClosing(self) -> None:
        # A job's result must not be imported against volumes the closed scene removed.
        if self.logic.learner.is_running:
            self._pollTimer.stop()
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = _("Stopped: the scene was closed.")
        self.logic.learner.on_scene_closed()

    def stopJob(self) -> None:
        self._stopFollowingView()
        self.logic.learner.close()

    def onReload(self) -> None:
        # Slicer reloads only the module file; reload the library too so edits to it take effect.
        for name in LIB_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        super().onReload()

    def setDefaultParameters(self, parameterNode: MedTLExtensionParameterNode) -> None:
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not parameterNode.inputSegmentation:
            parameterNode.inputSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def _updateButtons(self, caller=None, event=None) -> None:
        learner = self.logic.learner if self.logic else None
        running = learner is not None and learner.is_running
        reviewing = learner is not None and learner.under_review is not None
        node = self._parameterNode
        hasVolume = bool(node and node.inputVolume)
        canLearn = hasVolume and bool(node.inputSegmentation) and not running
        self.ui.learnButton.enabled = canLearn
        self.ui.learnButton.text = _("Learn again (with my corrections)") if reviewing else _("Learn from my slices")
        self.ui.learnButton.toolTip = (
            _("Fine-tune a pretrained network on the painted (and corrected) slices, then segment the whole volume.")
            if canLearn
            else _("Select a volume and a segmentation painted on a few of its slices.")
        )
        self.ui.acceptButton.enabled = reviewing and not running
        self.ui.rejectButton.enabled = reviewing and not running
        self.ui.reviewLabel.text = (
            _(
                "Review '{name}': correct it with the Segment Editor where it is wrong, then accept it, reject it,"
                " or learn again from your corrections."
            ).format(name=learner.under_review.GetName())
            if reviewing
            else ""
        )
        self.ui.applyButton.enabled = hasVolume and is_set(node.modelPackage) and not running
        self.ui.adaptButton.enabled = self.ui.applyButton.enabled
        self.ui.cancelButton.enabled = running
        self.ui.goodEnoughButton.enabled = running and learner.stage == "train" and learner.warm_engine is not None
        self.ui.cleanRunsButton.enabled = not running

    def onLearnButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start learning from the painted slices."), waitCursor=True):
            if ensure_dependencies().installed:
                # An engine started before the installation would run with what was there before.
                self.logic.warmEngine.kill()
            p = self._parameterNode
            options = LearningOptions(
                device=usable_device(p.device),
                network=p.network,
                budget_s=float(p.budgetSeconds),
                later_budget_s=max(5.0, p.budgetSeconds / 2),
            )
            ensure_default_weights(options.network, options.pretrained)
            self.logic.learner.start_learning(p.inputVolume, p.inputSegmentation, options)
            self._showOverlays = False
            self._onJobStarted(_("Preparing the painted slices..."))
            self._followLearningView()

    def onGoodEnoughButton(self) -> None:
        if self.logic.learner.good_enough():
            self.ui.statusLabel.text = _("Good enough: segmenting the volume with what it has learned so far...")
            self.ui.goodEnoughButton.enabled = False

    def _followLearningView(self) -> None:
        """Live previews show the slice the user looks at in the view of the plane being learned."""
        self._stopFollowingView()
        plane = self.logic.learner.learning_plane
        sliceWidget = slicer.app.layoutManager().sliceWidget(SLICE_VIEWS[plane[0]]) if plane else None
        if sliceWidget is None:
            return
        sliceNode = sliceWidget.mrmlSliceNode()
        tag = sliceNode.AddObserver(vtk.vtkCommand.ModifiedEvent, self._onLearningViewChanged)
        self._viewObservation = (sliceNode, tag)
        self._onLearningViewChanged(sliceNode)

    def _onLearningViewChanged(self, sliceNode, event=None) -> None:
        learner, volume = self.logic.learner, self._parameterNode.inputVolume if self._parameterNode else None
        plane = learner.learning_plane
        if plane is None or volume is None:
            return
        sliceToRas = sliceNode.GetSliceToRAS()
        index = slice_index_at_ras(volume, plane[1], [sliceToRas.GetElement(row, 3) for row in range(3)])
        if index is not None:
            learner.set_view(plane[1], index)

    def _stopFollowingView(self) -> None:
        if self._viewObservation is not None:
            sliceNode, tag = self._viewObservation
            sliceNode.RemoveObserver(tag)
            self._viewObservation = None

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not apply the model."), waitCursor=True):
            ensure_dependencies()
            p = self._parameterNode
            self.logic.learner.start_apply(
                p.inputVolume,
                p.modelPackage,
                device=usable_device(p.device),
                probabilities=p.showProbability,
                uncertainty=p.showUncertainty,
                gradcam=p.showGradCam,
                domain=p.site.strip(),
            )
            self._showOverlays = True
            self._onJobStarted(_("Segmenting the volume..."))

    def onAdaptButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not adapt the model."), waitCursor=True):
            ensure_dependencies()
            p = self._parameterNode
            self.logic.learner.start_adapt([p.inputVolume], p.modelPackage, device=usable_device(p.device))
            self._onJobStarted(_("Adapting the model to the volume (AdaBN)..."))

    def onAcceptButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not accept the prediction."), waitCursor=True):
            segmentation = self.logic.learner.accept()
            self.ui.statusLabel.text = _("Merged into '{name}'.").format(name=segmentation.GetName())
        self._updateButtons()

    def onRejectButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not reject the prediction."), waitCursor=True):
            self.logic.learner.reject()
            self.ui.statusLabel.text = _("Prediction removed. Your segmentation is unchanged.")
        self._updateButtons()

    def onCancelButton(self) -> None:
        self.logic.learner.cancel()

    def onCleanRunsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not clean up the run folders."), waitCursor=True):
            keep = [self._parameterNode.modelPackage if self._parameterNode else None, self.logic.learner.last_package]
            root = self.logic.learner.work_root
            preview = run_folders.clean_run_folders(root, keep=keep, dry_run=True)
            if not preview.removed:
                slicer.util.infoDisplay(_("There are no old run folders to delete in {root}.").format(root=root))
                return
            if not slicer.util.confirmOkCancelDisplay(
                _("Delete {count} run folders ({size:.0f} MB) in {root}? Models saved in them are deleted too.").format(
                    count=len(preview.removed), size=preview.freed / 1e6, root=root
                ),
                windowTitle=_("MedTL: clean up old runs"),
            ):
                return
            done = run_folders.clean_run_folders(root, keep=keep)
            self.ui.statusLabel.text = _("Deleted {count} run folders.").format(count=len(done.removed))

    def onJobFinished(self, learner: SliceLearner) -> None:
        self._stopFollowingView()
        if learner.last_package is not None and self._parameterNode is not None:
            # The package just learned is what "Apply model" should use next (e.g. on another volume).
            self._parameterNode.modelPackage = learner.last_package
        if learner.result_segmentation is not None:
            self._showResult(learner)
        self._showSuggestions(learner)

    def _showSuggestions(self, learner: SliceLearner) -> None:
        self.ui.nextSliceComboBox.clear()
        for suggestion in learner.suggested_slices:
            self.ui.nextSliceComboBox.addItem(
                _("{plane} slice {index} (uncertainty {score:.2f})").format(
                    plane=_(suggestion.plane), index=suggestion.index, score=suggestion.uncertainty
                )
            )
        hasSuggestions = bool(learner.suggested_slices)
        self.ui.nextSliceComboBox.enabled = hasSuggestions
        self.ui.nextSliceButton.enabled = hasSuggestions

    def onNextSliceButton(self) -> None:
        learner = self.logic.learner
        index = self.ui.nextSliceComboBox.currentIndex
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is None or not 0 <= index < len(learner.suggested_slices):
            return
        suggestion = learner.suggested_slices[index]
        ras = slice_center_ras(volume, suggestion.axis, suggestion.index)
        sliceWidget = slicer.app.layoutManager().sliceWidget(SLICE_VIEWS[suggestion.plane])
        if sliceWidget is not None:
            sliceWidget.mrmlSliceNode().JumpSliceByOffsetting(*ras)
        else:  # a layout without that view: every view goes through the slice's centre
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *ras)

    def describeEvent(self, event: dict) -> tuple[int | None, str]:
        kind = event.get("event")
        if kind == "stage":
            return 0, _("Segmenting the volume with the learned model...")
        if kind == "finished":
            return 100, _("Done: the prediction is in a new segmentation.")
        if kind == "cancelled":
            return 0, _("Cancelled. Your segmentation is unchanged.")
        if kind == "adapted":
            return 100, _("Adapted: the model package now points at the adapted copy; apply it.")
        if kind == "preview" and self.logic.learner.preview.node is not None:
            slicer.util.setSliceViewerLayers(label=self.logic.learner.preview.node, labelOpacity=0.5)
        return describe_event(event)

    def _showResult(self, learner: SliceLearner) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        userSegmentation = self._parameterNode.inputSegmentation if self._parameterNode else None
        if userSegmentation is not None and userSegmentation is not learner.result_segmentation:
            terminology.copy_terminology(userSegmentation, learner.result_segmentation)
        # The overlays belong to the last Apply; a learned round has none (an older one would be stale).
        overlay = None
        if self._showOverlays:
            overlay = learner.gradcam_volume or learner.uncertainty_volume or learner.probability_volume
        slicer.util.setSliceViewerLayers(
            background=volume, foreground=overlay, foregroundOpacity=0.4 if overlay else None
        )
        learner.result_segmentation.CreateClosedSurfaceRepresentation()


#
# MedTLExtensionLogic
#


class MedTLExtensionLogic(ScriptedLoadableModuleLogic):
    """Holds the module's :class:`SliceLearner` on Slicer's scene.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("MedTLExtension")
        logic.learner.start_learning(volumeNode, segmentationNode, LearningOptions(epochs=10, device="cpu"))
        prediction = logic.learner.run_to_completion(idle=slicer.app.processEvents)
        logic.learner.accept()
    """

    def __init__(self, workRoot: Path | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # Runs are kept (they hold the learned model packages); exported inputs are removed.
        root = workRoot or Path(slicer.app.defaultScenePath) / "MedTL" / "runs"
        # One warm engine for the session: torch, the network and the volume stay loaded between rounds.
        self.warmEngine = WarmEngine()
        self.learner = SliceLearner(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), work_root=root, warm_engine=self.warmEngine
        )

    def getParameterNode(self) -> MedTLExtensionParameterNode:
        return MedTLExtensionParameterNode(super().getParameterNode())


#
# MedTLExtensionTest
#


class MedTLExtensionTest(ScriptedLoadableModuleTest):
    """The whole loop on a small synthetic volume, on the CPU: paint 3 slices, learn, correct a slice,
    learn again, accept; then apply the learned package with a probability overlay.

    From random weights (a test must not download ImageNet weights): 10 epochs of 16 steps, which
    measured 37 s on a 2-core CPU with Dice 0.997 on the unpainted slices (``pytest`` runs the same
    loop headless with ImageNet weights in Testing/tests/test_slice_learning.py).
    """

    SHAPE_KJI = (12, 64, 64)
    PAINTED_SLICES = (2, 6, 9)
    # Epochs, not a time budget (budget_s=0): the figures above hold on any machine; the rounds still
    # run on the module's warm engine.
    OPTIONS = LearningOptions(
        epochs=10, steps_per_epoch=16, batch_size=4, device="cpu", pretrained="none", budget_s=0, later_budget_s=0
    )

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_LearnReviewAcceptApply()

    def makeScene(self) -> tuple[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, np.ndarray]:
        k, j, i = np.indices(self.SHAPE_KJI, dtype=float)
        # Anisotropic voxels (2.5 mm slices) as in a clinical scan; the shapes are round in mm.
        organ = ((k - 6) * 2.5 / 20) ** 2 + ((j - 32) / 20) ** 2 + ((i - 30) / 22) ** 2 < 1
        lesion = ((k - 6) * 2.5 / 9) ** 2 + ((j - 30) / 8) ** 2 + ((i - 36) / 8) ** 2 < 1
        truth = np.where(lesion, 2, np.where(organ, 1, 0)).astype(np.uint8)
        image = np.select([truth == 2, truth == 1], [40.0, 160.0], -90.0)
        image += np.random.default_rng(0).normal(0.0, 12.0, self.SHAPE_KJI)
        ijkToRas = np.diag([0.8, 0.8, 2.5, 1.0])
        ijkToRas[:3, 3] = (-25.0, -25.0, -15.0)
        volume = mrml_bridge.array_to_volume(slicer.mrmlScene, image.astype(np.float32), ijkToRas, "MedTLPhantom")
        volume.CreateDefaultDisplayNodes()
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(400, 40)
        painted = np.zeros(self.SHAPE_KJI, dtype=np.uint8)
        painted[list(self.PAINTED_SLICES)] = truth[list(self.PAINTED_SLICES)]
        segmentation = mrml_bridge.labelmap_to_segmentation(
            slicer.mrmlScene,
            slicer.modules.segmentations.logic(),
            painted,
            ijkToRas,
            [(1, "organ", (0.9, 0.5, 0.3)), (2, "lesion", (0.2, 0.8, 0.3))],
            reference_volume=volume,
            name="MedTLPhantom painted",
        )
        return volume, segmentation, truth

    def labels(self, node, volume) -> np.ndarray:
        return mrml_bridge.segmentation_to_labelmap(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), node, volume
        )[0]

    def test_LearnReviewAcceptApply(self) -> None:
        self.delayDisplay("Learning from 3 painted slices of a synthetic volume")
        ensure_dependencies()
        volume, painted, truth = self.makeScene()
        logic = MedTLExtensionLogic(workRoot=Path(tempfile.mkdtemp(prefix="MedTLSelfTest-")))
        learner = logic.learner
        before = self.labels(painted, volume)
        unpainted = [k for k in range(self.SHAPE_KJI[0]) if k not in self.PAINTED_SLICES]

        learner.start_learning(volume, painted, self.OPTIONS)
        prediction = learner.run_to_completion(timeout_s=600, idle=slicer.app.processEvents)
        self.assertIsNotNone(prediction)
        self.assertIs(learner.under_review, prediction)
        predicted = self.labels(prediction, volume)
        guess, expected = predicted[unpainted] > 0, truth[unpainted] > 0
        dice = 2.0 * np.logical_and(guess, expected).sum() / (guess.sum() + expected.sum())
        self.delayDisplay(f"Dice on unpainted slices: {dice:.3f}")
        self.assertGreater(dice, 0.8)
        np.testing.assert_array_equal(self.labels(painted, volume), before, err_msg="the user's paint was modified")
        self.assertTrue(learner.suggested_slices, "a round names the slices to paint next")

        self.delayDisplay("Correcting slice 4 and learning again from the last model")
        corrected = predicted.copy()
        corrected[4] = truth[4]
        mrml_bridge.labelmap_to_segmentation(
            slicer.mrmlScene,
            slicer.modules.segmentations.logic(),
            corrected,
            mrml_bridge.ijk_to_ras_of(volume),
            [(1, "organ", (0.9, 0.5, 0.3)), (2, "lesion", (0.2, 0.8, 0.3))],
            reference_volume=volume,
            node=prediction,
        )
        self.assertEqual(learner.training_labels(volume, painted).corrected, {(0, 4)})
        learner.start_learning(volume, painted, LearningOptions(**{**self.OPTIONS.__dict__, "epochs": 2}))
        self.assertIs(learner.run_to_completion(timeout_s=600, idle=slicer.app.processEvents), prediction)
        self.assertEqual(learner.rounds, 2)

        learner.accept()
        merged = self.labels(painted, volume)
        np.testing.assert_array_equal(merged[list(self.PAINTED_SLICES)], before[list(self.PAINTED_SLICES)])
        self.assertTrue(merged[unpainted].any())
        self.assertIsNone(slicer.mrmlScene.GetNodeByID(prediction.GetID()))

        self.delayDisplay("Applying the learned package with a probability overlay")
        learner.start_apply(volume, learner.last_package, device="cpu", probabilities=True)
        applied = learner.run_to_completion(timeout_s=600, idle=slicer.app.processEvents)
        self.assertIsNotNone(applied)
        probability = slicer.util.arrayFromVolume(learner.probability_volume)
        self.assertGreater(probability[truth > 0].mean(), 0.8)
        self.delayDisplay("Test passed")
