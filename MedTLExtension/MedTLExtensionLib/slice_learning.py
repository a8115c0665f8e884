"""Semi-automatic segmentation: learn from a few painted slices, review, correct, learn again.

One :class:`SliceLearner` serves the MedTL module. A round goes:

1. :meth:`SliceLearner.start_learning` exports the volume and the labelled slices (the slices the
   user painted, plus the slices they corrected in the last prediction) and starts
   ``medtl train`` as a separate process. Unlabelled slices are unknown, not background.
2. :meth:`SliceLearner.poll` (from a timer) forwards the engine's events; when training is done
   it starts ``medtl predict`` with the new model package, and when that is done it imports the
   prediction into a segmentation node of its own. The user's segmentation is only read.
3. The user reviews the prediction and corrects it in the Segment Editor, then either
   :meth:`~SliceLearner.accept` (merged into their segmentation), :meth:`~SliceLearner.reject`,
   or learns again: the corrected slices become labelled slices and training starts from the
   last round's model.

:meth:`SliceLearner.start_apply` segments a volume with any model package, optionally with a
probability, an uncertainty and a Grad-CAM volume for overlays. :meth:`SliceLearner.start_adapt` adapts a
package to volumes from another scanner (AdaBN: ``medtl adapt``) without any label; the adapted
package becomes :attr:`~SliceLearner.last_package`.

Needs MRML, not Qt: the scene, the segmentations logic and the engine starter are passed in, so
it runs in Slicer and headless on ``slicer-core`` alike.

Example:
    >>> learner = SliceLearner(scene, segmentations_logic, work_root=Path("~/MedTL").expanduser())
    >>> learner.start_learning(volume, painted, LearningOptions(epochs=10, device="cpu"))
    >>> prediction = learner.run_to_completion()
    >>> learner.accept()  # or correct a few slices of ``prediction`` and learn again
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
from medtl.data.partial_labels import MAX_CLASSES, UNKNOWN

from MedTLExtensionLib import mrml_bridge, volume_files
from MedTLExtensionLib.engine_process import EngineJob, EngineRun, start_engine
from MedTLExtensionLib.live_preview import PreviewOverlay
from MedTLExtensionLib.painted_planes import ObliquePaintingError, Plane, dominant_axis, find_planes, plane_index
from MedTLExtensionLib.warm_engine import WarmEngine

__all__ = [
    "LearningOptions",
    "SliceLearner",
    "SliceSuggestion",
    "TrainingLabels",
    "display_window",
    "learning_config",
    "package_segments",
    "slice_center_ras",
    "slice_index_at_ras",
    "suggest_slices",
]

PACKAGE_MANIFEST = "medtl_package.json"

EngineFactory = Callable[[Sequence[str]], EngineRun]


@dataclass
class LearningOptions:
    """What one round of learning uses. The defaults are the first run with no choice made.

    ``pretrained`` applies to the first round; later rounds start from the last round's model.
    """

    epochs: int = 20
    device: str = "auto"
    network: str = "unet_mobilenet_v2"
    pretrained: str = "imagenet"
    steps_per_epoch: int = 20
    batch_size: int = 8
    # With the warm engine a round learns for about this long (0: the epochs above), later rounds
    # (a few corrections on a network that has learned the structure) for the shorter budget.
    budget_s: float = 30.0
    later_budget_s: float = 15.0
    # Seconds between live previews of the slice in view while it learns (0: none).
    preview_every_s: float = 3.0


@dataclass
class TrainingLabels:
    """What the user told MedTL so far, as one round's training labels.

    Attributes:
        labels: class indices 1..N and 0 (background) on the annotated planes, :data:`UNKNOWN`
            (255) elsewhere, on the volume's grid (KJI).
        segments: one ``(class, name, colour)`` per segment of the user's segmentation, in its order.
        painted: the planes ``(array axis, index)`` the user painted in their segmentation.
        corrected: the planes (not painted) the user corrected in a prediction under review, this
            round or earlier; their labels come from the prediction as corrected, erasures included.
        slice_plane: ``axial``, ``coronal`` or ``sagittal``: the anatomical plane of the axis most
            planes lie along; the 2D network trains and predicts slices of that plane.
    """

    labels: np.ndarray
    segments: list[mrml_bridge.SegmentSpec]
    painted: set[Plane]
    corrected: set[Plane]
    slice_plane: str


@dataclass
class _Review:
    """A prediction under review and what is needed to learn from its corrections."""

    node: slicer.vtkMRMLSegmentationNode
    volume: slicer.vtkMRMLScalarVolumeNode
    source: slicer.vtkMRMLSegmentationNode
    names: list[str]  # class i + 1 is names[i]; the node's segments carry i + 1 as their tag
    as_imported: np.ndarray  # the node's labels as MedTL wrote them, to find the user's corrections
    corrected: set[Plane] = field(default_factory=set)  # planes corrected in earlier rounds


@dataclass
class _Job:
    kind: str  # "learn", "apply" or "adapt"
    stage: str  # "train", "predict" or "adapt"
    engine: EngineJob
    volume: slicer.vtkMRMLScalarVolumeNode
    run_dir: Path
    inputs_dir: Path
    image_path: Path
    device: str
    segments: list[mrml_bridge.SegmentSpec]
    output_name: str
    source: slicer.vtkMRMLSegmentationNode | None = None
    training: TrainingLabels | None = None
    probabilities: bool = False
    uncertainty: bool = False
    gradcam: bool = False
    domain: str | None = None
    outputs: dict[str, Path] = field(default_factory=dict)


class SliceLearner:
    """Learn-from-slices rounds and model-package application, one job at a time.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in Slicer).
        segmentations_logic: the Segmentations module logic.
        work_root: where run directories go; a learning run keeps its model package there.
        engine_factory: starts ``medtl <args>``; tests may pass another :class:`EngineRun` maker.
        warm_engine: learning rounds go to this warm engine (``medtl serve``: the network and the
            volume stay loaded between rounds, with live previews and time-budgeted rounds);
            None runs each round as a one-shot ``medtl train``.
    """

    def __init__(
        self,
        scene: slicer.vtkMRMLScene,
        segmentations_logic,
        *,
        work_root: str | Path,
        engine_factory: EngineFactory = start_engine,
        warm_engine: WarmEngine | None = None,
    ) -> None:
        self.scene = scene
        self.warm_engine = warm_engine
        self.preview = PreviewOverlay(scene)
        # The slice the user looks at, (array axis KJI, index): what live previews show.
        self.view: tuple[int, int] | None = None
        self._warm_image: tuple[str, int, Path] | None = None  # (volume ID, image MTime, file)
        self.segmentations_logic = segmentations_logic
        self.work_root = Path(work_root)
        self.engine_factory = engine_factory
        self._job: _Job | None = None
        self._review: _Review | None = None
        self.rounds = 0
        self.last_package: Path | None = None
        self.result_segmentation: slicer.vtkMRMLSegmentationNode | None = None
        self.probability_volume: slicer.vtkMRMLScalarVolumeNode | None = None
        self.uncertainty_volume: slicer.vtkMRMLScalarVolumeNode | None = None
        self.gradcam_volume: slicer.vtkMRMLScalarVolumeNode | None = None
        # After a learning round: the slices to paint next, most uncertain first (see suggest_slices).
        self.suggested_slices: list[SliceSuggestion] = []
        self.last_log = ""

    # ------------------------------------------------------------------ state

    @property
    def is_running(self) -> bool:
        return self._job is not None

    @property
    def stage(self) -> str | None:
        """``"train"``, ``"predict"`` or ``"adapt"`` while a job runs, else None."""
        return self._job.stage if self._job else None

    @property
    def learning_plane(self) -> tuple[str, int] | None:
        """While a round learns: the anatomical plane the network learns and its array axis (KJI),
        which a slice view must show for live previews."""
        job = self._job
        if job is None or job.kind != "learn" or job.training is None:
            return None
        plane = job.training.slice_plane
        return plane, _array_axis(job.volume, plane)

    @property
    def under_review(self) -> slicer.vtkMRMLSegmentationNode | None:
        """The prediction node waiting for accept, reject or another round, if any."""
        review = self._review
        if review is None or self.scene.GetNodeByID(review.node.GetID()) is not review.node:
            return None
        return review.node

    # ------------------------------------------------------------------ learning

    def training_labels(
        self, volume: slicer.vtkMRMLScalarVolumeNode, segmentation: slicer.vtkMRMLSegmentationNode
    ) -> TrainingLabels:
        """The training labels of the next round: the planes the user painted in ``segmentation``
        (in any view), and the planes they corrected in the prediction under review, each taken as
        fully annotated; everything else unknown.

        Raises:
            ValueError: for two segments with one name, more segments than label values, or
                painting that lies in no slice of the volume (an oblique view).
        """
        user_labels, user_segments = mrml_bridge.segmentation_to_labelmap(
            self.scene, self.segmentations_logic, segmentation, volume
        )
        names = [name for _value, name, _color in user_segments]
        if len(set(names)) != len(names):
            raise ValueError(f"segmentation '{segmentation.GetName()}' has two segments with the same name")
        if len(names) > MAX_CLASSES:
            raise ValueError(f"segmentation '{segmentation.GetName()}' has more than {MAX_CLASSES} segments")
        lookup = np.zeros(max((v for v, _n, _c in user_segments), default=0) + 1, dtype=np.uint8)
        for index, (value, _name, _color) in enumerate(user_segments, start=1):
            lookup[value] = index
        classes = lookup[user_labels]
        segments = [(index, name, color) for index, (_value, name, color) in enumerate(user_segments, start=1)]
        painted = _planes_of(classes != 0, f"segmentation '{segmentation.GetName()}'")
        labels = np.full(classes.shape, UNKNOWN, np.uint8)

        corrected: set[Plane] = set()
        review = self._review
        if self.under_review is not None and review.volume is volume and review.source is segmentation:
            now, _specs = mrml_bridge.segmentation_to_labelmap(
                self.scene, self.segmentations_logic, review.node, volume
            )
            # Erasing a false positive changes voxels as much as painting does: both are corrections.
            changed = _planes_of(now != review.as_imported, f"the corrections in '{review.node.GetName()}'")
            corrected = (review.corrected | changed) - painted
            # The review node's classes are the last round's; map them to this round's by name.
            remap = np.zeros(max(len(review.names), int(now.max())) + 1, dtype=np.uint8)
            for old, name in enumerate(review.names, start=1):
                if name in names:
                    remap[old] = names.index(name) + 1
            for plane in corrected:
                labels[plane_index(plane)] = remap[now[plane_index(plane)]]
        for plane in painted:
            labels[plane_index(plane)] = classes[plane_index(plane)]
        planes = painted | corrected
        axis = dominant_axis(planes, labels != UNKNOWN) if planes else 0
        return TrainingLabels(labels, segments, painted, corrected, _anatomical_plane(volume, axis))

    def start_learning(
        self,
        volume: slicer.vtkMRMLScalarVolumeNode,
        segmentation: slicer.vtkMRMLSegmentationNode,
        options: LearningOptions | None = None,
    ) -> Path:
        """Exports the labelled slices and starts training; returns the run directory.

        Raises:
            ValueError: for a missing volume, an empty segmentation or no painted voxel.
        """
        options = options or LearningOptions()
        self._check_idle()
        if volume is None or volume.GetImageData() is None:
            raise ValueError("Select a volume that holds image data.")
        if segmentation is None or segmentation.GetSegmentation().GetNumberOfSegments() == 0:
            raise ValueError("Select a segmentation with at least one segment painted on a few slices.")
        training = self.training_labels(volume, segmentation)
        if not training.painted and not training.corrected:
            raise ValueError(
                f"The segmentation '{segmentation.GetName()}' has no painted voxels inside volume '{volume.GetName()}'."
            )
        names = [name for _v, name, _c in training.segments]
        # Later rounds continue from the last model when it knows the same structures.
        initial = options.pretrained
        if self.last_package is not None and self._package_names(self.last_package) == names:
            initial = str(self.last_package)

        run_dir = self._new_run_dir(volume.GetName(), "learn")
        inputs = run_dir / "inputs"
        inputs.mkdir()
        image_path = self._learning_image(volume, inputs)
        volume_files.write_array(training.labels, mrml_bridge.ijk_to_ras_of(volume), inputs / "label.nrrd")
        (inputs / "cases.csv").write_text("image,label\nimage.nrrd,label.nrrd\n", encoding="utf-8")
        config = learning_config(
            window=display_window(volume),
            label_names=names,
            csv=inputs / "cases.csv",
            output_dir=run_dir,
            image_shape=training.labels.shape,
            options=options,
            initial_weights=initial,
            slice_plane=training.slice_plane,
        )
        config_path = run_dir / "config.json"
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        logging.info(
            "MedTL: learning %s slices from painted planes %s and corrected planes %s of %s in %s",
            training.slice_plane,
            sorted(training.painted),
            sorted(training.corrected),
            volume.GetName(),
            run_dir,
        )
        # One process trains and then predicts: a second engine start-up (torch and MONAI imports,
        # several seconds) would be most of the wait after a short round.
        # The uncertainty ranks the slices to paint next; it is not shown as an overlay.
        outputs = {"labels": inputs / "prediction.nrrd", "slice_uncertainty": inputs / "uncertainty.nrrd"}
        if self.warm_engine is not None:
            request = {
                "request": "learn",
                "config": str(config_path),
                "image": str(image_path),
                "label": str(inputs / "label.nrrd"),
                "out": str(outputs["labels"]),
                "uncertainty": str(outputs["slice_uncertainty"]),
                "budget_s": options.budget_s if initial == options.pretrained else options.later_budget_s,
                "preview_every_s": options.preview_every_s,
                **({"view": {"axis": self.view[0], "index": self.view[1]}} if self.view else {}),
            }
            engine = EngineJob(self.warm_engine.round(request), "Training")
        else:
            args = ["train", str(config_path), "--predict", str(image_path), "--predict-out", str(outputs["labels"])]
            args += ["--predict-uncertainty", str(outputs["slice_uncertainty"])]
            engine = EngineJob(self.engine_factory([*args, "--events", "-"]), "Training")
        self._job = _Job(
            kind="learn",
            stage="train",
            engine=engine,
            volume=volume,
            run_dir=run_dir,
            inputs_dir=inputs,
            image_path=image_path,
            device=options.device,
            segments=training.segments,
            output_name=f"{segmentation.GetName()} (MedTL)",
            source=segmentation,
            training=training,
            outputs=outputs,
        )
        return run_dir

    # ------------------------------------------------------------------ applying a package

    def start_apply(
        self,
        volume: slicer.vtkMRMLScalarVolumeNode,
        package: str | Path,
        *,
        device: str = "auto",
        probabilities: bool = False,
        uncertainty: bool = False,
        gradcam: bool = False,
        domain: str | None = None,
    ) -> Path:
        """Segments ``volume`` with a model package into a new segmentation node.

        With ``probabilities`` the foreground probability, with ``uncertainty`` the normalised
        entropy of the class probabilities (for an ensemble package: of their mean), with
        ``gradcam`` the Grad-CAM map of label 1 (where the network looked), each come back as a
        scalar volume (0..1) on the volume's grid. ``domain``
        names the volume's site for a package with one BatchNorm per site (else its default).
        """
        self._check_idle()
        if volume is None or volume.GetImageData() is None:
            raise ValueError("Select a volume that holds image data.")
        package = Path(package)
        segments = package_segments(package)
        run_dir = self._new_run_dir(volume.GetName(), "apply")
        inputs = run_dir / "inputs"
        inputs.mkdir()
        image_path = volume_files.write_volume(volume, inputs / "image.nrrd")
        job = _Job(
            kind="apply",
            stage="predict",
            engine=None,  # set by _start_predict
            volume=volume,
            run_dir=run_dir,
            inputs_dir=inputs,
            image_path=image_path,
            device=device,
            segments=segments,
            output_name=f"{volume.GetName()} (MedTL)",
            probabilities=probabilities,
            uncertainty=uncertainty,
            gradcam=gradcam,
            domain=domain or None,
        )
        self._start_predict(job, package)
        return run_dir

    # ------------------------------------------------------------------ adapting a package

    def start_adapt(
        self,
        volumes: Sequence[slicer.vtkMRMLScalarVolumeNode],
        package: str | Path,
        *,
        device: str = "auto",
        domain: str | None = None,
    ) -> Path:
        """Adapts a model package to ``volumes`` (unlabelled images of the target scanner): its
        BatchNorm statistics are re-estimated on them (AdaBN), every weight unchanged. The new
        package is written to the run directory and becomes :attr:`last_package`. ``domain`` names
        the target domain of a package with one BatchNorm per domain (DSBN); by default the
        volumes become a new domain named after the first one."""
        self._check_idle()
        volumes = [v for v in volumes if v is not None]
        if not volumes or any(v.GetImageData() is None for v in volumes):
            raise ValueError("Select the volume(s) to adapt to; each must hold image data.")
        package = Path(package)
        if not (package / PACKAGE_MANIFEST).is_file():
            raise ValueError(f"{package} is not a MedTL model package (no {PACKAGE_MANIFEST}).")
        run_dir = self._new_run_dir(volumes[0].GetName(), "adapt")
        inputs = run_dir / "inputs"
        inputs.mkdir()
        paths = [volume_files.write_volume(v, inputs / f"image{i}.nrrd") for i, v in enumerate(volumes)]
        out = run_dir / "model"
        args = ["adapt", "--model", str(package), "--out", str(out)]
        for path in paths:
            args += ["--image", str(path)]
        manifest = json.loads((package / PACKAGE_MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("domains"):
            args += ["--domain", domain or volumes[0].GetName()]
        elif domain:
            raise ValueError(f"{package} has no domain-specific BatchNorm; a domain does not apply.")
        args += ["--device", device, "--events", "-"]
        engine = EngineJob(self.engine_factory(args), "Adaptation")
        self._job = _Job(
            kind="adapt",
            stage="adapt",
            engine=engine,
            volume=volumes[0],
            run_dir=run_dir,
            inputs_dir=inputs,
            image_path=paths[0],
            device=device,
            segments=[],
            output_name="",
            outputs={"package": out},
        )
        return run_dir

    # ------------------------------------------------------------------ running

    def cancel(self) -> None:
        """Stops the engine; nothing is added to the scene, the run directory is kept."""
        if self._job is not None:
            self._job.engine.cancel()

    def poll(self) -> list[dict[str, Any]]:
        """The engine's new events; moves the job on (train -> predict -> import).

        Besides the engine's own events it returns ``stage`` (prediction started), ``finished``
        (result imported) and ``cancelled``. Raises ``RuntimeError`` with the engine's message
        when it fails; the job then ends and the scene is unchanged.
        """
        job = self._job
        if job is None:
            return []
        try:
            events = job.engine.poll()
        except RuntimeError:
            self.last_log = job.engine.log
            self._job = None
            self.preview.clear()
            raise
        for event in events:
            if event.get("event") == "preview" and job.kind == "learn":
                self._show_preview(job, event)
        if job.stage == "train" and any(e.get("event") == "start" and e.get("label") == "predict" for e in events):
            events.append({"event": "stage", "name": "predict"})
        if not job.engine.finished:
            return events
        self.last_log = job.engine.log
        self.preview.clear()
        if job.engine.cancelled:
            self._job = None
            return [*events, {"event": "cancelled"}]
        if job.stage == "adapt":
            self._job = None
            done = job.engine.done or {}
            self.last_package = Path(done.get("package") or job.outputs["package"])
            shutil.rmtree(job.inputs_dir, ignore_errors=True)  # the images: the scene has them
            return [*events, {"event": "adapted", "package": str(self.last_package)}]
        if job.stage == "train":
            package = job.run_dir / "model"
            self.last_package = package
            self.rounds += 1
            if not job.outputs["labels"].is_file():  # an engine that trained but did not predict
                try:
                    self._start_predict(job, package)
                except Exception:
                    self._job = None
                    raise
                return [*events, {"event": "stage", "name": "predict"}]
        try:
            node = self._import_results(job)
        finally:
            self._job = None
        # Only the inputs go: a learning run's model package is what the next round starts from.
        shutil.rmtree(job.run_dir if job.kind == "apply" else job.inputs_dir, ignore_errors=True)
        return [*events, {"event": "finished", "segmentation": node.GetID()}]

    def run_to_completion(
        self, timeout_s: float = 3600.0, interval_s: float = 0.2, idle: Callable[[], None] | None = None
    ) -> slicer.vtkMRMLSegmentationNode | None:
        """Polls until the job ends (scripts and tests); returns the new segmentation node."""
        deadline = time.monotonic() + timeout_s
        while self.is_running:
            self.poll()
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"MedTL job did not finish within {timeout_s} s")
            if idle is not None:
                idle()
            time.sleep(interval_s)
        return self.result_segmentation

    # ------------------------------------------------------------------ review

    def accept(self) -> slicer.vtkMRMLSegmentationNode:
        """Merges the reviewed prediction into the user's segmentation and removes the prediction node.

        Each of the user's segments gets the prediction of its structure (with the user's
        corrections) on every slice the user did not paint; painted slices (in any view) stay as
        painted.
        """
        node = self.under_review
        if node is None:
            raise ValueError("There is no MedTL prediction to accept.")
        review = self._review
        source, volume = review.source, review.volume
        user_labels, user_segments = mrml_bridge.segmentation_to_labelmap(
            self.scene, self.segmentations_logic, source, volume
        )
        painted = np.zeros(user_labels.shape, bool)
        for plane in _planes_of(user_labels != 0, f"segmentation '{source.GetName()}'"):
            painted[plane_index(plane)] = True
        predicted, _ = mrml_bridge.segmentation_to_labelmap(self.scene, self.segmentations_logic, node, volume)
        segmentation = source.GetSegmentation()
        ids_by_name = {segmentation.GetSegment(i).GetName(): i for i in mrml_bridge.list_segment_ids(segmentation)}
        values_by_name = {name: value for value, name, _color in user_segments}
        was_modifying = source.StartModify()
        try:
            for index, name in enumerate(review.names, start=1):
                if name not in ids_by_name:
                    continue  # the user removed that segment meanwhile: nothing to merge into
                mask = predicted == index
                mask[painted] = user_labels[painted] == values_by_name[name]
                mrml_bridge.replace_segment_voxels(source, ids_by_name[name], mask, volume)
        finally:
            source.EndModify(was_modifying)
        self._remove_review()
        return source

    def reject(self) -> None:
        """Removes the prediction under review; the user's segmentation is unchanged."""
        if self.under_review is None:
            raise ValueError("There is no MedTL prediction to reject.")
        self._remove_review()

    # ------------------------------------------------------------------ internals

    def _remove_review(self) -> None:
        review, self._review = self._review, None
        if self.result_segmentation is review.node:
            self.result_segmentation = None
        self.scene.RemoveNode(review.node)

    def _check_idle(self) -> None:
        if self._job is not None:
            raise RuntimeError("MedTL is already running; cancel it or wait for it to finish.")
        self.result_segmentation = None

    def _learning_image(self, volume: slicer.vtkMRMLScalarVolumeNode, inputs: Path) -> Path:
        """The volume as a file for the engine. The warm engine keeps the volume it read last in
        memory while its file is unchanged, so an unchanged volume keeps its file between rounds
        (in the work folder, not the round's inputs, which go after the round)."""
        if self.warm_engine is None:
            return volume_files.write_volume(volume, inputs / "image.nrrd")
        version = (volume.GetID(), volume.GetImageData().GetMTime())
        if self._warm_image is not None and self._warm_image[:2] == version and self._warm_image[2].is_file():
            return self._warm_image[2]
        folder = self.work_root / "warm-engine"
        folder.mkdir(parents=True, exist_ok=True)
        path = volume_files.write_volume(volume, folder / f"{time.strftime('%Y%m%d-%H%M%S')}-image.nrrd")
        if self._warm_image is not None:
            self._warm_image[2].unlink(missing_ok=True)  # MedTL's own copy of the earlier volume
        self._warm_image = (*version, path)
        return path

    def set_view(self, axis: int, index: int) -> None:
        """The slice the user looks at (array axis KJI and index); live previews follow it."""
        self.view = (int(axis), int(index))
        if self.warm_engine is not None and self.stage == "train":
            self.warm_engine.send({"request": "view", "axis": self.view[0], "index": self.view[1]})

    def good_enough(self) -> bool:
        """Stops the learning round at its next step and predicts with the weights as they are
        (the warm engine only); False when no such round runs."""
        job = self._job
        stop = getattr(job.engine.process, "good_enough", None) if job is not None and job.stage == "train" else None
        return bool(stop and stop())

    def _new_run_dir(self, volume_name: str, prefix: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in volume_name)[:40] or "volume"
        base = self.work_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{prefix}-{safe}"
        run_dir, suffix = base, 1
        while run_dir.exists():
            suffix += 1
            run_dir = base.with_name(f"{base.name}~{suffix}")
        run_dir.mkdir(parents=True)
        return run_dir

    @staticmethod
    def _package_names(package: Path) -> list[str]:
        return [name for _v, name, _c in package_segments(package)]

    def _start_predict(self, job: _Job, package: Path) -> None:
        # Overlays of an earlier prediction stay in the scene, but are not this one's.
        self.probability_volume = self.uncertainty_volume = self.gradcam_volume = None
        outputs = {"labels": job.inputs_dir / "prediction.nrrd"}
        args = ["predict", "--model", str(package), "--image", str(job.image_path), "--out", str(outputs["labels"])]
        if job.probabilities:
            outputs["probabilities"] = job.inputs_dir / "probability.nrrd"
            args += ["--probabilities", str(outputs["probabilities"])]
        if job.uncertainty:
            outputs["uncertainty"] = job.inputs_dir / "uncertainty.nrrd"
            args += ["--uncertainty", str(outputs["uncertainty"])]
        if job.gradcam:
            outputs["gradcam"] = job.inputs_dir / "gradcam.nrrd"
            args += ["--gradcam", str(outputs["gradcam"])]
        if job.domain:
            args += ["--domain", job.domain]
        args += ["--device", job.device, "--events", "-"]
        # Started before the job is recorded: if starting fails, MedTL is not left "running".
        job.engine = EngineJob(self.engine_factory(args), "Prediction")
        job.stage, job.outputs = "predict", outputs
        self._job = job

    def _show_preview(self, job: _Job, event: dict[str, Any]) -> None:
        try:
            plane = np.load(event["path"])
            self.preview.show(job.volume, axis=int(event["axis"]), index=int(event["index"]), plane=plane)
        except (OSError, ValueError, KeyError) as err:  # a preview is a courtesy: never fail the round
            logging.warning("MedTL: preview not shown: %s", err)

    def _import_results(self, job: _Job) -> slicer.vtkMRMLSegmentationNode:
        labels, ijk_to_ras = volume_files.read_array(job.outputs["labels"])
        review = self._review if job.kind == "learn" else None
        reuse = review is not None and self.under_review is not None and review.source is job.source
        if job.kind == "learn" and job.training.corrected:
            # The user's corrections stay visible (and stay training data for the next round).
            for plane in job.training.corrected:
                labels[plane_index(plane)] = job.training.labels[plane_index(plane)]
        # The reference volume makes the bridge check that the prediction is on the volume's grid.
        node = mrml_bridge.labelmap_to_segmentation(
            self.scene,
            self.segmentations_logic,
            labels,
            ijk_to_ras,
            job.segments,
            reference_volume=job.volume,
            node=review.node if reuse else None,
            name=job.output_name,
        )
        if job.kind == "learn":
            imported, _ = mrml_bridge.segmentation_to_labelmap(self.scene, self.segmentations_logic, node, job.volume)
            self._review = _Review(
                node=node,
                volume=job.volume,
                source=job.source,
                names=[name for _v, name, _c in job.segments],
                as_imported=imported,
                corrected=set(job.training.corrected),
            )
            if "slice_uncertainty" in job.outputs and job.outputs["slice_uncertainty"].is_file():
                uncertainty, _matrix = volume_files.read_array(job.outputs["slice_uncertainty"])
                plane = job.training.slice_plane
                axis = _array_axis(job.volume, plane)
                self.suggested_slices = [
                    SliceSuggestion(plane, axis, index, score)
                    for index, score in suggest_slices(uncertainty, job.training.labels != UNKNOWN, axis=axis)
                ]
        overlays = {
            "probabilities": ("probability", "probability_volume"),
            "uncertainty": ("uncertainty", "uncertainty_volume"),
            "gradcam": ("Grad-CAM", "gradcam_volume"),
        }
        for key, (title, attribute) in overlays.items():
            if key in job.outputs:
                array, matrix = volume_files.read_array(job.outputs[key])
                name = f"{job.volume.GetName()} MedTL {title}"
                volume = mrml_bridge.array_to_volume(self.scene, array.astype(np.float32), matrix, name)
                volume.SetAndObserveTransformNodeID(job.volume.GetTransformNodeID())
                _show_as_fraction(volume)
                setattr(self, attribute, volume)
        self.result_segmentation = node
        return node

    # ------------------------------------------------------------------ lifecycle

    def on_scene_closed(self) -> None:
        """The scene is closing: the running job is stopped and forgotten, so its result is never
        imported against a volume that is gone, and nothing refers to the scene's nodes any more.

        Returns at once; the engine stops in the background (see :meth:`EngineProcess.cancel`).
        The run directory and the last model package are kept.
        """
        job, self._job = self._job, None
        if job is not None:
            job.engine.cancel()
        self.preview.node = None  # gone with the scene
        self._warm_image = None
        self._review = None
        self.result_segmentation = None
        self.probability_volume = self.uncertainty_volume = self.gradcam_volume = None

    def close(self) -> None:
        """Module cleanup and application exit: the engine's process tree is killed now (there is no
        time for a graceful stop; the last checkpoint was written atomically)."""
        job, self._job = self._job, None
        if job is not None:
            job.engine.kill()
        if self.warm_engine is not None:
            self.warm_engine.shutdown()


