"""Dataset specification: a CSV with one row per case.

Columns: ``image`` (required), ``label`` (optional: unlabelled or target-domain cases; a label
map file for segmentation, class names for classification, several joined by ``|``), and free
columns (``site``, ``scanner``, ``sex`` ...) kept as ``extra`` for grouped splits, domains
and fairness. Relative paths are resolved against the CSV's folder.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "a.nrrd").write_bytes(b"")
    0
    >>> _ = (d / "set.csv").write_text("image,site\\na.nrrd,A\\n")
    >>> load_cases(d / "set.csv", require_labels=False)[0].extra
    {'site': 'A'}
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from medtl.errors import DataError


@dataclass
class Case:
    image: Path
    label: Path | None
    row: int
    extra: dict[str, str] = field(default_factory=dict)
    target: str | None = None  # classification: the label column's text (class names)


def load_cases(csv_path: str | Path, *, require_labels: bool = True, label_files: bool = True) -> list[Case]:
    """Reads and checks a dataset CSV; every problem names the file, the row and the field.

    With ``label_files=False`` (classification) the ``label`` column is text, kept as ``target``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"dataset CSV not found: {csv_path}")
    try:
        return _read_cases(csv_path, require_labels=require_labels, label_files=label_files)
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV (byte {err.start}); save it as UTF-8 CSV") from None


def _read_cases(csv_path: Path, *, require_labels: bool, label_files: bool) -> list[Case]:
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "image" not in columns:
            raise DataError(f"{csv_path}: needs an 'image' column (found: {', '.join(columns) or 'none'})")
        if require_labels and "label" not in columns:
            raise DataError(f"{csv_path}: needs a 'label' column for training")
        cases = []
        # Row numbers as a spreadsheet shows them: the header is row 1.
        for row_no, row in enumerate(reader, start=2):
            image = _resolve(csv_path, row_no, "image", row.get("image"))
            label_text = (row.get("label") or "").strip()
            if require_labels and not label_text and label_files:
                raise DataError(f"{csv_path}: row {row_no}, field 'label': empty")
            label = _resolve(csv_path, row_no, "label", label_text) if label_text and label_files else None
            extra = {k: v for k, v in row.items() if k not in ("image", "label") and k is not None}
            target = label_text if not label_files and "label" in columns else None
            cases.append(Case(image=image, label=label, row=row_no, extra=extra, target=target))
    if not cases:
        raise DataError(f"{csv_path}: no cases")
    return cases


def _resolve(csv_path: Path, row_no: int, column: str, value: str | None) -> Path:
    if not value or not value.strip():
        raise DataError(f"{csv_path}: row {row_no}, field '{column}': empty")
    path = Path(value.strip())
    if not path.is_absolute():
        path = csv_path.parent / path
    if not path.exists():
        raise DataError(f"{csv_path}: row {row_no}, field '{column}': file not found: {path}")
    return path
