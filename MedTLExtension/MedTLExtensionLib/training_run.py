"""The MedTL Training panel without its widgets: data sets from the scene or a folder, the run
configuration, the engine run with cancel and resume, and live curves and metrics as MRML tables.

Needs MRML, not Qt, so it is tested headless on ``slicer-core``.

Example:
    >>> pairs = scene_training_pairs(scene)  # every segmentation with its reference volume
    >>> csv, names = export_scene_dataset(scene, segmentations_logic, [(v, s, "site A") for v, s in pairs], folder)
    >>> run = TrainingRun(scene)
    >>> run.start(training_config(csv=csv, output_dir=folder / "run", label_names=names, epochs=5))
    >>> while run.is_running: run.poll(); time.sleep(0.5)   # a timer in the GUI
    >>> run.curves.table  # epoch, loss and validation Dice per structure, plotted by run.curves.chart
"""

from __future__ import annotations

import csv as csv_module
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import slicer
from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkStringArray

from MedTLExtensionLib import mrml_bridge, volume_files
from MedTLExtensionLib.engine_process import EngineJob, EngineRun, start_engine

__all__ = [
    "AUGMENTATIONS",
    "DEVICES",
    "LOSSES",
    "NETWORKS_2D",
    "NETWORKS_3D",
    "PRESETS",
    "STRATEGIES",
    "TrainingCurves",
    "TrainingRun",
    "can_resume",
    "dataset_csv_from_folder",
    "describe_dataset",
    "export_scene_dataset",
    "metrics_table",
    "scene_training_pairs",
    "training_config",
]

# The engine's registry and configuration choices (``medtl models``, ``medtl.config``). Listed here
# because importing the engine would import torch into Slicer's process; a test keeps them equal.
NETWORKS_2D = (
    "unet_mobilenet_v2",
    "unet_resnet18",
    "unet_resnet34",
    "unet_resnet50",
    "unet_resnet101",
    "unet_densenet121",
    "unet_efficientnet_b0",
)
NETWORKS_3D = (
    "unet3d_resnet10",
    "unet3d_resnet18",
    "unet3d_resnet34",
    "unet3d_resnet50",
    "swinunetr3d",
    "unet3d",
    "segresnet3d",
)
# Networks with no pretrained encoder: every layer learns from the start, whatever the strategy.
NO_ENCODER = ("unet3d", "segresnet3d")
STRATEGIES = (
    "feature_extraction_then_finetune",
    "feature_extraction",
    "full_finetune",
    "gradual_unfreezing",
    "discriminative_lr",
)
PRESETS = ("auto", "ct_abdomen", "ct_liver", "ct_lung", "ct_bone", "ct_brain", "mri", "mri_zscore", "xray", "none")
AUGMENTATIONS = ("light", "standard", "strong", "none")
LOSSES = ("dice_ce", "dice", "ce", "ce_weighted", "dice_ce_weighted", "focal", "dice_focal")
DEVICES = ("auto", "cpu", "cuda", "mps")

CONFIG_NAME = "config.json"
CHECKPOINT_NAME = "checkpoint.pt"
IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# How label files are told apart from images in a folder, e.g. case1.nii.gz + case1_label.nii.gz.
LABEL_MARKERS = ("_label", "_labels", "_seg", "_mask", ".seg")


def can_resume(run_dir: str | Path | None) -> bool:
    """True when the directory holds a started run (a config and a checkpoint)."""
    if run_dir is None or str(run_dir) in ("", "."):
        return False
    run_dir = Path(run_dir)
    return (run_dir / CONFIG_NAME).is_file() and (run_dir / CHECKPOINT_NAME).is_file()


# --------------------------------------------------------------------------- data sets


def scene_training_pairs(scene: slicer.vtkMRMLScene) -> list[tuple[Any, Any]]:
    """(volume, segmentation) for every segmentation in the scene that has a reference volume with
    at least one segment: the candidates the panel's table lists."""
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    pairs = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentation = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        volume = segmentation.GetNodeReference(role)
        if (
            volume is not None
            and volume.IsA("vtkMRMLScalarVolumeNode")
            and not volume.IsA("vtkMRMLLabelMapVolumeNode")
            and segmentation.GetSegmentation().GetNumberOfSegments() > 0
        ):
            pairs.append((volume, segmentation))
    return pairs


