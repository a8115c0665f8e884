"""Typed run configuration with a JSON round trip and validation that names the bad field.

Example:
    >>> cfg = RunConfig.from_dict({"model": {"name": "unet_mobilenet_v2"}, "train": {"epochs": 3}})
    >>> cfg.train.epochs
    3
    >>> RunConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medtl.config_json import build_dataclass, choices, field_error
from medtl.config_model_checks import check_model
from medtl.data.partial_labels import MAX_CLASSES, UNKNOWN
from medtl.errors import ConfigError

Task = Literal["segmentation_2d", "segmentation_3d", "classification_2d", "classification_3d"]
Strategy = Literal[
    "feature_extraction", "full_finetune", "feature_extraction_then_finetune", "gradual_unfreezing", "discriminative_lr"
]
Preset = Literal["ct_abdomen", "ct_liver", "ct_lung", "ct_bone", "ct_brain", "mri", "mri_zscore", "xray", "none"]
Augmentation = Literal["none", "light", "standard", "strong"]
Loss = Literal["dice_ce", "dice", "ce", "ce_weighted", "dice_ce_weighted", "focal", "dice_focal", "bce"]
SEGMENTATION_LOSSES = ("dice_ce", "dice", "ce", "ce_weighted", "dice_ce_weighted", "focal", "dice_focal")
CLASSIFICATION_LOSSES = ("ce", "ce_weighted", "focal", "bce")
Device = Literal["auto", "cpu", "cuda", "mps"]
SlicePlane = Literal["axial", "coronal", "sagittal"]
Orientation = Literal["canonical", "as_stored"]
AdaptationMethod = Literal["none", "adabn", "dsbn", "dann"]
NanPolicy = Literal["error", "zero"]


@dataclass
class DataConfig:
    """Where the cases are and what their labels mean.

    Attributes:
        csv: dataset CSV (``image``, ``label`` and free columns); relative paths are resolved
            against the CSV's folder.
        label_names: segmentation: names of label values 1..N (0 is background); classification:
            the class names, which the CSV's ``label`` column holds (several joined by ``|`` when
            ``multi_label``).
        val_fraction: share of the cases held out for validation (whole cases, 2D and 3D alike).
        labelled_slices: for label files that cannot say "unknown": a slice (along
            ``preprocessing.slice_axis``) without any nonzero label counts as unknown, not as
            background. Off (the default), only voxels holding the reserved value 255 are unknown
            (:mod:`medtl.data.partial_labels`), and every other voxel trains, organ-free slices
            included.
        resample_labels: a label whose grid (spacing, origin, direction) differs from its image's
            is resampled onto the image (nearest neighbour; unknown outside the label's extent)
            instead of being an error.
        group_column: a CSV column (``site``, ``patient`` ...) whose values never sit on both
            sides of the validation split; empty to split case by case.
        cache_dir: a folder for preprocessed arrays, keyed by the files' content and the
            preprocessing: later runs on the same cases (cross-validation folds, resumed runs, a
            new round) skip reading and resampling them, and 3D volumes are memory-mapped, so
            data sets larger than memory train too. Empty: preprocess in memory every run.
    """

    csv: str = ""
    label_names: list[str] = field(default_factory=lambda: ["foreground"])
    val_fraction: float = 0.0
    labelled_slices: bool = False
    resample_labels: bool = False
    group_column: str = ""
    multi_label: bool = False
    cache_dir: str = ""


@dataclass
class PreprocessConfig:
    """How images become network input.

    Attributes:
        preset: intensity preset (see :mod:`medtl.data.presets`); ``window`` overrides a CT window.
        patch_size: the training patch (2 numbers for 2D, 3 for 3D); classifiers resize the whole
            image to it.
        equalize: histogram equalisation after the preset (MRI, X-ray with poor contrast).
        spacing: resample to this (z, y, x) spacing in mm before anything else; predictions are
            resampled back to the input's grid. 2D tasks keep each image's z spacing (in-plane only).
        context_slices: 2.5D: 1 feeds each slice with its two neighbours as the three input
            channels of a 2D ImageNet encoder; 0 is plain 2D.
        orientation: ``canonical`` reorients every image (axes permuted and flipped, never
            resampled; :mod:`medtl.data.geometry`) so that array axes are always axial, coronal,
            sagittal; ``as_stored`` keeps each file's axis order (packages from MedTL before 0.2).
        slice_axis: 2D tasks: the plane of the slices the network trains on and predicts
            (the plane the user painted in); spacing is kept across it.
        nan_policy: what a NaN or infinite voxel in an image is: ``"error"`` (the default: the
            file and CSV row are named and nothing is computed) or ``"zero"`` (such voxels read
            as 0, in training and in prediction).
    """

    preset: Preset = "ct_abdomen"
    window: list[float] | None = None
    patch_size: list[int] = field(default_factory=lambda: [128, 128])
    equalize: bool = False
    spacing: list[float] | None = None
    context_slices: int = 0
    orientation: Orientation = "canonical"
    slice_axis: SlicePlane = "axial"
    nan_policy: NanPolicy = "error"


@dataclass
class ModelConfig:
    """Network from the registry and where its pretrained weights come from.

    ``pretrained`` is ``"imagenet"`` (torchvision's enum, from the hub cache), ``"none"``, or the
    path of a local weight file (state dict or checkpoint; keys are matched and reported); in a
    config file a relative path is relative to that file.
    """

    name: str = "unet_mobilenet_v2"
    pretrained: str = "imagenet"


@dataclass
class StrategyConfig:
    """How the pretrained part is trained (see :mod:`medtl.strategies`).

    Attributes:
        feature_extraction_epochs: ``feature_extraction_then_finetune``: epochs with a frozen encoder.
        encoder_lr_factor: the encoder's learning rate relative to the head's, once it trains.
        unfreeze_every: ``gradual_unfreezing``: epochs between unfreezing the next stage down.
        unfreeze_on_plateau: ``gradual_unfreezing``: unfreeze the next stage when the validation
            score stalls for ``plateau_patience`` epochs instead of on a fixed schedule.
        lr_decay: ``discriminative_lr``: each stage's learning rate relative to the stage above it.
    """

    name: Strategy = "feature_extraction_then_finetune"
    feature_extraction_epochs: int = 5
    encoder_lr_factor: float = 0.1
    unfreeze_every: int = 2
    unfreeze_on_plateau: bool = False
    plateau_patience: int = 1
    lr_decay: float = 0.5


@dataclass
class AdaptationConfig:
    """Domain adaptation (see :mod:`medtl.adaptation`).

    Attributes:
        method: ``adabn``: after training, BatchNorm statistics re-estimated on ``target_csv``'s
            images; ``dsbn``: one BatchNorm per value of ``domain_column`` in the training CSV;
            ``dann``: adversarial training with ``target_csv``'s unlabelled images.
        domain_column: ``dsbn``: the CSV column naming each case's domain (site, scanner).
        target_csv: ``adabn``, ``dann``: a CSV of unlabelled target-domain images (``image`` column;
            a ``label`` column is ignored). Relative to the config file, like ``data.csv``.
        dann_weight: ``dann``: the largest weight of the reversed domain gradient (reached by the ramp).
        dann_gamma: ``dann``: steepness of the ramp ``2 / (1 + exp(-γ·progress)) − 1``.
    """

    method: AdaptationMethod = "none"
    domain_column: str = "site"
    target_csv: str = ""
    dann_weight: float = 1.0
    dann_gamma: float = 10.0


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (per step)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 10


@dataclass
class TrainConfig:
    """Schedule and device.

    ``early_stopping_patience`` stops after that many epochs without a better validation score
    (0: never); ``keep_best`` puts the best-scoring epoch's weights, not the last, into the package.
    Both need a validation split. ``class_ratios`` (segmentation): the relative chance of a
    training patch being centred on a voxel of each label value 0..N, background first (MONAI's
    ``RandCropByLabelClassesd``; unknown voxels are never a centre); null: one third of the
    patches on the structures, shared equally (nnU-Net's forced foreground), two thirds on
    background. ``batch_size`` is the global batch: under ``torchrun`` each of N
    processes trains on ``batch_size / N`` samples of every step.
    """

    epochs: int = 20
    steps_per_epoch: int = 20
    batch_size: int = 8
    seed: int = 0
    device: Device = "auto"
    amp: bool = True
    early_stopping_patience: int = 0
    keep_best: bool = True
    class_ratios: list[float] | None = None
    # DataLoader worker processes for augmentation; null: 0 on the CPU (the workers would take the
    # cores the network computes on), up to 4 per GPU process on CUDA.
    num_workers: int | None = None
    # Under torchrun on GPUs: BatchNorm statistics over the global batch, not each GPU's share.
    sync_batchnorm: bool = True
    # torch.compile the network for training (PyTorch 2's graph compiler), for long GPU runs: it
    # costs a compilation at the start and at every unfreezing step. On this build's CPU it did not
    # pay (a 3D U-Net: 230 s to compile, then 8 % slower), and it fails on the FlexibleUNets; a
    # network it cannot run trains uncompiled, with a warning.
    compile: bool = False


@dataclass
class CardConfig:
    """What the model card says beyond what MedTL measures.

    Attributes:
        intended_use: who should use the model on what images for what; empty for MedTL's
            default sentence (research use, the task, the labels, the preset).
        limitations: known limitations in the author's words, listed before the ones MedTL finds
            (small groups, training cases among the evaluated ones ...).
        include_identifiers: put file names and identifier-like CSV columns into reports and model
            cards. Off: cases are CSV rows and hashes.
    """

    intended_use: str = ""
    limitations: list[str] = field(default_factory=list)
    include_identifiers: bool = False


@dataclass
class RunConfig:
    """Everything a run needs. ``output_dir`` receives checkpoints, events, metrics and the package.

    Paths in a config file (``data.csv``, ``data.cache_dir``, ``adaptation.target_csv``,
    ``output_dir`` and ``model.pretrained`` when it is a file) are relative to the config file's
    folder, so a config moves with its data; ``medtl train --output-dir`` is relative to the
    current folder, as command-line paths are.
    """

    task: Task = "segmentation_2d"
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    card: CardConfig = field(default_factory=CardConfig)
    augmentation: Augmentation = "light"
    loss: Loss = "dice_ce"
    output_dir: str = "runs/latest"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        cfg = build_dataclass(cls, data)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            # utf-8-sig: editors on Windows put a byte-order mark before the JSON.
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a config file") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        cfg = cls.from_dict(data)
        # Paths in a config file are relative to that file, so configs can be moved with their data.
        folder = path.parent

        def resolved(value: str) -> str:
            return str((folder / value).resolve()) if value and not Path(value).is_absolute() else value

        cfg.data.csv = resolved(cfg.data.csv)
        cfg.data.cache_dir = resolved(cfg.data.cache_dir)
        cfg.adaptation.target_csv = resolved(cfg.adaptation.target_csv)
        cfg.output_dir = resolved(cfg.output_dir)
        if cfg.model.pretrained not in ("imagenet", "none"):
            cfg.model.pretrained = resolved(cfg.model.pretrained)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from medtl.data.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def spatial_dims(self) -> int:
        return 2 if self.task.endswith("_2d") else 3

    @property
    def is_classification(self) -> bool:
        return self.task.startswith("classification")

    @property
    def num_classes(self) -> int:
        """Network outputs: background + labels for segmentation, the classes for a classifier."""
        return len(self.data.label_names) + (0 if self.is_classification else 1)

    @property
    def in_channels(self) -> int:
        return 3 if self.preprocessing.context_slices else 1

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the first bad field; the checks go section by section."""
        for check in (
            _check_preprocessing,
            _check_labels,
            _check_schedule,
            _check_strategy,
            _check_training_options,
            _check_loss,
            _check_adaptation,
            check_model,
        ):
            check(self)


def _check_preprocessing(cfg: RunConfig) -> None:
    pre = cfg.preprocessing
    if len(pre.patch_size) != cfg.spatial_dims:
        needs = f"needs {cfg.spatial_dims} numbers for task {cfg.task}, got {pre.patch_size}"
        raise field_error("preprocessing.patch_size", needs)
    if any(s < 16 for s in pre.patch_size):
        raise field_error("preprocessing.patch_size", "each size must be at least 16")
    if pre.window is not None and (len(pre.window) != 2 or pre.window[0] >= pre.window[1]):
        raise field_error("preprocessing.window", "must be [low, high] with low < high")


def _check_labels(cfg: RunConfig) -> None:
    """The label names, and the class ratios that need one number per label."""
    if not cfg.data.label_names:
        raise field_error("data.label_names", "needs at least one label name")
    if not cfg.is_classification and len(cfg.data.label_names) > MAX_CLASSES:
        raise field_error(
            "data.label_names",
            f"at most {MAX_CLASSES} structures: label value {UNKNOWN} is reserved for unknown voxels",
        )
    ratios = cfg.train.class_ratios
    if ratios is not None and (
        cfg.is_classification or len(ratios) != cfg.num_classes or min(ratios) < 0 or sum(ratios) <= 0
    ):
        raise field_error(
            "train.class_ratios",
            f"needs {cfg.num_classes} non-negative numbers (background, then each label), not all zero, "
            "for a segmentation task",
        )
    seen: set[str] = set()
    for name in cfg.data.label_names:
        if not name.strip():
            raise field_error("data.label_names", "a label name is empty")
        if name in seen:
            raise field_error("data.label_names", f"'{name}' appears twice; each label value needs its own name")
        seen.add(name)


def _check_schedule(cfg: RunConfig) -> None:
    """The split, the epochs and the optimiser."""
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise field_error("data.val_fraction", "must be in [0, 1)")
    for name, value in (
        ("train.epochs", cfg.train.epochs),
        ("train.steps_per_epoch", cfg.train.steps_per_epoch),
        ("train.batch_size", cfg.train.batch_size),
    ):
        if value < 1:
            raise field_error(name, f"must be at least 1, got {value}")
    if cfg.optim.lr <= 0:
        raise field_error("optim.lr", "must be positive")


def _check_strategy(cfg: RunConfig) -> None:
    strategy = cfg.strategy
    if not 0 < strategy.encoder_lr_factor <= 1:
        raise field_error("strategy.encoder_lr_factor", "must be in (0, 1]")
    if strategy.feature_extraction_epochs < 0:
        raise field_error("strategy.feature_extraction_epochs", "must not be negative")
    if strategy.unfreeze_every < 1:
        raise field_error("strategy.unfreeze_every", "must be at least 1")
    if strategy.plateau_patience < 1:
        raise field_error("strategy.plateau_patience", "must be at least 1")
    if not 0 < strategy.lr_decay <= 1:
        raise field_error("strategy.lr_decay", "must be in (0, 1]")


def _check_training_options(cfg: RunConfig) -> None:
    """Workers, early stopping, resampling and 2.5D context."""
    if cfg.train.num_workers is not None and cfg.train.num_workers < 0:
        raise field_error("train.num_workers", "must not be negative (null: automatic)")
    if cfg.train.early_stopping_patience < 0:
        raise field_error("train.early_stopping_patience", "must not be negative (0 turns early stopping off)")
    spacing = cfg.preprocessing.spacing
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise field_error("preprocessing.spacing", "must be three positive numbers (z, y, x) in mm, or null")
    if cfg.preprocessing.context_slices not in (0, 1):
        raise field_error("preprocessing.context_slices", "must be 0 (2D) or 1 (2.5D: a slice and its two neighbours)")


def _check_loss(cfg: RunConfig) -> None:
    """The loss against the task, and multi-label classification's needs."""
    losses = CLASSIFICATION_LOSSES if cfg.is_classification else SEGMENTATION_LOSSES
    if cfg.loss not in losses:
        raise field_error("loss", f"'{cfg.loss}' does not apply to {cfg.task}; use one of {choices(losses)}")
    if cfg.is_classification and not cfg.data.multi_label and len(cfg.data.label_names) < 2:
        raise field_error("data.label_names", "a classifier needs at least two classes (or data.multi_label)")
    if cfg.data.multi_label and not cfg.is_classification:
        raise field_error("data.multi_label", "applies to classification tasks only")
    if cfg.loss == "bce" and not cfg.data.multi_label:
        raise field_error("loss", "'bce' is for multi-label classification (data.multi_label); 'ce' for one class")
    if cfg.data.multi_label and cfg.loss not in ("bce", "focal"):
        raise field_error("loss", "multi-label classification needs independent sigmoid outputs: 'bce' or 'focal'")


def _check_adaptation(cfg: RunConfig) -> None:
    adaptation = cfg.adaptation
    if adaptation.method in ("adabn", "dann") and not adaptation.target_csv:
        raise field_error(
            "adaptation.target_csv", f"'{adaptation.method}' needs a CSV of unlabelled target-domain images"
        )
    if adaptation.method == "dsbn":
        if not adaptation.domain_column:
            raise field_error("adaptation.domain_column", "'dsbn' needs the CSV column that names each case's domain")
        if adaptation.domain_column == cfg.data.group_column:
            raise field_error(
                "adaptation.domain_column",
                "holding out whole domains for validation (data.group_column) would leave their BatchNorm "
                "untrained; group the split by another column (e.g. patient)",
            )
    if adaptation.dann_weight < 0 or adaptation.dann_gamma <= 0:
        raise field_error("adaptation.dann_weight", "dann_weight must not be negative and dann_gamma must be positive")
