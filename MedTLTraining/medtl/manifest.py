"""A model package's manifest (its file names and the reader), apart from :mod:`medtl.package` so
that reading a package's weights (:mod:`medtl.models.weights`) needs no network registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtl.errors import DataError

MANIFEST = "medtl_package.json"
WEIGHTS = "model.safetensors"


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{path}: not a MedTL model package (no {MANIFEST})")
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{manifest_path}: not valid JSON (line {err.lineno})") from None
