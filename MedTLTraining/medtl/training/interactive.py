"""Handlers for interactive rounds: a time budget, a stop once the loss stops falling, a stop the
user asks for ("good enough"), and live previews while the network learns.

Each ends the run through :meth:`~medtl.training.trainer.Trainer.request_stop`, between steps, so
the round ends as a run ends after its last epoch (checkpointed, packaged, predicted).

Example:
    >>> from types import SimpleNamespace
    >>> stops = []
    >>> trainer = SimpleNamespace(request_stop=stops.append, steps_done=0)
    >>> plateau = LossPlateau(patience=3, min_steps=0, smoothing=1.0)  # raw losses, for the example
    >>> for loss in [1.0, 0.5, 0.5, 0.5, 0.5]:
    ...     trainer.steps_done += 1
    ...     plateau.on_step_end(trainer, loss)
    >>> stops
    ['the training loss stopped falling (no 2% drop in 3 steps)']
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from medtl.training.handlers import Handler

if TYPE_CHECKING:
    from medtl.training.trainer import Trainer


class TimeBudget(Handler):
    """Ends the run once ``seconds`` of training have passed (measured from the first step's start).

    Args:
        seconds: the budget; the step running when it is spent finishes first.
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = seconds
        self.clock = clock
        self.started: float | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.started = self.clock()

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        if self.started is not None and self.clock() - self.started >= self.seconds:
            trainer.request_stop(f"time budget of {self.seconds:g} s spent")


class LossPlateau(Handler):
    """Ends the run once the training loss (on the painted slices: the only slices it trains on) has
    not fallen for ``patience`` steps.

    Single batch losses jump with the crops drawn, so the handler follows their exponential moving
    average and counts a step as progress only when the average falls ``min_drop`` (relative) below
    its best.

    Args:
        patience: steps without progress before stopping.
        min_drop: the relative drop of the average that counts as progress.
        min_steps: never stop before this many steps (the warm-up of the learning rate).
        smoothing: the moving average's weight of the newest loss.
    """

    def __init__(self, *, patience: int, min_drop: float = 0.02, min_steps: int = 20, smoothing: float = 0.5) -> None:
        self.patience = patience
        self.min_drop = min_drop
        self.min_steps = min_steps
        self.smoothing = smoothing
        self.average: float | None = None
        self.best: float | None = None
        self.stall = 0

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        a = self.smoothing
        self.average = loss if self.average is None else a * loss + (1 - a) * self.average
        if self.best is None or self.average < self.best * (1 - self.min_drop):
            self.best, self.stall = self.average, 0
            return
        self.stall += 1
        if self.stall >= self.patience and trainer.steps_done >= self.min_steps:
            trainer.request_stop(
                f"the training loss stopped falling (no {self.min_drop:.0%} drop in {self.patience} steps)"
            )


class StopSignal(Handler):
    """Ends the run when ``reason()`` gives a reason (a user pressing "Good enough" in another
    thread); checked after every step, so the run stops within one step.

    Args:
        reason: returns why to stop, or None to go on.
    """

    def __init__(self, reason: Callable[[], str | None]) -> None:
        self.reason = reason

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        why = self.reason()
        if why:
            trainer.request_stop(why)


class LivePreview(Handler):
    """Calls ``show(trainer)`` every ``every_s`` seconds of training (the first after
    ``first_s``), between steps: a prediction of the slice the user looks at.

    ``show`` gets the network in training mode and must leave it so; see
    :func:`medtl.serve.preview_slice` for one that predicts in eval mode and puts it back.

    Args:
        show: makes and delivers one preview.
        every_s: seconds between previews.
        first_s: seconds of training before the first one (a network that has not learned yet
            shows noise).
        clock: the time source (tests pass a fake one).
    """

    def __init__(
        self,
        show: Callable[[Trainer], None],
        *,
        every_s: float = 3.0,
        first_s: float = 1.5,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.show = show
        self.every_s = every_s
        self.first_s = first_s
        self.clock = clock
        self.due: float | None = None
        self.shown = 0

    def on_train_start(self, trainer: Trainer) -> None:
        self.due = self.clock() + self.first_s

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        if self.due is None or self.clock() < self.due or trainer.stop_reason:
            return  # after a stop the round's prediction comes at once: no preview before it
        self.show(trainer)
        self.shown += 1
        # From the end of this preview: a slow preview must not leave no time for steps.
        self.due = self.clock() + self.every_s

    def on_train_end(self, trainer: Trainer) -> None:
        self.due = None
