"""The warm engine from the module's side: one ``medtl serve`` process for the Slicer session.

:class:`WarmEngine` starts the engine on first use (or ahead of it, :meth:`WarmEngine.start`, so
that torch and MONAI are imported while the user paints), hands each round to it as a request and
restarts it when it has gone (a crash, the engine's idle exit): a round on a dead engine fails
with one message and the next round starts a fresh engine from the last model package, so
nothing the user painted or learned is lost.

:class:`WarmRound` is one round seen as an :class:`~MedTLExtensionLib.engine_process.EngineRun`,
so :class:`~MedTLExtensionLib.engine_process.EngineJob` drives it as it drives a one-shot engine.

Example:
    >>> engine = WarmEngine()
    >>> engine.start()  # while the user paints
    >>> job = EngineJob(engine.round({"request": "learn", ...}), "Training")
    >>> engine.send({"request": "view", "axis": 0, "index": 40})  # the user scrolled
    >>> engine.shutdown()
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from medtl.stop import CANCELLED_EXIT_CODE

from MedTLExtensionLib.engine_process import EngineProcess, start_engine

# How long a cancelled round may take to reach its next step before the engine is killed.
CANCEL_GRACE_S = 10.0
# The exit status a round reports when the engine died under it.
ENGINE_LOST = 70

Starter = Callable[[Sequence[str]], EngineProcess]


def start_warm_engine(args: Sequence[str]) -> EngineProcess:
    """``medtl serve`` as :func:`~MedTLExtensionLib.engine_process.start_engine` starts any engine
    (``PythonSlicer`` inside Slicer), with a pipe for requests."""
    return start_engine(args, requests=True)


class WarmEngine:
    """Owns the ``medtl serve`` process and starts a new one when the last has gone.

    Args:
        starter: starts ``medtl <args>`` with a request pipe (tests pass their own interpreter).
        idle_exit_s: the engine exits after this long without a request (frees its memory).
    """

    def __init__(self, starter: Starter = start_warm_engine, *, idle_exit_s: float = 1800.0) -> None:
        self.starter = starter
        self.idle_exit_s = idle_exit_s
        self.process: EngineProcess | None = None
        self.current: WarmRound | None = None
        self.starts = 0
        self._ids = itertools.count(1)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def start(self) -> None:
        """Starts the engine if none runs; returns at once (it imports torch in the background)."""
        if not self.alive:
            self.process = self.starter(["serve", "--idle-exit-s", f"{self.idle_exit_s:g}"])
            self.starts += 1

    def round(self, request: Mapping[str, Any]) -> WarmRound:
        """Sends a ``learn`` request (an ``id`` is added) and returns the round to poll."""
        if self.current is not None and self.current.returncode is None:
            raise RuntimeError("the warm engine is already running a round")
        self.start()
        self.process.poll()  # what the engine said between rounds (ready, idle messages) is not this round's
        round_id = f"round-{next(self._ids)}"
        self.current = WarmRound(self, round_id)
        if not self.process.send({**request, "id": round_id}):
            self.current.lost("the MedTL engine could not be reached")
        return self.current

    def send(self, request: Mapping[str, Any]) -> bool:
        """A request to the running engine (a view change, "good enough"); False without one."""
        return self.alive and self.process.send(request)

    def kill(self) -> None:
        """Kills the engine's process tree now; the next round starts a fresh engine (at once: the
        killed one is forgotten, not waited for)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()

    def shutdown(self) -> None:
        """Asks the engine to exit (the module's cleanup); kills it if a round is still running."""
        if self.process is None:
            return
        if self.current is not None and self.current.returncode is None:
            self.kill()
        elif not self.process.send({"request": "shutdown"}):
            self.kill()


class WarmRound:
    """One round on the warm engine, polled like a one-shot engine process.

    Its :attr:`returncode` is 0 after the engine's ``done``, :data:`CANCELLED_EXIT_CODE` after
    ``cancelled``, 1 after the round's ``error`` (the engine stays up) and :data:`ENGINE_LOST`
    when the engine died under it.
    """

    def __init__(self, engine: WarmEngine, round_id: str) -> None:
        self.engine = engine
        self.round_id = round_id
        self.process = engine.process
        self.error_message: str | None = None
        self._code: int | None = None
        self._pending: list[dict[str, Any]] = []

    @property
    def returncode(self) -> int | None:
        if self._code is None:
            self._pending += self._take()
        if self._code is None and self.process.returncode is not None:
            self._pending += self._take()  # the last lines the engine wrote before it ended
            if self._code is None:
                self.lost(f"the MedTL engine stopped unexpectedly (exit status {self.process.returncode})")
        return self._code

    def poll(self) -> list[dict[str, Any]]:
        events, self._pending = [*self._pending, *self._take()], []
        return events

    def _take(self) -> list[dict[str, Any]]:
        if self._code is not None:
            return []
        events = self.process.poll()
        for event in events:
            kind, mine = event.get("event"), event.get("round") in (None, self.round_id)
            if kind == "done" and mine:
                self._code = 0
            elif kind == "cancelled" and mine:
                self._code = CANCELLED_EXIT_CODE
            elif kind == "error" and event.get("round") == self.round_id:
                self.error_message = event.get("message")
                self._code = 1
        return events

    def lost(self, message: str) -> None:
        """The engine is gone: the round fails with ``message``; the next one starts a new engine."""
        tail = [line for line in self.process.log.splitlines() if line.strip()][-1:]
        self.error_message = message + (f": {tail[0]}" if tail else "") + "; the next round starts a fresh engine"
        self._code = ENGINE_LOST

    def cancel(self) -> None:
        """Asks the engine to stop the round at its next step; kills it if it has not within
        :data:`CANCEL_GRACE_S` (the next round then starts a fresh engine). Never blocks."""
        if self._code is not None:
            return
        if not self.process.send({"request": "cancel"}):
            self.process.kill()
            return
        timer = threading.Timer(CANCEL_GRACE_S, self._kill_if_running)
        timer.daemon = True
        timer.start()

    def _kill_if_running(self) -> None:
        with contextlib.suppress(Exception):
            if self.returncode is None:
                self.process.kill()

    def kill(self) -> None:
        self.process.kill()

    def good_enough(self) -> bool:
        """Stops training at the next step and predicts with the weights as they are."""
        return self._code is None and self.process.send({"request": "good_enough"})

    @property
    def log(self) -> str:
        return self.process.log
