"""The JSON-lines progress protocol shared by the command line and the Slicer module.

Every event is one JSON object on one line with at least ``"event"`` and ``"time"``. Known events:

- ``start``: ``run_dir``, ``total_steps``, ``device``
- ``epoch``: ``epoch``, ``epochs``, ``step``, ``total_steps``, ``loss``, ``lr``, ``eta_s``
- ``phase``: ``name`` (e.g. a strategy switching from feature extraction to fine-tuning)
- ``checkpoint``: ``path``, ``epoch``
- ``warning``: ``message``
- ``done``: ``run_dir`` plus results (``package``, ``metrics``)
- ``error``: ``message``
- ``cancelled``: ``message`` (a requested stop, see :mod:`medtl.stop`)

Example:
    >>> sink = EventSink(stream=None)
    >>> sink.emit("epoch", epoch=1, loss=0.5)["event"]
    'epoch'
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

Listener = Callable[[dict[str, Any]], None]


class EventSink:
    """Writes events as JSON lines to a stream and/or file and forwards them to listeners.

    Args:
        stream: where JSON lines go (``None`` for nowhere).
        path: an ``events.jsonl`` file to append to (the run directory's record).
        listeners: callables that receive every event dict (e.g. a terminal progress bar).
    """

    def __init__(
        self,
        *,
        stream: IO[str] | None = None,
        path: str | Path | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        self.stream = stream
        self.listeners = list(listeners)
        self._file = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, default=_jsonable)
        for out in (self.stream, self._file):
            if out is not None:
                out.write(line + "\n")
                out.flush()
        for listener in self.listeners:
            listener(record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def parse_line(line: str) -> dict[str, Any] | None:
    """Parses one line of the stream; returns ``None`` for lines that are not events (logs)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


class TerminalProgress:
    """Renders progress as a one-line bar with loss and ETA.

    On a terminal the bar is redrawn at every step; in a log file (``live=False``, the default
    when the stream is not a TTY) one line is written per epoch instead.
    """

    def __init__(self, stream: IO[str] = sys.stderr, width: int = 30, live: bool | None = None) -> None:
        self.stream = stream
        self.width = width
        self.live = stream.isatty() if live is None else live
        self._open_line = False

    def __call__(self, record: dict[str, Any]) -> None:
        kind = record["event"]
        if kind == ("step" if self.live else "epoch") and record.get("total_steps"):
            frac = min(1.0, record["step"] / record["total_steps"])
            filled = int(round(frac * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            parts = [f"\r{record.get('label', 'train'):>12} [{bar}] {100 * frac:5.1f}%"]
            # Only what the event carries: prediction progress has no epoch or loss.
            if "epoch" in record:
                parts.append(f"epoch {record['epoch']}/{record.get('epochs', '?')}")
            if "loss" in record:
                parts.append(f"loss {record['loss']:.4f}")
            if record.get("eta_s") is not None:
                parts.append(f"ETA {_fmt_s(record['eta_s']):>6}")
            text = "  ".join(parts)
            self.stream.write(text if self.live else text[1:] + "\n")
            self.stream.flush()
            self._open_line = self.live
        elif kind in ("phase", "warning", "done", "message"):
            self._end_line()
            text = record.get("message") or record.get("name") or ""
            if kind == "warning":
                text = "warning: " + text
            if text:
                self.stream.write(text + "\n")
                self.stream.flush()

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
