"""A run folder is written by one run at a time, and never replaced without being asked.

``medtl train`` takes the folder with :func:`run_folder`: a folder that holds another run is an
error unless the user resumes it or asks to overwrite it; a lock file with the owner's process id
makes a second run into the same folder a clear error (a lock left by a process that is gone is
taken over); ``--resume`` checks the checkpoint before anything is written. A run that fails
before its first checkpoint removes the folder it made; one that fails later keeps its checkpoint
(for ``--resume``) and says so in ``failed.json``.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with RunLock(folder):
    ...     (folder / LOCK).is_file()
    True
    >>> (folder / LOCK).exists()
    False
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtl.data.checks import check_free_space
from medtl.errors import DataError, MedTLError, OutputError

LOCK = ".medtl.lock"
FAILED = "failed.json"
CHECKPOINT = "checkpoint.pt"  # as medtl.train names them (that module needs torch)
BEST = "best.pt"
# What a finished or started run leaves; config.json counts unless it is the config being run.
RUN_FILES = (CHECKPOINT, BEST, "metrics.json", "model")
# What --overwrite clears (only MedTL's own files: output_dir may hold the user's other files).
OVERWRITTEN = (CHECKPOINT, BEST, "metrics.json", "events.jsonl", "training.png", "report.html", "model_card.json")
# The fields that make a checkpoint's network and labels; the rest (epochs, lr ...) may change on resume.
IDENTITY = ("task", "model.name", "data.label_names", "data.multi_label", "preprocessing.context_slices")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class RunLock:
    """``.medtl.lock`` in ``folder`` (created if missing) while the block runs.

    The lock holds the owner's process id and host. A lock whose process no longer runs on this
    host is stale and taken over; a live one is an error naming its process.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.held = False

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if pid == os.getpid() and host == socket.gethostname():
                    return  # this process holds it already (a run inside a run)
                if isinstance(pid, int) and (host != socket.gethostname() or _alive(pid)):
                    where = f" on {host}" if host != socket.gethostname() else ""
                    raise OutputError(
                        f"{self.folder}: another medtl run (process {pid}{where}) is writing to this folder; "
                        f"wait for it to end or choose another output_dir (if it is gone, delete {self.path})"
                    ) from None
                # Stale (its process is gone, or the file is unreadable): take it over. Two takers
                # race only to the unlink; O_EXCL lets one of them create the new lock.
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(record)
            self.held = True
            return
        raise OutputError(f"{self.folder}: could not take the lock {self.path}; another run is starting there")

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _field(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def check_resume(run_dir: str | Path, cfg, *, require: bool = True) -> None:
    """Before a resumed run writes anything: the checkpoint loads as a weights-only file, and the
    run's saved configuration trains the same network on the same labels as ``cfg``.

    ``require``: a missing checkpoint is an error (``medtl train --resume``); cross-validation
    resumes folds that may not have started.
    """
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        if require:
            raise DataError(f"--resume: {run_dir} holds no {CHECKPOINT} to resume from; start without --resume")
        return
    saved_path = run_dir / "config.json"
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as err:
            raise DataError(f"--resume: {saved_path} is damaged ({err}); the run cannot be resumed") from None
        try:  # the saved file may leave fields at their defaults
            saved = type(cfg).from_dict(saved).to_dict()
        except MedTLError:
            pass  # compared as it is
        wanted = cfg.to_dict()
        changed = [name for name in IDENTITY if _field(saved, name) != _field(wanted, name)]
        if changed:
            raise DataError(
                f"--resume: {run_dir} was trained with other "
                + ", ".join(f"{n} ({_field(saved, n)!r}, now {_field(wanted, n)!r})" for n in changed)
                + "; resume with the run's own config.json, or start a new output_dir"
            )
    import torch

    try:
        # mmap: the tensors are not read, only the file's structure and pickle are checked.
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, a pickle that is not weights-only, random bytes
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DataError(f"--resume: {ckpt} is damaged or not a MedTL checkpoint ({first})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch"} <= set(state):
        raise DataError(f"--resume: {ckpt} is not a MedTL checkpoint (no model, optimizer and epoch)")


def run_bytes(cfg) -> int:
    """Roughly what a run writes at most: the checkpoint (weights and AdamW's two moments) and its
    temporary copy while it is replaced, the best epoch's weights and the package."""
    import torch

    from medtl.models.registry import build_model

    with torch.device("meta"):  # shapes only: nothing is allocated, loaded or downloaded
        model = build_model(cfg.model.name, num_classes=cfg.num_classes, pretrained="none")
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return 8 * weights


def holds_run(run_dir: Path, config_file: Path | None) -> list[str]:
    """The run files in ``run_dir``. A config.json does not count when it is the config being run,
    or when it is all a run that failed before its first checkpoint left (it may be retried)."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    config = run_dir / "config.json"
    same = config_file is not None and config_file.exists() and config.is_file() and config.samefile(config_file)
    failed_early = (run_dir / FAILED).is_file() and not found
    if config.is_file() and not same and not failed_early:
        found.insert(0, "config.json")
    return found


def _clear(run_dir: Path) -> None:
    for name in OVERWRITTEN + (FAILED,):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    package = run_dir / "model"
    if (package / "medtl_package.json").is_file():
        shutil.rmtree(package)


@contextlib.contextmanager
def run_folder(
    run_dir: str | Path,
    cfg,
    *,
    resume: bool = False,
    overwrite: bool = False,
    config_file: str | Path | None = None,
) -> Iterator[Path]:
    """The run folder, checked, locked and ready for ``medtl train`` (see the module docstring).

    ``config_file``: the config being run; the Slicer module writes it into the run folder
    itself, so it does not count as another run's.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"output_dir {run_dir}: is a file, not a folder")
    if resume and overwrite:
        raise OutputError("--resume continues the run in output_dir and --overwrite replaces it: choose one")
    created = not run_dir.exists()
    check_free_space(run_dir, run_bytes(cfg), what="the run (checkpoints and model package)")
    if resume:
        check_resume(run_dir, cfg)
    elif not overwrite and not created:
        found = holds_run(run_dir, Path(config_file) if config_file else None)
        if found:
            raise OutputError(
                f"output_dir {run_dir} already holds a run ({', '.join(found)}); continue it with --resume, "
                "replace it with --overwrite, or choose another output_dir"
            )
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        if overwrite and not created:
            _clear(run_dir)
        with contextlib.suppress(FileNotFoundError):
            (run_dir / FAILED).unlink()  # this attempt's outcome replaces the last one's
        yield run_dir
    except BaseException as err:
        _failed(run_dir, err, created=created)
        raise
    finally:
        lock.release()


def _failed(run_dir: Path, err: BaseException, *, created: bool) -> None:
    """A folder this run made and left without a checkpoint goes; otherwise ``failed.json`` says
    what happened (and whether ``--resume`` can continue)."""
    resumable = (run_dir / CHECKPOINT).is_file()
    if created and not resumable:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    interrupted = isinstance(err, KeyboardInterrupt)
    message = "interrupted" if interrupted else (str(err) if isinstance(err, MedTLError) else repr(err))
    record = {"failed": not interrupted, "interrupted": interrupted, "message": message, "resumable": resumable}
    with contextlib.suppress(OSError):  # a full disk may not take even this
        (run_dir / FAILED).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
