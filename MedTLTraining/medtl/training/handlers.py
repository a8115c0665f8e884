"""Small objects attached to a :class:`~medtl.training.trainer.Trainer`, each doing one job at named
points of the run, in MONAI's manner: early stopping, keeping the best epoch's weights, unfreezing
on a plateau, and the progress events.

A handler overrides only the hooks it needs; the trainer calls every handler's hook in the order
the handlers were attached. Hooks receive the trainer, whose :class:`~medtl.training.state.TrainState`
(``trainer.state``) holds the counters they read and change.

Example:
    >>> from types import SimpleNamespace
    >>> from medtl.events import EventSink
    >>> from medtl.training.state import TrainState
    >>> trainer = SimpleNamespace(state=TrainState(stall=3), events=EventSink())
    >>> EarlyStopping(patience=3, epochs=10).on_validation_end(trainer, {"epoch": 4})
    >>> trainer.state.stopped_early
    True
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medtl.data.io import atomic_path

if TYPE_CHECKING:
    from medtl.training.trainer import Trainer


class Handler:
    """A no-op for every hook; subclasses override the ones they need."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has loaded its checkpoint)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Before an epoch's first step; ``trainer.state.epoch`` is its 0-based index."""

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        """After the optimiser step; ``loss`` is the batch's task loss."""

    def on_train_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After the epoch's last step, before validation: a handler may add fields to ``record``."""

    def on_validation_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After the epoch's score went into the state (only when the run validates)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After the epoch's checkpoint was written."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch (or the early stop)."""


class EarlyStopping(Handler):
    """Ends the run once the validation score has not improved for ``patience`` epochs.

    Args:
        patience: epochs without a better score; 0 never stops.
        epochs: the run's length (stopping after the last epoch is no early stop).
    """

    def __init__(self, *, patience: int, epochs: int) -> None:
        self.patience = patience
        self.epochs = epochs

    def on_validation_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        state = trainer.state
        if self.patience and state.stall >= self.patience and record["epoch"] < self.epochs:
            state.stopped_early = True
            trainer.events.emit(
                "message",
                message=f"early stop after epoch {record['epoch']}: "
                f"no better validation score for {state.stall} epoch(s)",
            )


class PlateauUnfreezing(Handler):
    """Unfreezes the next encoder stage once the validation score has not improved for ``patience``
    epochs; the stall count starts again, so the new stage gets its own chance before anything stops.

    Attach it before :class:`EarlyStopping`. The trainer reads ``state.plateau_unfrozen`` when it
    sets the trainable stages at the next epoch's start.

    Args:
        patience: epochs without a better score before the next stage trains.
        n_stages: the encoder's stages (none is left to unfreeze after the last).
    """

    def __init__(self, *, patience: int, n_stages: int) -> None:
        self.patience = patience
        self.n_stages = n_stages

    def on_validation_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        state = trainer.state
        if state.stall >= self.patience and state.plateau_unfrozen < self.n_stages:
            state.plateau_unfrozen += 1
            state.stall = 0


class KeepBest(Handler):
    """Saves the best-scoring epoch's weights to ``path`` and, with ``restore``, puts them back into
    the network at the end of the run; ``trainer.kept_epoch`` then names that epoch.

    The file is written after the epoch's checkpoint and tagged with its epoch: a crash in between
    leaves a file the history does not point at, which the restore refuses.

    Args:
        path: the best checkpoint (``best.pt`` in the run directory).
        restore: end with the best epoch's weights (``train.keep_best``) rather than the last's.
    """

    def __init__(self, path: str | Path, *, restore: bool) -> None:
        self.path = Path(path)
        self.restore = restore

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.state.best_epoch == record["epoch"] and trainer.world.is_main:
            with atomic_path(self.path) as tmp:
                torch.save({"epoch": record["epoch"], "model": trainer.model.state_dict()}, tmp)

    def on_train_end(self, trainer: Trainer) -> None:
        state = trainer.state
        if not self.restore or state.best_epoch is None or not trainer.world.is_main:
            return
        final_epoch = state.history[-1]["epoch"] if state.history else 0
        if state.best_epoch == final_epoch:
            trainer.kept_epoch = final_epoch
            return
        best = torch.load(self.path, map_location=trainer.device, weights_only=True) if self.path.is_file() else {}
        if best.get("epoch") != state.best_epoch:
            trainer.events.emit(
                "warning",
                message=f"{self.path} does not hold epoch {state.best_epoch}; keeping the last epoch's weights",
            )
            return
        trainer.model.load_state_dict(best["model"])
        trainer.kept_epoch = state.best_epoch
        trainer.events.emit(
            "message",
            message=f"keeping epoch {state.best_epoch}'s weights (best validation score {state.best_score:.4f}), "
            f"not epoch {final_epoch}'s",
        )


class ProgressEvents(Handler):
    """The JSON-lines progress of a run (see :mod:`medtl.events`): ``start``, one ``step`` per
    optimiser step and one ``epoch`` per epoch, each with an ETA from the steps this process has
    run so far (``trainer.steps_done`` since ``trainer.t0``).

    Args:
        label: names the run in the events (e.g. ``"pretrained seed 1"``).
    """

    def __init__(self, *, label: str) -> None:
        self.label = label

    def on_train_start(self, trainer: Trainer) -> None:
        trainer.events.emit(
            "start",
            run_dir=str(trainer.run_dir),
            total_steps=trainer.total_steps,
            device=str(trainer.device),
            label=self.label,
            processes=trainer.world.size,
            workers=trainer.workers,
        )

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        cfg = trainer.cfg.train
        global_step = trainer.state.epoch * cfg.steps_per_epoch + trainer.step_in_epoch
        elapsed = time.perf_counter() - trainer.t0
        trainer.events.emit(
            "step",
            epoch=trainer.state.epoch + 1,
            epochs=cfg.epochs,
            step=global_step,
            total_steps=trainer.total_steps,
            loss=loss,
            eta_s=round(elapsed / trainer.steps_done * (trainer.total_steps - global_step), 1),
            label=self.label,
        )

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        cfg = trainer.cfg.train
        # An epoch a stop cut short (a time budget, "good enough") counts the steps it ran.
        done = (record["epoch"] - 1) * cfg.steps_per_epoch + record.get("steps", cfg.steps_per_epoch)
        elapsed = time.perf_counter() - trainer.t0
        key = trainer.val_key
        trainer.events.emit(
            "epoch",
            epoch=record["epoch"],
            epochs=cfg.epochs,
            step=done,
            total_steps=trainer.total_steps,
            loss=record["loss"],
            lr=record["lr"],
            eta_s=round(elapsed / max(1, trainer.steps_done) * (trainer.total_steps - done), 1),
            label=self.label,
            **({key: record[key]} if key in record else {}),
        )