@dataclass(frozen=True)
class SliceSuggestion:
    """A slice to paint next: its plane and array axis (KJI), index, and mean uncertainty (0..1)."""

    plane: str
    axis: int
    index: int
    uncertainty: float


SLICE_VIEWS = {"axial": "Red", "sagittal": "Yellow", "coronal": "Green"}
"""The slice view of Slicer's default layouts that shows each plane."""


def suggest_slices(uncertainty: np.ndarray, known: np.ndarray, *, axis: int, count: int = 3) -> list[tuple[int, float]]:
    """The ``count`` slices along ``axis`` where the model is least sure (mean normalised entropy of
    the slice), as ``(index, uncertainty)``, most uncertain first. Slices the user already
    annotated (most of their voxels known) are left out, and suggestions keep a few slices apart,
    so three suggestions are three different places to look.
    """
    other = tuple(a for a in range(uncertainty.ndim) if a != axis)
    per_slice = np.asarray(uncertainty, np.float64).mean(axis=other)
    annotated = np.asarray(known, bool).mean(axis=other) > 0.5
    gap = max(1, len(per_slice) // (4 * max(1, count)))
    chosen: list[tuple[int, float]] = []
    for index in np.argsort(-per_slice, kind="stable"):
        if annotated[index] or any(abs(int(index) - c) < gap for c, _u in chosen):
            continue
        chosen.append((int(index), float(per_slice[index])))
        if len(chosen) == count:
            break
    return chosen


def slice_center_ras(volume: slicer.vtkMRMLScalarVolumeNode, axis: int, index: int) -> tuple[float, float, float]:
    """RAS coordinates of the centre of slice ``index`` along array axis ``axis`` (KJI) of
    ``volume``: where a slice view jumps to show that slice."""
    dims = volume.GetImageData().GetDimensions()  # I, J, K
    ijk = [(d - 1) / 2.0 for d in dims]
    ijk[2 - axis] = float(index)
    ras = mrml_bridge.ijk_to_ras_of(volume) @ np.array([*ijk, 1.0])
    return float(ras[0]), float(ras[1]), float(ras[2])


def slice_index_at_ras(volume: slicer.vtkMRMLScalarVolumeNode, axis: int, ras: Sequence[float]) -> int | None:
    """The index of the slice along array axis ``axis`` (KJI) of ``volume`` through the RAS point
    ``ras`` (a slice view's centre), or None outside the volume: what the user is looking at."""
    ijk = np.linalg.inv(mrml_bridge.ijk_to_ras_of(volume)) @ np.array([*ras[:3], 1.0])
    index = int(round(float(ijk[2 - axis])))
    size = volume.GetImageData().GetDimensions()[2 - axis]
    return index if 0 <= index < size else None


def _planes_of(mask: np.ndarray, what: str) -> set[Plane]:
    try:
        return find_planes(mask)
    except ObliquePaintingError as err:
        raise ValueError(f"{what}: {err}") from None


def _axis_directions(volume: slicer.vtkMRMLScalarVolumeNode) -> list[int]:
    """For array axes K, J, I: the RAS axis (0 R, 1 A, 2 S) each runs closest to."""
    matrix = mrml_bridge.ijk_to_ras_of(volume)[:3, :3]
    return [int(np.argmax(np.abs(matrix[:, 2 - axis]))) for axis in range(3)]


def _anatomical_plane(volume: slicer.vtkMRMLScalarVolumeNode, axis: int) -> str:
    """The anatomical plane (``axial``, ``coronal``, ``sagittal``) of the slices along array axis
    ``axis``: the plane normal to the RAS axis that the volume axis runs closest to, as the
    engine's canonical orientation (SimpleITK's DICOMOrient) assigns it."""
    return ("sagittal", "coronal", "axial")[_axis_directions(volume)[axis]]


def _array_axis(volume: slicer.vtkMRMLScalarVolumeNode, plane: str) -> int:
    """The array axis (KJI) whose slices lie in ``plane``."""
    return _axis_directions(volume).index(("sagittal", "coronal", "axial").index(plane))


def display_window(volume: slicer.vtkMRMLScalarVolumeNode) -> list[float] | None:
    """The intensity window the volume is displayed with, as [low, high], if it has one."""
    display = volume.GetDisplayNode()
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        return None
    width, level = display.GetWindow(), display.GetLevel()
    if not width > 0:
        return None
    return [float(level - width / 2), float(level + width / 2)]


def package_segments(package: str | Path) -> list[mrml_bridge.SegmentSpec]:
    """(value, name, colour) of the labels of a model package, read from its manifest."""
    path = Path(package) / PACKAGE_MANIFEST
    if not path.is_file():
        raise ValueError(f"'{package}' is not a MedTL model package (it has no {PACKAGE_MANIFEST}).")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    segments = [
        (int(e["value"]), str(e["name"]), tuple(float(c) for c in e["color"]))
        for e in manifest.get("labels", [])
        if int(e["value"]) != 0
    ]
    if not segments:
        raise ValueError(f"The model package '{package}' lists no labels.")
    return segments


def learning_config(
    *,
    window: list[float] | None,
    label_names: list[str],
    csv: Path,
    output_dir: Path,
    image_shape: tuple[int, ...],
    options: LearningOptions,
    initial_weights: str,
    slice_plane: str = "axial",
) -> dict[str, Any]:
    """Run configuration (``medtl.config.RunConfig`` as JSON) for one round of learning from
    slices of ``slice_plane``."""
    # FlexibleUNet halves the size five times: a multiple of 32, at most 256 to keep steps fast;
    # the engine pads smaller images. The patch is square: the smaller side of the volume bounds it.
    patch = int(min(256, max(32, (sorted(image_shape)[1] // 32) * 32)))
    if initial_weights == "none":
        # From random weights there are no features to extract: train all layers from the start.
        strategy: dict[str, Any] = {"name": "full_finetune", "encoder_lr_factor": 1.0}
    elif initial_weights == "imagenet":
        strategy = {
            "name": "feature_extraction_then_finetune",
            "feature_extraction_epochs": max(1, options.epochs // 3),
        }
    else:
        # The last round's model already fits this structure: fine-tune all of it, gently.
        strategy = {"name": "full_finetune", "encoder_lr_factor": 0.1}
    return {
        "task": "segmentation_2d",
        # The label file marks what the user said nothing about as unknown (255); erased is background.
        "data": {"csv": str(csv), "label_names": label_names, "val_fraction": 0.0, "labelled_slices": False},
        # What the user sees (and painted on) is the display window, so that is the intensity range.
        "preprocessing": {
            "preset": "none" if window else "mri",
            "window": window,
            "patch_size": [patch, patch],
            "slice_axis": slice_plane,
        },
        "model": {"name": options.network, "pretrained": initial_weights},
        "strategy": strategy,
        "train": {
            "epochs": int(options.epochs),
            "steps_per_epoch": int(options.steps_per_epoch),
            "batch_size": int(options.batch_size),
            "device": options.device,
        },
        "output_dir": str(output_dir),
    }


def _show_as_fraction(volume: slicer.vtkMRMLScalarVolumeNode) -> None:
    """A 0..1 map shown with a fixed 0..1 window and a heat colour map, ready as an overlay."""
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    scene = volume.GetScene()
    for color_id in ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLPETProceduralColorNodePET-Heat"):
        if scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
