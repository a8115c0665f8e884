"""What a model was trained or evaluated on, without naming anyone: file hashes, case counts per
site and group, and label statistics, for the model card.

File names and identifier-like columns (patient, subject, MRN, accession ...) are left out unless
the caller asks for them: a file called ``Smith_John_1961.nii.gz`` must not travel with a model.

Example:
    >>> identifier_column("PatientID"), identifier_column("site"), identifier_column("sex")
    (True, False, False)
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medtl.config import RunConfig
from medtl.data.dataset import Case
from medtl.data.io import read_image, sha256_file

_IDENTIFIER = re.compile(r"(^|_|\b)(id|patient|subject|mrn|accession|study|series|uid|dob|birth)", re.I)
# A column with more distinct values than this is not a grouping (it would list individuals).
MAX_GROUP_VALUES = 20


def identifier_column(name: str) -> bool:
    """True for a column whose values may identify a person (never summarised unless asked)."""
    return bool(_IDENTIFIER.search(name)) or name.lower().endswith("id")


def group_columns(cases: Sequence[Case], *, include_identifiers: bool = False) -> list[str]:
    """The CSV's free columns that group cases (site, scanner, sex, age group): few distinct values,
    not identifier-like."""
    columns = sorted({k for c in cases for k in c.extra})
    out = []
    for column in columns:
        values = {(c.extra.get(column) or "").strip() for c in cases} - {""}
        if not values or (not include_identifiers and identifier_column(column)):
            continue
        if len(values) <= MAX_GROUP_VALUES and (len(values) < len(cases) or len(cases) <= 3):
            out.append(column)
    return out


def path_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a DICOM series folder: the combined hash of the files in it."""
    path = Path(path)
    if path.is_dir():
        return combined_sha256([sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()])
    return sha256_file(path)


def combined_sha256(hashes: Sequence[str]) -> str:
    """One hash for a set of files, independent of their order."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def data_provenance(
    cases: Sequence[Case],
    cfg: RunConfig,
    *,
    columns: Sequence[str] | None = None,
    include_identifiers: bool = False,
    hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Hashes (sorted, so no order betrays a name), counts per group value of ``columns`` (default:
    :func:`group_columns`), and label statistics of ``cases``.

    ``hashes`` maps a file path to its sha256 where it is already known (saves reading it twice).
    """
    hashes = dict(hashes or {})

    def digest(path) -> str:
        key = str(path)
        if key not in hashes:
            hashes[key] = path_sha256(path)
        return hashes[key]

    files = [digest(p) for c in cases for p in (c.image, c.label) if p is not None and p.exists()]
    columns = list(columns) if columns is not None else group_columns(cases, include_identifiers=include_identifiers)
    groups = {
        column: dict(sorted(Counter((c.extra.get(column) or "").strip() or "(missing)" for c in cases).items()))
        for column in columns
    }
    record: dict[str, Any] = {
        "cases": len(cases),
        "files": len(files),
        "sha256": sorted(files),
        "combined_sha256": combined_sha256(files),
        "groups": groups,
        "labels": _label_statistics(cases, cfg),
    }
    if include_identifiers:
        record["file_names"] = sorted(p.name for c in cases for p in (c.image, c.label) if p is not None)
    return record


def _label_statistics(cases: Sequence[Case], cfg: RunConfig) -> dict[str, Any]:
    names = cfg.data.label_names
    if cfg.is_classification:
        counts = Counter(t.strip() for c in cases for t in (c.target or "").split("|") if t.strip())
        return {"task": "classification", "cases_per_class": {n: counts.get(n, 0) for n in names}}
    per_class: dict[str, dict[str, Any]] = {n: {"cases_present": 0, "volume_ml": []} for n in names}
    for case in cases:
        if case.label is None:
            continue
        label = read_image(case.label)
        voxel_ml = float(np.prod(label.GetSpacing())) / 1000.0
        counts = np.bincount(sitk.GetArrayViewFromImage(label).ravel().astype(np.int64), minlength=len(names) + 1)
        for value, name in enumerate(names, start=1):
            if counts[value]:
                per_class[name]["cases_present"] += 1
                per_class[name]["volume_ml"].append(float(counts[value]) * voxel_ml)
    for entry in per_class.values():
        volumes = entry.pop("volume_ml")
        entry["volume_ml_median"] = float(np.median(volumes)) if volumes else None
        entry["volume_ml_range"] = [float(min(volumes)), float(max(volumes))] if volumes else None
    return {"task": "segmentation", "per_label": per_class}
