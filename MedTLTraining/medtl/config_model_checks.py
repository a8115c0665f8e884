"""The checks of a run configuration against its network's registry entry (task, input size,
encoder, BatchNorm, ImageNet weights), apart from :mod:`medtl.config` so that reading a config
imports no network code until it is validated."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from medtl.config_json import choices, field_error

if TYPE_CHECKING:
    from medtl.config import RunConfig
    from medtl.models.spec import ModelSpec


def check_model(cfg: RunConfig) -> None:
    """The network against the task, and what the rest of the config asks of it."""
    # Imported here: the registry imports torch and MONAI, which reading a config does not need.
    from medtl.models.registry import MODELS

    if cfg.model.name not in MODELS:
        close = difflib.get_close_matches(cfg.model.name, list(MODELS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise field_error("model.name", f"'{cfg.model.name}' is unknown{hint}; one of {choices(sorted(MODELS))}")
    spec = MODELS[cfg.model.name]
    if spec.spatial_dims != cfg.spatial_dims or spec.task != cfg.task.rsplit("_", 1)[0]:
        raise field_error(
            "model.name",
            f"'{cfg.model.name}' is a {spec.spatial_dims}D {spec.task} network but task is {cfg.task}",
        )
    _check_model_input(cfg, spec)
    _check_model_training(cfg, spec)


def _check_model_input(cfg: RunConfig, spec: ModelSpec) -> None:
    """The input the network takes: 2.5D channels and the patch size."""
    patch_size = cfg.preprocessing.patch_size
    if cfg.preprocessing.context_slices and (cfg.task != "segmentation_2d" or not spec.adapter):
        raise field_error(
            "preprocessing.context_slices", "2.5D input needs a 2D segmentation network on an ImageNet encoder"
        )
    if any(size % spec.divisor for size in patch_size):
        raise field_error(
            "preprocessing.patch_size",
            f"{patch_size}: each size must be a multiple of {spec.divisor} for {cfg.model.name}",
        )
    if spec.exact_size is not None and any(s != spec.exact_size for s in patch_size):
        raise field_error("preprocessing.patch_size", f"{cfg.model.name} takes {spec.exact_size} pixels a side only")
    if any(size < spec.min_size for size in patch_size):
        raise field_error("preprocessing.patch_size", f"{cfg.model.name} needs at least {spec.min_size} pixels a side")


def _check_model_training(cfg: RunConfig, spec: ModelSpec) -> None:
    """The strategy, the adaptation and the pretrained weights against the network's parts."""
    method = cfg.adaptation.method
    if not spec.has_encoder and cfg.strategy.name != "full_finetune":
        raise field_error(
            "strategy.name", f"'{cfg.model.name}' has no separate pretrained encoder; only 'full_finetune' applies"
        )
    if method == "dann" and not spec.has_encoder:
        raise field_error(
            "adaptation.method", f"'dann' reads the encoder's features; '{cfg.model.name}' has no encoder"
        )
    if method == "dann" and cfg.strategy.name == "feature_extraction":
        raise field_error(
            "adaptation.method",
            "'dann' changes the encoder, which 'feature_extraction' keeps frozen: choose another strategy",
        )
    if method in ("adabn", "dsbn") and not spec.batchnorm:
        raise field_error(
            "adaptation.method", f"'{method}' works on BatchNorm layers; '{cfg.model.name}' has none (use 'dann')"
        )
    if cfg.model.pretrained == "imagenet" and not spec.imagenet:
        raise field_error(
            "model.pretrained", f"'{cfg.model.name}' has no ImageNet weights; use 'none' or a local weight file"
        )
