"""Preprocessed arrays kept on disk, keyed by the input files' content and the preprocessing.

Reading, resampling and windowing a CT takes seconds; reading the result back takes a fraction
of that, and memory-mapped, costs no memory until the training reads it (the operating system
keeps what fits). Cross-validation folds, resumed runs and the next round of a study then skip
the preprocessing. A changed file, another preprocessing, another release of MedTL or of the
libraries that preprocess (SimpleITK resamples, MONAI windows) gives another key, so nothing stale
is read.

Example:
    >>> import tempfile, numpy as np
    >>> cache = PreprocessedCache(tempfile.mkdtemp())
    >>> made = []
    >>> def make():
    ...     made.append(1)
    ...     return {"image": np.ones((2, 3), np.float32)}
    >>> first = cache.arrays("k1", make)
    >>> again = cache.arrays("k1", make)
    >>> len(made), float(again["image"].sum())
    (1, 6.0)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the preprocessing code changes what it produces between releases: older entries are
# then never read.
CACHE_VERSION = 1


def cache_key(files: Sequence[str | Path], what: dict[str, Any]) -> str:
    """A key from the files' sha256 and a JSON-able description of what is made of them."""
    import monai
    import SimpleITK as sitk

    import medtl
    from medtl.provenance import path_sha256

    versions = [CACHE_VERSION, medtl.__version__, sitk.Version.VersionString(), monai.__version__]
    payload = {"version": versions, "files": [path_sha256(f) for f in files], "what": what}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class PreprocessedCache:
    """Named arrays per key, as ``.npy`` files under ``root/<key[:2]>/<key>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0

    def arrays(self, key: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays stored under ``key`` (memory-mapped copy-on-write: writable for code that
        expects it, while the files never change), made by ``make`` and stored first when there
        are none."""
        folder = self.root / key[:2] / key
        if not (folder / "complete").is_file():
            self.misses += 1
            arrays = make()
            self._store(folder, arrays)
            return arrays
        self.hits += 1
        return {f.stem: np.load(f, mmap_mode="c") for f in sorted(folder.glob("*.npy"))}

    def _store(self, folder: Path, arrays: dict[str, np.ndarray]) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Written beside, then renamed: a reader never sees half an entry, and of two processes
        # storing the same entry (torchrun ranks) one wins and the other's copy is dropped.
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name[:12]}-", dir=folder.parent))
        try:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
            (tmp / "complete").write_text("", encoding="utf-8")
            try:
                os.replace(tmp, folder)
            except OSError:
                if not (folder / "complete").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
