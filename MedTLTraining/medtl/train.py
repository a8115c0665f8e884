"""Training a network: :func:`fit`, the one call every part of MedTL trains through.

The loop itself is :class:`medtl.training.Trainer` (AdamW, warm-up then cosine, MONAI losses, AMP
on CUDA, atomic checkpoints, resume, JSON-lines events); ``fit`` builds one, runs it and returns
what the callers use.

Example:
    >>> import numpy as np
    >>> from medtl.config import RunConfig
    >>> cfg = RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"},
    ...     "preprocessing": {"patch_size": [32, 32]}, "augmentation": "none",
    ...     "strategy": {"name": "full_finetune"},
    ...     "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2}})
    >>> items = [{"image": np.random.rand(1, 32, 32).astype("float32"),
    ...           "label": (np.random.rand(1, 32, 32) > 0.5).astype("int64")}]
    >>> import tempfile; result = fit(cfg, items, run_dir=tempfile.mkdtemp())
    >>> len(result.history)
    1
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.config import RunConfig

# Re-exported (noqa F401): callers and tests import these from here.
from medtl.devices import cuda_problem, device_report, resolve_device  # noqa: F401
from medtl.evaluate import dice_per_class  # noqa: F401  (the Dice every part of MedTL reports)
from medtl.events import EventSink
from medtl.losses import class_weights, make_loss  # noqa: F401
from medtl.memory import available_memory  # noqa: F401
from medtl.models.registry import TransferNet
from medtl.training import Trainer
from medtl.training.backoff import memory_check as _memory_check  # noqa: F401
from medtl.training.data import SeededSamples as _SeededSamples  # noqa: F401
from medtl.training.setup import lr_factor  # noqa: F401
from medtl.training.trainer import BEST, CHECKPOINT  # noqa: F401


@dataclass
class FitResult:
    """What :func:`fit` gives back: the trained network (in eval mode), the per-epoch history, the
    run's time and throughput, the epoch whose weights were kept and whether it stopped early."""

    model: TransferNet
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    best_epoch: int | None = None  # 1-based; the weights in ``model`` when ``keep_best`` applied
    stopped_early: bool = False


def fit(
    cfg: RunConfig,
    items: Sequence[dict[str, np.ndarray]],
    *,
    run_dir: str | Path,
    events: EventSink | None = None,
    resume: bool = False,
    model: TransferNet | None = None,
    label: str = "train",
    validate: Callable[[TransferNet], dict[str, float]] | None = None,
    n_domains: int = 0,
    target_items: Sequence[dict[str, np.ndarray]] | None = None,
) -> FitResult:
    """Trains a network on in-memory samples.

    Args:
        cfg: the run configuration (model, strategy, optimiser, schedule, loss, augmentation).
        items: dicts with ``image`` (C, *spatial) float32 in the preset's [0, 1] space and ``label``
            (1, *spatial) integer class indices.
        run_dir: where ``checkpoint.pt`` is written after every epoch (atomically).
        events: the JSON-lines sink for progress.
        resume: continue from ``run_dir/checkpoint.pt`` if present.
        model: start from this network (e.g. the last round's) instead of building one.
        label: names the run in progress events (e.g. ``"pretrained seed 1"``).
        validate: called with the network (in eval mode) after every epoch; its scores (for
            example Dice per class on held-out cases) go into the history and the epoch event,
            which is what live validation curves are drawn from.
        n_domains: domain-specific BatchNorm with this many domains; every item then carries its
            ``domain`` index, and each batch is drawn from one domain.
        target_items: unlabelled target-domain samples (``image``; a ``label`` of the right shape
            is carried through the augmentation and ignored) for adversarial training (DANN).
    """
    trainer = Trainer(
        cfg,
        items,
        run_dir=run_dir,
        events=events,
        resume=resume,
        model=model,
        label=label,
        scorer=validate,
        n_domains=n_domains,
        target_items=target_items,
    )
    state = trainer.run_training()
    seconds = time.perf_counter() - trainer.t0
    return FitResult(
        model=trainer.model,
        history=state.history,
        seconds=seconds,
        images_per_s=trainer.images / seconds if seconds else 0.0,
        best_epoch=trainer.kept_epoch,
        stopped_early=state.stopped_early,
    )


def summarize(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "values": arr.tolist()}
