"""A model package's manifest (its file names, the reader, its labels, the software versions it
records), apart from :mod:`medtl.package` so that reading a package's weights
(:mod:`medtl.models.weights`) needs no network registry, and below both :mod:`medtl.package` (one
network) and :mod:`medtl.ensemble` (several), which share it."""

from __future__ import annotations

import json
import platform
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


class PackageLabels:
    """Label values, names and colours as a package's manifest lists them (single models and
    ensembles alike)."""

    manifest: dict[str, Any]

    @property
    def labels(self) -> list[dict[str, Any]]:
        return self.manifest["labels"]

    def segments(self) -> list[tuple[int, str, tuple[float, float, float]]]:
        return [(e["value"], e["name"], tuple(e["color"])) for e in self.labels if e["value"] != 0]


def versions() -> dict[str, str]:
    """The software a package is written with, for its manifest."""
    # Imported here: reading a manifest must not load torch (medtl.cli stays light).
    import monai
    import SimpleITK as sitk
    import torch
    import torchvision

    import medtl

    return {
        "medtl": medtl.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "monai": monai.__version__,
        "SimpleITK": sitk.Version.VersionString(),
        "python": platform.python_version(),
    }
