"""The engine as a separate process: start it, read its JSON-lines events, stop it.

The Slicer modules never run training in Slicer's own process: the engine runs as
``python -m medtl ... --events -`` (``PythonSlicer`` inside Slicer), the GUI polls
:meth:`EngineProcess.poll` from a timer and stays responsive.

Stopping has to reach the real engine. Inside Slicer ``PythonSlicer`` is CTKAppLauncher, which
starts the real Python as its own child and forwards no signal: terminating the process we
started leaves training running. So :meth:`EngineProcess.cancel` first asks the engine to stop
(it creates the file named in ``MEDTL_STOP_FILE``, which the engine checks at every step and then
exits with :data:`medtl.stop.CANCELLED_EXIT_CODE`), and after a grace period kills the whole
process tree: the engine runs in its own process group (POSIX) or its own Windows process group,
which the launcher, the real Python and its data-loader workers share. Cancel returns at once;
the waiting happens on a background thread. The engine's checkpoints are written atomically, so
``--resume`` goes on from the last one.

:class:`EngineRun` is the small interface the modules depend on, so tests can drive the real
engine in a real child process or replace it.

Example:
    >>> import sys
    >>> run = EngineProcess(["models"], python=sys.executable)
    >>> run.wait(60)
    0
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from medtl.stop import CANCELLED_EXIT_CODE, STOP_FILE_ENV

# Windows process creation (the values of subprocess's constants, which exist only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0

# How long a cancelled engine may take to reach its next step and exit before its tree is killed.
DEFAULT_GRACE_S = 10.0


def _engine_dir() -> Path:
    # Installed extension: medtl/ sits beside MedTLExtensionLib/ in qt-scripted-modules.
    # Source tree: <repo>/MedTLTraining/medtl.
    here = Path(__file__).resolve().parents[1]
    for candidate in (here, here.parent / "MedTLTraining"):
        if (candidate / "medtl" / "__init__.py").is_file():
            return candidate
    return here


ENGINE_DIR = _engine_dir()


def popen_options(*, windows: bool | None = None) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments that start a process as Slicer starts its tools.

    Windows: a hidden console (as ``slicer.util.launchConsoleProcess``), inherited by the real Python
    that the launcher starts, so no window flashes up; a new process group, so the tree can be killed
    without touching Slicer. POSIX: a new session, whose process group holds the launcher, the engine
    and its workers, and which a terminal's Ctrl+C in Slicer's console does not reach.

    Args:
        windows: build the Windows options (default: on Windows).
    """
    windows = os.name == "nt" if windows is None else windows
    if not windows:
        return {"start_new_session": True}
    options: dict[str, Any] = {"creationflags": CREATE_NEW_PROCESS_GROUP}
    if hasattr(subprocess, "STARTUPINFO"):
        # Hidden rather than no console (CREATE_NO_WINDOW): the launcher's console-mode child would
        # otherwise open a console window of its own.
        info = subprocess.STARTUPINFO()
        info.dwFlags |= STARTF_USESHOWWINDOW
        info.wShowWindow = SW_HIDE
        options["startupinfo"] = info
    return options


