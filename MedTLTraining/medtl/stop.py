"""Cooperative stop: the caller asks the engine to stop by creating a file, the engine sees it at
its next training step and exits with :data:`CANCELLED_EXIT_CODE`.

A file, not a signal: inside Slicer the engine's parent is CTKAppLauncher (``PythonSlicer``), which
forwards no signal to the Python it starts, and Windows has no SIGTERM a process can catch. The
caller names the file in the environment variable ``MEDTL_STOP_FILE`` (or ``medtl train
--stop-file``); checking it is one ``stat`` per step. The engine stops between steps, so the last
checkpoint (written atomically after every epoch) is intact and ``--resume`` continues from it.

This module is torch-free: the Slicer side imports it for the exit code.

Example:
    >>> import os, tempfile
    >>> os.environ[STOP_FILE_ENV] = os.path.join(tempfile.mkdtemp(), "stop")
    >>> stop_requested()
    False
    >>> open(os.environ[STOP_FILE_ENV], "w").close()
    >>> stop_requested()
    True
    >>> del os.environ[STOP_FILE_ENV]
"""

from __future__ import annotations

import os

STOP_FILE_ENV = "MEDTL_STOP_FILE"
# Neither success, nor the 2 of a user error, nor the 130 of Ctrl+C: a caller can tell a stop it
# asked for from a failure.
CANCELLED_EXIT_CODE = 3


class Cancelled(Exception):  # noqa: N818 - reads as what happened, like KeyboardInterrupt
    """Raised in the engine when a stop was requested; the command line exits with
    :data:`CANCELLED_EXIT_CODE`."""


def stop_file() -> str | None:
    """The stop file this process watches, or ``None`` when no one can ask it to stop."""
    return os.environ.get(STOP_FILE_ENV) or None


def stop_requested() -> bool:
    """True once the stop file exists."""
    path = stop_file()
    return path is not None and os.path.exists(path)


def check_stop(where: str = "") -> None:
    """Raises :class:`Cancelled` when a stop was requested.

    Args:
        where: what was running, for the message (e.g. ``"epoch 3"``).
    """
    if stop_requested():
        raise Cancelled(f"stopped on request{f' during {where}' if where else ''}")
