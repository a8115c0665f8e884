"""The event sinks a command opens, kept so that its end (done, error, interrupt) reaches each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medtl.events import EventSink, TerminalProgress


class CommandSinks:
    """Opens sinks as ``--events`` and ``--quiet`` ask; :meth:`record` and :meth:`close` reach
    every sink opened so far. ``medtl.cli.main`` puts one on ``args.sinks`` for the command."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.opened: list[EventSink] = []

    def open(self, run_file: Path | None = None) -> EventSink:
        """A sink to stdout (``--events -``), a file (``--events FILE``, else ``run_file``), with a
        progress bar on stderr unless the stream goes to stdout or ``--quiet``."""
        listeners = []
        stream = None
        if self.args.events == "-":
            stream = sys.stdout
        elif not self.args.quiet:
            listeners.append(TerminalProgress(sys.stderr))
        path = run_file
        if self.args.events not in (None, "-"):
            path = Path(self.args.events)
        self.opened.append(EventSink(stream=stream, path=path, listeners=listeners))
        return self.opened[-1]

    def record(self, event: str, message: str) -> None:
        """The end of the command, for the run's events.jsonl and the Slicer module's stream."""
        to_stdout = getattr(self.args, "events", None) == "-"
        for sink in self.opened:
            if any(getattr(listener, "_open_line", False) for listener in sink.listeners):
                print(file=sys.stderr)  # end the progress bar's line
            try:
                sink.emit(event, message=message)
            except (OSError, ValueError):  # a full disk, or a sink closed already
                pass
            to_stdout = to_stdout and sink.stream is not sys.stdout
        if to_stdout:
            print(json.dumps({"event": event, "message": message}), flush=True)

    def close(self) -> None:
        for sink in self.opened:
            sink.close()
