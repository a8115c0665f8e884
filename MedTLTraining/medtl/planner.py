"""The pre-flight planner: how long a round (or a training run) will take and how much memory it
needs on the chosen device, before the user commits to it.

A short probe times a few real training steps of the run's own network on its own samples (on a
copy: the network is unchanged), and one batch of prediction; the memory estimate traces the
network on PyTorch's meta device (:mod:`medtl.memory`). :func:`fit_to_memory` then picks the
micro-batch, and if even one sample does not fit a smaller patch, so that the run fits.

Example:
    >>> fit_to_memory(lambda patch, batch: batch * patch[0] * patch[1], available=5 * 64 * 64,
    ...               batch=8, patch=[64, 64], divisor=32)
    (4, [64, 64])
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from medtl.config import RunConfig
from medtl.errors import ConfigError
from medtl.events import EventSink
from medtl.memory import available_memory, estimate_training_memory, gib, smaller_patch

# The probe: one step to warm up (first-call allocations, kernel selection), then the timed ones.
WARMUP_STEPS = 2
TIMED_STEPS = 3
# Room left for what the estimate does not see (the data pipeline, other programs).
MEMORY_HEADROOM = 0.9


@dataclass(frozen=True)
class RoundPlan:
    """What a run is expected to take, as the planner measured and chose it.

    Attributes:
        device: where it runs (``cpu``, ``cuda``, ``mps``).
        seconds_per_step: the probe's median training step.
        steps: the optimiser steps planned (from the epochs, or from a time budget).
        train_s: the training time expected.
        predict_s: the time to predict the whole volume afterwards (0 when nothing is predicted).
        memory_bytes: the training memory estimate at the chosen micro-batch and patch.
        available_bytes: the device's free memory (None where it cannot be read).
        batch_size: samples per optimiser step (as configured).
        micro_batch: samples per forward pass (below the batch when the batch does not fit).
        patch_size: the training patch (smaller than configured when one sample does not fit).
    """

    device: str
    seconds_per_step: float
    steps: int
    train_s: float
    predict_s: float
    memory_bytes: int
    available_bytes: int | None
    batch_size: int
    micro_batch: int
    patch_size: list[int]

    @property
    def total_s(self) -> float:
        return self.train_s + self.predict_s

    def summary(self) -> str:
        """One line for the module and the terminal: "about 40 s on the CPU (...)"."""
        where = {"cpu": "the CPU", "cuda": "your GPU", "mps": "your Mac's GPU"}.get(self.device, self.device)
        micro = f", micro-batches of {self.micro_batch}" if self.micro_batch < self.batch_size else ""
        return (
            f"about {_duration(self.total_s)} on {where} ({self.steps} steps of batch {self.batch_size}{micro}, "
            f"patch {'x'.join(map(str, self.patch_size))}; needs {gib(self.memory_bytes)} of "
            f"{gib(self.available_bytes)} free)"
        )

    def event_fields(self) -> dict:
        return {**asdict(self), "total_s": round(self.total_s, 2), "message": self.summary()}


def fit_to_memory(
    needed: Callable[[list[int], int], int],
    *,
    available: int | None,
    batch: int,
    patch: Sequence[int],
    divisor: int,
    min_size: int = 16,
) -> tuple[int, list[int]]:
    """The micro-batch and patch that fit into ``available`` bytes: the whole batch at once when it
    fits, else the largest micro-batch (gradients accumulated: the same update), and when not even
    one sample fits, smaller patches (about 3/4 per axis, still multiples of ``divisor``).

    Args:
        needed: bytes a (patch, micro-batch) needs (the estimate).
        available: free bytes; None trusts the configuration.

    Raises:
        ConfigError: when one sample of the smallest patch does not fit either.
    """
    patch = list(patch)
    if available is None:
        return batch, patch
    budget = available * MEMORY_HEADROOM
    while True:
        micro = next((b for b in _halvings(batch) if needed(patch, b) <= budget), 0)
        if micro:
            return micro, patch
        smaller = smaller_patch(patch, divisor=divisor, min_size=min_size)
        if smaller is None:
            raise ConfigError(
                f"one sample of patch {'x'.join(map(str, patch))} needs {gib(needed(patch, 1))}, more than the "
                f"{gib(available)} free: choose a smaller network or preprocessing.patch_size, or free the device"
            )
        patch = smaller


def plan_run(
    cfg: RunConfig,
    items: Sequence[dict[str, np.ndarray]],
    model: torch.nn.Module,
    *,
    device: torch.device,
    predict_slices: int = 0,
    budget_s: float | None = None,
    events: EventSink | None = None,
    seconds_per_step: float | None = None,
) -> RoundPlan:
    """Plans a run of ``cfg`` on ``items`` starting from ``model``: fits batch and patch to the
    device's memory, times a short probe, and predicts the time of the training (``budget_s``
    seconds, or the configured epochs) and of predicting ``predict_slices`` slices afterwards.

    Args:
        seconds_per_step: a step time measured already (an earlier round of the same run): no probe.
        events: a ``plan`` event with :meth:`RoundPlan.event_fields` goes here.
    """
    from medtl.models.registry import MODELS

    spec = MODELS[cfg.model.name]
    use_amp = device.type == "cuda"

    def needed(patch: list[int], batch: int) -> int:
        return estimate_training_memory(model, (cfg.in_channels, *patch), batch_size=batch, amp=use_amp).total

    available = available_memory(device)
    micro, patch = fit_to_memory(
        needed,
        available=available,
        batch=cfg.train.batch_size,
        patch=cfg.preprocessing.patch_size,
        divisor=spec.divisor,
        min_size=spec.min_size,
    )
    fitted = replace(cfg, preprocessing=replace(cfg.preprocessing, patch_size=patch))
    step_s = seconds_per_step or probe_step_seconds(fitted, items, model, device=device)
    predict_s = probe_predict_seconds(fitted, model, items, device=device, slices=predict_slices)
    configured = cfg.train.epochs * cfg.train.steps_per_epoch
    steps = configured if not budget_s else max(1, int(budget_s / step_s))
    plan = RoundPlan(
        device=device.type,
        seconds_per_step=round(step_s, 4),
        steps=steps,
        train_s=round(steps * step_s, 2),
        predict_s=round(predict_s, 2),
        memory_bytes=needed(patch, micro),
        available_bytes=available,
        batch_size=cfg.train.batch_size,
        micro_batch=micro,
        patch_size=patch,
    )
    if events is not None:
        events.emit("plan", **plan.event_fields())
    return plan


def budgeted(cfg: RunConfig, steps: int) -> RunConfig:
    """``cfg`` with epochs and steps per epoch that add up to about ``steps`` (a time budget's),
    so the learning-rate schedule warms up and decays over the round actually run; a strategy
    that switches phases by epoch keeps its share of the epochs."""
    per_epoch = max(1, min(cfg.train.steps_per_epoch, steps))
    epochs = max(1, math.ceil(steps / per_epoch))
    strategy = cfg.strategy
    if strategy.name == "feature_extraction_then_finetune":
        share = strategy.feature_extraction_epochs / max(1, cfg.train.epochs)
        strategy = replace(strategy, feature_extraction_epochs=max(1, round(share * epochs)) if epochs > 1 else 0)
    # A short round must not spend a large share of itself warming up.
    optim = replace(cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, max(1, steps // 10)))
    return replace(
        cfg, train=replace(cfg.train, epochs=epochs, steps_per_epoch=per_epoch), strategy=strategy, optim=optim
    )


def probe_step_seconds(
    cfg: RunConfig, items: Sequence[dict[str, np.ndarray]], model: torch.nn.Module, *, device: torch.device
) -> float:
    """The mean time of a training step of ``cfg`` on ``items`` over the run's epochs.

    A step with the encoder frozen costs less than one with it training (no backward pass through
    the encoder), so both are timed, on copies of ``model``, and weighted by the share of the
    encoder each epoch of the strategy trains (feature extraction then fine-tuning: a third
    frozen by default).
    """
    from medtl.strategies import unfrozen_stages

    n_stages = len(model.encoder_stages()) if hasattr(model, "encoder_stages") else 0
    shares = (
        [unfrozen_stages(cfg.strategy, e, n_stages) / n_stages for e in range(cfg.train.epochs)] if n_stages else [1.0]
    )
    timed: dict[str, float] = {}
    for name, needed in (("feature_extraction", min(shares) < 1), ("full_finetune", max(shares) > 0)):
        if needed:
            phase = replace(cfg, strategy=replace(cfg.strategy, name=name))
            timed[name] = median_step_seconds(phase, items, model, device=device)
    frozen = timed.get("feature_extraction", 0.0)
    full = timed.get("full_finetune", frozen)
    return float(np.mean([frozen + share * (full - frozen) for share in shares]))


def replan(plan: RoundPlan, *, seconds_per_step: float, predict_s: float, budget_s: float | None) -> RoundPlan:
    """The plan of another round of the same run (same network, batch, patch and device: the same
    memory), with the step and prediction times measured in the last one: no probe."""
    steps = max(1, int(budget_s / seconds_per_step)) if budget_s else plan.steps
    return replace(
        plan,
        seconds_per_step=round(seconds_per_step, 4),
        steps=steps,
        train_s=round(steps * seconds_per_step, 2),
        predict_s=round(predict_s, 2),
    )


def median_step_seconds(
    cfg: RunConfig, items: Sequence[dict[str, np.ndarray]], model: torch.nn.Module, *, device: torch.device
) -> float:
    """The median time of a training step of ``cfg`` on ``items``, from a few steps of a copy of
    ``model`` (after warm-up steps)."""
    from medtl.training import Handler, Trainer

    times: list[float] = []

    class StepClock(Handler):
        def on_epoch_start(self, trainer) -> None:
            times.append(time.perf_counter())

        def on_step_end(self, trainer, loss: float) -> None:
            times.append(time.perf_counter())

    probe = replace(
        cfg,
        train=replace(cfg.train, epochs=1, steps_per_epoch=WARMUP_STEPS + TIMED_STEPS, device=device.type),
    )
    with tempfile.TemporaryDirectory(prefix="medtl-probe-") as run_dir:
        trainer = Trainer(
            probe, items, run_dir=run_dir, model=copy.deepcopy(model), handlers=[StepClock()], checkpoints=False
        )
        trainer.run_training()
    steps = np.diff(times)[WARMUP_STEPS:]
    return float(statistics.median(steps))


def probe_predict_seconds(
    cfg: RunConfig,
    model: torch.nn.Module,
    items: Sequence[dict[str, np.ndarray]],
    *,
    device: torch.device,
    slices: int,
    batch: int = 16,
) -> float:
    """The time to predict ``slices`` slices of the training samples' size, from one timed batch."""
    if slices <= 0 or cfg.spatial_dims != 2:
        return 0.0
    from medtl.infer import predict_slices

    shape = items[0]["image"].shape[-2:]
    volume = np.zeros((min(batch, slices), *shape), np.float32)
    net = copy.deepcopy(model)
    predict_slices(net, volume[:1], device=device)  # warm-up
    t0 = time.perf_counter()
    predict_slices(net, volume, batch_size=batch, context_slices=cfg.preprocessing.context_slices, device=device)
    return (time.perf_counter() - t0) * math.ceil(slices / len(volume))


def _halvings(batch: int) -> list[int]:
    """``batch``, then halved down to 1: the micro-batches tried, largest first."""
    sizes = [batch]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"
