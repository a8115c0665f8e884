"""What a training run has to remember between epochs, and across a resume.

Example:
    >>> state = TrainState(micro_batch=4, train_patch=[64, 64])
    >>> state.record_score(0.5, epoch=1), state.record_score(0.4, epoch=2)
    (True, False)
    >>> state.best_epoch, state.stall
    (1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """The small, serialisable state of a run: everything the next epoch needs that the network,
    optimiser and schedule do not hold.

    The counters below are written into each epoch's history record as well, which is where a
    resumed run reads them back (checkpoints written before this class existed hold them there).

    Attributes:
        epoch: epochs completed, i.e. the 0-based index of the next epoch.
        history: one record per completed epoch.
        best_score: the best mean validation score so far (None before any).
        best_epoch: the 1-based epoch that reached it.
        stall: epochs since the validation score last improved.
        plateau_unfrozen: encoder stages unfrozen because the score stalled.
        stopped_early: early stopping ended the run.
        micro_batch: samples per forward pass (below the batch after running out of memory).
        train_patch: the training patch (smaller than the configured one after running out of memory).
        scaler: the float16 gradient scaler's state (empty when it is not used).
    """

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    stall: int = 0
    plateau_unfrozen: int = 0
    stopped_early: bool = False
    micro_batch: int = 1
    train_patch: list[int] = field(default_factory=list)
    scaler: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], *, micro_batch: int, train_patch: list[int]) -> TrainState:
        """The state a checkpoint describes (one written before this class existed too: its counters
        live in the history's last record). ``micro_batch`` and ``train_patch`` are this process's
        configured ones, kept lowered where the run had to lower them (the same GPU would fail the
        same way)."""
        history = list(checkpoint["history"])
        last = history[-1] if history else {}
        return cls(
            epoch=int(checkpoint["epoch"]) + 1,
            history=history,
            best_score=max((h["val_score"] for h in history if h.get("val_score") is not None), default=None),
            best_epoch=last.get("best_epoch"),
            stall=int(last.get("stall", 0)),
            plateau_unfrozen=int(last.get("plateau_unfrozen", 0)),
            stopped_early=bool(last.get("stopped_early", False)),
            micro_batch=min(micro_batch, int(last.get("micro_batch", micro_batch))),
            train_patch=list(last.get("train_patch", train_patch)),
            scaler=dict(checkpoint.get("scaler", {})),
        )

    def checkpoint(self) -> dict[str, Any]:
        """This state's part of a checkpoint (plain Python values, as ``torch.load(weights_only=True)``
        reads them); the counters travel in the history's last record."""
        return {"epoch": self.epoch - 1, "history": self.history, "scaler": self.scaler}

    def record_score(self, score: float | None, *, epoch: int) -> bool:
        """Counts a validation score (None: nothing could be scored, no evidence either way);
        returns whether it is a new best."""
        if score is None:
            return False
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.stall = score, epoch, 0
            return True
        self.stall += 1
        return False

    def counters(self) -> dict[str, Any]:
        """The fields an epoch's record carries so that a resumed run continues the same count."""
        return {
            "best_epoch": self.best_epoch,
            "stall": self.stall,
            "plateau_unfrozen": self.plateau_unfrozen,
            "stopped_early": self.stopped_early,
        }
