"""The engine as a separate process: start it, read its JSON-lines events, cancel it.

The Slicer modules never run training in Slicer's own process: the engine runs as
``python -m medtl ... --events -`` (``PythonSlicer`` inside Slicer), the GUI polls
:meth:`EngineProcess.poll` from a timer and stays responsive. Cancel terminates the process; the
engine's last checkpoint was written atomically, so ``--resume`` goes on from it.

:class:`EngineRun` is the small interface the modules depend on, so tests can drive the real
engine in a real child process or replace it.

Example:
    >>> import sys
    >>> run = EngineProcess(["models"], python=sys.executable)
    >>> run.wait(60)
    0
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


def _engine_dir() -> Path:
    # Installed extension: medtl/ sits beside MedTLExtensionLib/ in qt-scripted-modules.
    # Source tree: <repo>/MedTLTraining/medtl.
    here = Path(__file__).resolve().parents[1]
    for candidate in (here, here.parent / "MedTLTraining"):
        if (candidate / "medtl" / "__init__.py").is_file():
            return candidate
    return here


ENGINE_DIR = _engine_dir()


@runtime_checkable
class EngineRun(Protocol):
    """What a module needs from a running engine."""

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> list[dict[str, Any]]: ...

    def cancel(self) -> None: ...


class EngineProcess:
    """Runs ``python -m medtl <args> --events -`` and collects its events without blocking.

    Args:
        args: the ``medtl`` command line after ``medtl`` (``--events -`` is added if absent).
        python: the interpreter (inside Slicer: the ``PythonSlicer`` executable).
        env: extra environment variables.
        log_lines: how many non-event output lines to keep for :attr:`log`.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        log_lines: int = 400,
    ) -> None:
        from medtl.events import parse_line  # the protocol's one parser, shared with the engine

        self._parse = parse_line
        args = list(args)
        if "--events" not in args and args and args[0] in ("train", "predict", "demo", "adapt"):
            args += ["--events", "-"]
        self.args = args
        full_env = {**os.environ, **(env or {})}
        # The engine must be importable in the child even when it is not pip-installed (Slicer).
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_DIR), full_env.get("PYTHONPATH", "")) if p)
        full_env["PYTHONUNBUFFERED"] = "1"
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._log: deque[str] = deque(maxlen=log_lines)
        self.error_message: str | None = None
        self._process = subprocess.Popen(
            [python or sys.executable, "-m", "medtl", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=full_env,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self._process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, events: bool) -> None:
        for line in stream:
            record = self._parse(line) if events else None
            if record is None:
                self._log.append(line.rstrip("\n"))
                if line.startswith("medtl: error: "):
                    self.error_message = line[len("medtl: error: ") :].strip()
                continue
            if record["event"] == "error":
                self.error_message = record.get("message")
            self._events.put(record)

    @property
    def returncode(self) -> int | None:
        code = self._process.poll()
        # Report the end only once everything the process printed has been read.
        if code is not None and any(r.is_alive() for r in self._readers):
            return None
        return code

    @property
    def log(self) -> str:
        """The process's non-event output (the full log a user can ask for)."""
        return "\n".join(self._log)

    def poll(self) -> list[dict[str, Any]]:
        """All events received since the last call (never blocks)."""
        records = []
        while True:
            try:
                records.append(self._events.get_nowait())
            except queue.Empty:
                return records

    def cancel(self, timeout: float = 10.0) -> None:
        """Stops the engine: terminate, then kill if it does not end within ``timeout`` seconds."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for reader in self._readers:
            reader.join(timeout)

    def wait(self, timeout: float | None = None) -> int:
        code = self._process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code


def start_engine(args: Sequence[str]) -> EngineProcess:
    """Starts ``medtl <args>`` with the interpreter that sees Slicer's Python packages.

    Inside Slicer that is ``PythonSlicer``; elsewhere (tests, scripts) the current interpreter.
    """
    import shutil

    return EngineProcess(list(args), python=shutil.which("PythonSlicer") or sys.executable)


class EngineJob:
    """One engine run seen as a job: collects its events, the model package it reports, and
    turns a failure into one readable message.

    Args:
        process: the running engine.
        what: what the run does, for messages ("Training", "Prediction").
    """

    def __init__(self, process: EngineRun, what: str = "The MedTL engine") -> None:
        self.process = process
        self.what = what
        self.cancelled = False
        self.error: str | None = None
        self.done: dict[str, Any] | None = None
        self.finished = False

    def cancel(self) -> None:
        self.cancelled = True
        self.process.cancel()

    def poll(self) -> list[dict[str, Any]]:
        """New events; sets :attr:`finished` once the process has ended and all its output is read.

        Raises:
            RuntimeError: when the process ended with an error (and was not cancelled), with the
                engine's own message where it gave one.
        """
        # Read the exit status first: events written just before the exit are then in this poll.
        code = self.process.returncode
        events = self.process.poll()
        for event in events:
            if event.get("event") == "error":
                self.error = event.get("message")
            elif event.get("event") == "done":
                self.done = event
        if code is None:
            return events
        self.finished = True
        if code != 0 and not self.cancelled:
            message = self.error or getattr(self.process, "error_message", None)
            if not message:
                lines = [line for line in self.log.splitlines() if line.strip()]
                message = f"{self.what} stopped with exit status {code}" + (f": {lines[-1]}" if lines else "")
            raise RuntimeError(message)
        return events

    @property
    def log(self) -> str:
        return getattr(self.process, "log", "")


def describe_event(event: dict[str, Any]) -> tuple[int | None, str]:
    """Progress (0-100, or None to leave it) and a status line for one engine event."""
    kind = event.get("event")
    if kind in ("epoch", "step"):
        total = event.get("total_steps") or 0
        progress = int(100 * event.get("step", 0) / total) if total else None
        if event.get("label") == "predict":
            return progress, "Segmenting the volume..."
        text = f"Training: epoch {event.get('epoch', '?')}/{event.get('epochs', '?')}"
        if "loss" in event:
            text += f", loss {float(event['loss']):.3f}"
        dice = event.get("val_dice")
        if dice:
            text += ", validation Dice " + ", ".join(f"{name} {value:.3f}" for name, value in dice.items())
        return progress, text + remaining_text(event.get("eta_s"))
    if kind == "start":
        doing = "Segmenting" if event.get("label") == "predict" else "Training"
        return 0, f"{doing} on {event.get('device', '?')}..."
    if kind == "phase":
        return None, f"Training: {event.get('name', '')}"
    if kind == "warning":
        return None, f"Warning: {event.get('message', '')}"
    if kind == "message":
        return None, str(event.get("message", ""))
    if kind == "checkpoint":
        return None, ""
    if kind == "error":
        return None, f"Error: {event.get('message', '')}"
    return None, ""


def remaining_text(eta_seconds: float | None) -> str:
    if not eta_seconds or eta_seconds <= 0:
        return ""
    if eta_seconds < 60:
        return ", less than a minute left"
    return f", about {round(eta_seconds / 60)} min left"