def export_scene_dataset(
    scene: slicer.vtkMRMLScene,
    segmentations_logic,
    cases: Sequence[tuple[Any, Any, str]],
    folder: str | Path,
) -> tuple[Path, list[str]]:
    """Writes (volume, segmentation, site) cases as a data set the engine reads.

    Structures are matched across cases by segment name: class i is the i-th name in order of
    first appearance, whatever label value or order a case uses. The site column is written when
    any case has a site.

    Returns:
        The CSV path and the label names (classes 1..N).
    """
    if not cases:
        raise ValueError("Choose at least one volume with its segmentation.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    rows = []
    for number, (volume, segmentation, site) in enumerate(cases, start=1):
        labels, segments = mrml_bridge.segmentation_to_labelmap(scene, segmentations_logic, segmentation, volume)
        if not labels.any():
            raise ValueError(f"Segmentation '{segmentation.GetName()}' has no voxels inside '{volume.GetName()}'.")
        lookup = np.zeros(max(v for v, _n, _c in segments) + 1, dtype=np.uint8)
        for value, name, _color in segments:
            if name not in names:
                names.append(name)
            lookup[value] = names.index(name) + 1
        stem = f"case{number:03d}"
        volume_files.write_volume(volume, folder / f"{stem}.nrrd")
        volume_files.write_array(lookup[labels], mrml_bridge.ijk_to_ras_of(volume), folder / f"{stem}_label.nrrd")
        rows.append(
            {"image": f"{stem}.nrrd", "label": f"{stem}_label.nrrd", "site": site or "", "name": volume.GetName()}
        )
    columns = ["image", "label"] + (["site"] if any(r["site"] for r in rows) else []) + ["name"]
    csv_path = folder / "dataset.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv_module.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, names


def dataset_csv_from_folder(folder: str | Path, csv_path: str | Path) -> Path:
    """Pairs the images of a folder with their label files and writes the data set CSV.

    Understood layouts: nnU-Net's ``imagesTr/`` + ``labelsTr/`` (``case_0000.nii.gz`` with
    ``case.nii.gz``), and one folder holding ``case.ext`` with ``case_label.ext`` (or ``_seg``,
    ``_mask``, ``.seg.nrrd``). Paths in the CSV are absolute.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"'{folder}' is not a folder.")

    def stem(path: Path) -> str:
        for suffix in IMAGE_SUFFIXES:
            if path.name.lower().endswith(suffix):
                return path.name[: -len(suffix)]
        return ""

    pairs: list[tuple[Path, Path]] = []
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        labels = {stem(p): p for p in (folder / "labelsTr").iterdir() if stem(p)}
        for image in sorted((folder / "imagesTr").iterdir()):
            case = re.sub(r"_0000$", "", stem(image))
            if case in labels:
                pairs.append((image, labels[case]))
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and stem(p))
        is_label = {
            p: any(stem(p).lower().endswith(m) or p.name.lower().endswith(".seg.nrrd") for m in LABEL_MARKERS)
            for p in files
        }
        labels = {}
        for p in files:
            if is_label[p]:
                base = stem(p)
                for marker in LABEL_MARKERS:
                    if base.lower().endswith(marker):
                        base = base[: -len(marker)]
                        break
                labels.setdefault(base, p)
        pairs = [(p, labels[stem(p)]) for p in files if not is_label[p] and stem(p) in labels]
    if not pairs:
        raise ValueError(
            f"No image/label pairs found in '{folder}': expected imagesTr/ and labelsTr/, or files such as"
            " case1.nii.gz with case1_label.nii.gz."
        )
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv_module.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows([str(image.resolve()), str(label.resolve())] for image, label in pairs)
    return csv_path


def describe_dataset(csv_path: str | Path) -> tuple[list[str], str]:
    """Label names and an intensity preset, read from the first case of a data set CSV.

    Names come from a ``.seg.nrrd`` header when the label is one, else "label 1".."label N" for
    the largest value N. CT (air at about -1000 HU) gets the abdominal window, anything else MRI
    normalisation. The engine checks every other case against these.
    """
    import SimpleITK as sitk  # bundled with Slicer; the engine's readers below need only it
    from medtl.data.dataset import load_cases
    from medtl.data.io import read_segment_names

    case = load_cases(csv_path)[0]
    names = read_segment_names(case.label)
    statistics = sitk.MinimumMaximumImageFilter()
    if not names:
        statistics.Execute(sitk.ReadImage(str(case.label)))
        names = {value: f"label {value}" for value in range(1, max(1, int(statistics.GetMaximum())) + 1)}
    label_names = [names.get(value, f"label {value}") for value in range(1, max(names) + 1)]
    statistics.Execute(sitk.ReadImage(str(case.image)))
    return label_names, "ct_abdomen" if statistics.GetMinimum() <= -500.0 else "mri"


# --------------------------------------------------------------------------- configuration


def training_config(
    *,
    csv: str | Path,
    output_dir: str | Path,
    label_names: list[str] | None = None,
    network: str = "unet_mobilenet_v2",
    pretrained: str = "imagenet",
    weights_file: str | Path | None = None,
    strategy: str = "feature_extraction_then_finetune",
    preset: str = "auto",
    augmentation: str = "light",
    loss: str = "dice_ce",
    epochs: int = 30,
    learning_rate: float = 1e-3,
    device: str = "auto",
    val_fraction: float = 0.2,
    group_column: str = "",
    early_stopping_patience: int = 0,
    domain_specific_batchnorm: bool = False,
) -> dict[str, Any]:
    """The run configuration (``medtl.config.RunConfig`` as JSON) for the panel's choices.

    ``pretrained`` is ``imagenet``, ``none`` or ``file`` (then ``weights_file`` names a state dict,
    checkpoint or model package). Label names and the ``auto`` preset are read from the data set.
    Gradual unfreezing releases one encoder stage every sixth of the epochs; with a validation
    share, the package keeps the best epoch's weights and ``early_stopping_patience`` epochs
    without a better score end the run (0: never). ``domain_specific_batchnorm`` gives every
    BatchNorm layer one copy per value of the data set's ``site`` column (DSBN).
    """
    for value, allowed, what in (
        (network, NETWORKS_2D + NETWORKS_3D, "network"),
        (strategy, STRATEGIES, "strategy"),
        (preset, PRESETS, "intensity preset"),
        (augmentation, AUGMENTATIONS, "augmentation"),
        (loss, LOSSES, "loss"),
        (device, DEVICES, "device"),
        (pretrained, ("imagenet", "none", "file"), "pretrained weights"),
    ):
        if value not in allowed:
            raise ValueError(f"Unknown {what} '{value}'; choose one of {', '.join(allowed)}.")
    csv = Path(csv)
    if not csv.is_file():
        raise ValueError(f"The data set CSV '{csv}' does not exist.")
    if str(output_dir) in ("", "."):
        raise ValueError("Choose a run directory.")
    is_3d = network in NETWORKS_3D
    if pretrained == "imagenet" and is_3d:
        raise ValueError(f"'{network}' is a 3D network: ImageNet weights are 2D. Choose 'none' or a weight file.")
    if pretrained == "file":
        if weights_file is None or not Path(weights_file).exists():
            raise ValueError(f"The weight file '{weights_file}' does not exist.")
        initial = str(Path(weights_file).resolve())
    else:
        initial = pretrained
    if label_names is None or preset == "auto":
        found_names, found_preset = describe_dataset(csv)
        label_names = label_names or found_names
        preset = found_preset if preset == "auto" else preset
    strategy_config: dict[str, Any] = {"name": strategy}
    if initial == "none" or network in NO_ENCODER:
        # Nothing pretrained to freeze: every layer learns from the start.
        strategy_config = {"name": "full_finetune", "encoder_lr_factor": 1.0}
    elif strategy == "feature_extraction_then_finetune":
        strategy_config["feature_extraction_epochs"] = max(1, int(epochs) // 3)
    elif strategy == "gradual_unfreezing":
        strategy_config["unfreeze_every"] = max(1, int(epochs) // 6)
    if early_stopping_patience < 0:
        raise ValueError("Early stopping patience cannot be negative (0 turns it off).")
    if domain_specific_batchnorm and group_column == "site":
        raise ValueError(
            "One BatchNorm per site cannot hold whole sites out for validation (their BatchNorm would never "
            "train): group the validation split by another column, or leave it empty."
        )
    return {
        "task": "segmentation_3d" if is_3d else "segmentation_2d",
        "data": {
            "csv": str(csv.resolve()),
            "label_names": list(label_names),
            "val_fraction": float(val_fraction),
            "group_column": group_column,
        },
        "preprocessing": {"preset": preset, "patch_size": [96, 96, 96] if is_3d else [128, 128]},
        "model": {"name": network, "pretrained": initial},
        "strategy": strategy_config,
        "optim": {"lr": float(learning_rate)},
        "train": {
            "epochs": int(epochs),
            "device": device,
            "early_stopping_patience": int(early_stopping_patience) if val_fraction > 0 else 0,
        },
        "adaptation": {"method": "dsbn", "domain_column": "site"} if domain_specific_batchnorm else {},
        "augmentation": augmentation,
        "loss": loss,
        "output_dir": str(Path(output_dir).resolve()),
    }


# --------------------------------------------------------------------------- curves and metrics


class TrainingCurves:
    """Loss and validation Dice per epoch in a table node, drawn by a plot chart node.

    Rows are added from the engine's ``epoch`` events; a resumed run continues the same table.
    """

    def __init__(self, scene: slicer.vtkMRMLScene, name: str = "MedTL training") -> None:
        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} curves")
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle("Training loss and validation Dice")
        self.chart.SetXAxisTitle("epoch")
        self.chart.SetYAxisTitle("loss / Dice")
        self._columns: list[str] = []
        for column in ("epoch", "loss"):
            self._add_column(column)
        self._add_series("loss")

    def add(self, event: dict[str, Any]) -> None:
        """Adds one ``epoch`` event as a row (other events are ignored)."""
        if event.get("event") != "epoch":
            return
        values = {"epoch": float(event["epoch"]), "loss": float(event.get("loss", np.nan))}
        for name, dice in (event.get("val_dice") or {}).items():
            column = f"val Dice {name}"
            if column not in self._columns:
                self._add_column(column)
                self._add_series(column)
            values[column] = float(dice) if dice is not None else np.nan
        table = self.table.GetTable()
        row = table.InsertNextBlankRow(np.nan)
        for column, value in values.items():
            table.SetValueByName(row, column, value)
        table.Modified()
        self.table.Modified()

    def values(self, column: str) -> list[float]:
        array = self.table.GetTable().GetColumnByName(column)
        return [array.GetValue(i) for i in range(array.GetNumberOfTuples())] if array is not None else []

    def _add_column(self, name: str) -> None:
        array = vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfTuples(self.table.GetTable().GetNumberOfRows())
        array.Fill(np.nan)
        self.table.AddColumn(array)
        self._columns.append(name)

    def _add_series(self, column: str) -> None:
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", column)
        series.SetAndObserveTableNodeID(self.table.GetID())
        series.SetXColumnName("epoch")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        self.chart.AddAndObservePlotSeriesNodeID(series.GetID())


def metrics_table(scene: slicer.vtkMRMLScene, metrics: dict[str, Any], name: str = "MedTL metrics"):
    """A table node of a finished run's metrics: one row per quantity (Dice per structure first)."""
    rows = [(f"validation Dice: {label}", f"{value:.4f}") for label, value in (metrics.get("val_dice") or {}).items()]
    for key in ("train_cases", "val_cases", "best_epoch", "epochs_trained", "stopped_early", "final_loss", "seconds"):
        if metrics.get(key) is not None:
            value = metrics[key]
            rows.append((key.replace("_", " "), f"{value:.4f}" if isinstance(value, float) else str(value)))
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    for column, index in (("metric", 0), ("value", 1)):
        array = vtkStringArray()
        array.SetName(column)
        for row in rows:
            array.InsertNextValue(row[index])
        node.AddColumn(array)
    return node


# --------------------------------------------------------------------------- the run


class TrainingRun:
    """``medtl train`` in a separate process, with curves, cancel and resume.

    Args:
        scene: where the curves and metrics tables go.
        engine_factory: starts ``medtl <args>``.
    """

    def __init__(
        self, scene: slicer.vtkMRMLScene, engine_factory: Callable[[Sequence[str]], EngineRun] = start_engine
    ) -> None:
        self.scene = scene
        self.engine_factory = engine_factory
        self._job: EngineJob | None = None
        self.run_dir: Path | None = None
        self.curves: TrainingCurves | None = None
        self.result: dict[str, Any] | None = None
        self.plan: dict[str, Any] | None = None  # the last estimate (a ``plan`` event)
        self.last_log = ""

    @property
    def is_running(self) -> bool:
        return self._job is not None

    def start(self, config: dict[str, Any]) -> Path:
        """Writes ``config.json`` into the config's run directory (atomically) and starts training."""
        self._check_idle()
        run_dir = Path(config["output_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / CONFIG_NAME
        with tempfile.NamedTemporaryFile("w", dir=run_dir, suffix=".tmp", delete=False, encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        os.replace(f.name, config_path)
        self._launch(["train", str(config_path), "--events", "-"], run_dir, new_curves=True)
        return config_path

    def estimate(self, config: dict[str, Any]) -> None:
        """Starts ``medtl plan`` on ``config``: a few timed steps and the memory estimate; nothing is
        trained and nothing written to the run directory (the configuration goes to a temporary
        folder). Its ``plan`` event (``message``: "about 6 min on the CPU
        (...)") arrives through :meth:`poll`, and stays in :attr:`plan`."""
        self._check_idle()
        folder = Path(tempfile.mkdtemp(prefix="medtl-plan-"))
        config_path = folder / CONFIG_NAME
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        self.plan = None
        self._job = EngineJob(self.engine_factory(["plan", str(config_path), "--events", "-"]), "The estimate")

    def resume(self, run_dir: str | Path, device: str | None = None) -> None:
        """Continues the run in ``run_dir`` from its last checkpoint."""
        self._check_idle()
        if not can_resume(run_dir):
            raise ValueError(f"'{run_dir}' holds no run to resume (it needs {CONFIG_NAME} and {CHECKPOINT_NAME}).")
        run_dir = Path(run_dir)
        args = ["train", str(run_dir / CONFIG_NAME), "--resume", "--events", "-"]
        if device:
            args += ["--device", device]
        self._launch(args, run_dir, new_curves=self.curves is None or self.run_dir != run_dir)

    def cancel(self) -> None:
        """Stops training; the last checkpoint stays, so :meth:`resume` continues from it."""
        if self._job is not None:
            self._job.cancel()

    def poll(self) -> list[dict[str, Any]]:
        """New engine events (the curves grow with them), and ``cancelled`` after a cancel.

        Raises ``RuntimeError`` with the engine's message when training fails.
        """
        job = self._job
        if job is None:
            return []
        try:
            events = job.poll()
        finally:
            if job.finished:
                self._job, self.last_log = None, job.log
        for event in events:
            if event.get("event") == "plan":
                self.plan = event
            elif self.curves is not None:
                self.curves.add(event)
        if not job.finished:
            return events
        if job.cancelled:
            return [*events, {"event": "cancelled"}]
        self.result = job.done
        return events

    def _check_idle(self) -> None:
        if self._job is not None:
            raise RuntimeError("Training is already running; cancel it or wait for it to finish.")

    def _launch(self, args: list[str], run_dir: Path, *, new_curves: bool) -> None:
        job = EngineJob(self.engine_factory(args), "Training")
        self._job, self.run_dir, self.result = job, run_dir, None
        if new_curves:
            self.curves = TrainingCurves(self.scene, f"MedTL {run_dir.name}")
