"""The run folders the MedTL module leaves under its work folder, and their clean-up.

Every Learn, Apply and Adapt writes a run folder (a learning run keeps its model package there, so
the next round and "Apply model" can use it). They pile up; :func:`clean_run_folders` removes the
ones no longer needed. Only folders MedTL itself named (``YYYYmmdd-HHMMSS-learn|apply|adapt-...``)
directly under the work folder are candidates, and a folder holding something still in use (the
model package the module points at, a running job's folder) is always kept.

Example:
    >>> import tempfile
    >>> clean_run_folders(tempfile.mkdtemp()).removed
    []
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CleanUp", "RunFolder", "clean_run_folders", "run_folders"]

RUN_NAME = re.compile(r"\d{8}-\d{6}-(learn|apply|adapt)-[\w-]+(~\d+)?")


@dataclass(frozen=True)
class RunFolder:
    """One run folder: its path, what made it, its size in bytes and when it last changed."""

    path: Path
    kind: str
    size: int
    modified: float


@dataclass
class CleanUp:
    """What :func:`clean_run_folders` removed and kept."""

    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    freed: int = 0  # bytes


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def run_folders(work_root: str | Path) -> list[RunFolder]:
    """MedTL's run folders under ``work_root``, oldest first."""
    root = Path(work_root)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = RUN_NAME.fullmatch(folder.name)
        if match is None or not folder.is_dir() or folder.is_symlink():
            continue
        newest = max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.rglob("*"))])
        found.append(RunFolder(path=folder, kind=match.group(1), size=_size(folder), modified=newest))
    return sorted(found, key=lambda run: run.modified)


def clean_run_folders(
    work_root: str | Path,
    *,
    keep: Iterable[str | Path | None] = (),
    older_than_s: float = 0.0,
    dry_run: bool = False,
) -> CleanUp:
    """Removes MedTL's run folders under ``work_root`` except those still in use.

    Args:
        work_root: the module's work folder.
        keep: paths still in use (a model package, a running job's folder); the run folder that is,
            or contains, any of them stays.
        older_than_s: only folders unchanged for at least this long.
        dry_run: only say what would be removed.

    Returns:
        What was (or would be) removed and kept, and the bytes freed.
    """
    kept_paths = [Path(p).resolve() for p in keep if p is not None and str(p) not in ("", ".")]
    result = CleanUp()
    now = time.time()
    for run in run_folders(work_root):
        folder = run.path.resolve()
        in_use = any(p == folder or folder in p.parents for p in kept_paths)
        if in_use or now - run.modified < older_than_s:
            result.kept.append(run.path)
            continue
        if not dry_run:
            shutil.rmtree(run.path)
        result.removed.append(run.path)
        result.freed += run.size
    return result