def engine_environment(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: ``base`` (default: this process's), ``extra``, and the engine on the path.

    Args:
        extra: variables to add or replace.
        base: the environment to start from; inside Slicer :func:`slicer_startup_environment`, since
            ``PythonSlicer`` sets up Slicer's own paths itself.
    """
    env = {**(os.environ if base is None else base), **(extra or {})}
    # The engine must be importable in the child even when it is not pip-installed (Slicer).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_DIR), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    # Apple Silicon: operators MPS lacks run on the CPU; torch reads this when it loads.
    env.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    return env


def slicer_startup_environment() -> dict[str, str] | None:
    """The environment Slicer was started in (what ``slicer.util.launchConsoleProcess`` gives a
    launcher), or ``None`` outside a Slicer application (scripts, tests on slicer-core)."""
    try:
        import slicer.util

        if getattr(slicer, "app", None) is None:
            return None
        return dict(slicer.util.startupEnvironment())
    except (ImportError, AttributeError):
        return None


def kill_tree(process: subprocess.Popen) -> None:
    """Kills ``process`` and everything it started (started with :func:`popen_options`).

    POSIX: the process group, which outlives the launcher when only the launcher has ended. Windows:
    psutil where installed, else ``taskkill /T``. Never blocks on the processes themselves.
    """
    if os.name != "nt":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(process.pid)
            family = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            return
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                member.kill()
        return
    subprocess.run(
        ["taskkill", "/F", "/T", "/PID", str(process.pid)],
        capture_output=True,
        check=False,
        **{k: v for k, v in popen_options().items() if k == "startupinfo"},
    )


# Engines still running when Slicer (or a script) exits are killed with it.
_LIVE: weakref.WeakSet[EngineProcess] = weakref.WeakSet()


@atexit.register
def _kill_live_engines() -> None:
    for run in list(_LIVE):
        run.kill()


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
        python: the interpreter (inside Slicer: the ``PythonSlicer`` launcher).
        env: extra environment variables.
        base_env: the environment to add them to (default: this process's).
        log_lines: how many non-event output lines to keep for :attr:`log`.
        grace_s: how long :meth:`cancel` lets the engine stop by itself before killing its tree.
        requests: give the engine a request folder (``--requests DIR``) for :meth:`send` (the warm
            engine, ``medtl serve``). A folder, not stdin: CTKAppLauncher does not hand its stdin
            to the Python it starts, as it forwards no signal.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        base_env: Mapping[str, str] | None = None,
        log_lines: int = 400,
        grace_s: float = DEFAULT_GRACE_S,
        requests: bool = False,
    ) -> None:
        from medtl.events import parse_line  # the protocol's one parser, shared with the engine

        self._parse = parse_line
        args = list(args)
        if "--events" not in args and args and args[0] in ("train", "predict", "demo", "adapt"):
            args += ["--events", "-"]
        self.requests_dir: Path | None = None
        self._sent = 0
        if requests:
            self.requests_dir = Path(tempfile.mkdtemp(prefix="medtl-requests-"))
            args += ["--requests", str(self.requests_dir)]
        self.args = args
        self.grace_s = grace_s
        # Only created on cancel; unique per run so that two engines never stop each other.
        self.stop_file = Path(tempfile.gettempdir()) / f"medtl-stop-{uuid.uuid4().hex}"
        full_env = engine_environment({**(env or {}), STOP_FILE_ENV: str(self.stop_file)}, base=base_env)
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._log: deque[str] = deque(maxlen=log_lines)
        self.error_message: str | None = None
        self.cancel_requested = False
        self._process = subprocess.Popen(
            [python or sys.executable, "-m", "medtl", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=full_env,
            **popen_options(),
        )
        _LIVE.add(self)
        self._readers = [
            threading.Thread(target=self._read, args=(self._process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def send(self, request: Mapping[str, Any]) -> bool:
        """Hands the engine one request (a file in its request folder, read in order of sending);
        False when the engine has ended or was started without ``requests``."""
        import json

        folder = self.requests_dir
        if folder is None or self._process.poll() is not None:
            return False
        self._sent += 1
        path = folder / f"{self._sent:08d}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(dict(request)) + "\n", encoding="utf-8")
            os.replace(tmp, path)  # the engine reads whole requests only
        except OSError:
            return False
        return True

    @property
    def pid(self) -> int:
        """The process started (inside Slicer: the launcher, not the engine)."""
        return self._process.pid

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
        if code is not None:
            self._finished()
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

    def cancel(self, grace_s: float | None = None) -> None:
        """Stops the engine without blocking: asks it to stop at its next step, and kills its whole
        process tree if it has not ended ``grace_s`` seconds later (default: :attr:`grace_s`).

        :attr:`returncode` becomes available once it has ended; ``grace_s=0`` kills at once.
        """
        if self._process.poll() is not None and not self._tree_may_live():
            return
        self.cancel_requested = True
        with contextlib.suppress(OSError):
            self.stop_file.touch()
        grace = self.grace_s if grace_s is None else grace_s
        if grace <= 0:
            self.kill()
            return
        threading.Thread(target=self._stop_or_kill, args=(grace,), daemon=True, name="medtl-cancel").start()

    def kill(self) -> None:
        """Kills the whole process tree now (application exit; never waits for the processes)."""
        self.cancel_requested = True
        kill_tree(self._process)

    def _stop_or_kill(self, grace_s: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(grace_s)
        # Also after a clean exit: workers or an engine whose launcher ended must not stay behind.
        kill_tree(self._process)

    def _tree_may_live(self) -> bool:
        # The launcher can end while the engine it started goes on: the readers' pipes stay open.
        return any(r.is_alive() for r in self._readers)

    def _finished(self) -> None:
        _LIVE.discard(self)
        with contextlib.suppress(OSError):
            self.stop_file.unlink(missing_ok=True)
        if self.requests_dir is not None:
            import shutil

            shutil.rmtree(self.requests_dir, ignore_errors=True)

    def wait(self, timeout: float | None = None) -> int:
        code = self._process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        self._finished()
        return code


def start_engine(args: Sequence[str], *, requests: bool = False) -> EngineProcess:
    """Starts ``medtl <args>`` with the interpreter that sees Slicer's Python packages.

    Inside Slicer that is ``PythonSlicer`` (a launcher, given the environment Slicer started in, as
    ``slicer.util.launchConsoleProcess`` does); elsewhere (tests, scripts) the current interpreter.
    ``requests``: keep a pipe to its stdin (the warm engine).
    """
    import shutil

    launcher = shutil.which("PythonSlicer")
    return EngineProcess(
        list(args),
        python=launcher or sys.executable,
        base_env=slicer_startup_environment() if launcher else None,
        requests=requests,
    )


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
        """Stops the engine without waiting; :meth:`poll` reports the end once it has gone."""
        self.cancelled = True
        self.process.cancel()

    def kill(self) -> None:
        """Kills the engine's process tree now (module cleanup, application exit)."""
        self.cancelled = True
        kill = getattr(self.process, "kill", None)
        if kill is not None:
            kill()
        else:
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
        # A stop the engine recognised (asked for here, or through its stop file by someone else).
        self.cancelled = self.cancelled or code == CANCELLED_EXIT_CODE
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
    if kind == "plan":
        return 0, f"Estimate: {event.get('message', '')}"
    if kind == "preview":
        loss = event.get("loss")
        return None, f"Learning: preview after {event.get('step', '?')} steps" + (
            f", loss {float(loss):.3f}" if loss is not None else ""
        )
    if kind == "warning":
        return None, f"Warning: {event.get('message', '')}"
    if kind == "message":
        return None, str(event.get("message", ""))
    if kind == "checkpoint":
        return None, ""
    if kind == "cancelled":
        return None, "Stopped; the last checkpoint is kept."
    if kind == "error":
        return None, f"Error: {event.get('message', '')}"
    return None, ""


def remaining_text(eta_seconds: float | None) -> str:
    if not eta_seconds or eta_seconds <= 0:
        return ""
    if eta_seconds < 60:
        return ", less than a minute left"
    return f", about {round(eta_seconds / 60)} min left"
