"""report.html: rendered from medtl/templates with autoescaping, and shipped with the package."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import tomllib
from medtl.report import write_report

ROOT = Path(__file__).resolve().parents[2]


def _card(name: str) -> dict:
    interval = {"mean": 0.9, "ci95": [0.8, 1.0], "n": 4}
    return {
        "kind": "evaluation",
        "created": "2026-01-01",
        "software": {"medtl": "test"},
        "intended_use": "research",
        "model": {"name": "unet", "spatial_dims": 2, "task": "segmentation", "labels": [{"value": 1, "name": name}]},
        "training_data": {"cases": 2, "files": 4, "combined_sha256": "f" * 64, "groups": {"site": {name: 2}}},
        "evaluation_data": None,
        "metrics": {"task": "segmentation", "cases": 4, "metrics": {name: {"dice": interval}}},
        "fairness": [
            {
                "column": "site",
                "groups": {"A": {"cases": 2, name: {"dice": interval, "hd95_mm": None}}},
                "dice_gap": {name: 0.125},
                "warnings": [],
            }
        ],
        "limitations": [],
        "configuration": {"card": {"include_identifiers": False}},
    }


def test_the_report_escapes_what_the_data_names_and_shows_each_section(tmp_path):
    name = "<script>alert(1)</script>"
    html_path, _ = write_report(tmp_path, _card(name), title="T", metrics_rows={"epochs": 3})
    html = html_path.read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "0.900 [0.800, 1.000] (n=4)" in html  # the interval filter
    assert "<tr><th>epochs</th><td>3</td></tr>" in html
    assert "Largest gap in mean Dice between groups:" in html and "0.125" in html
    assert "Cases per site: &lt;script&gt;alert(1)&lt;/script&gt; 2" in html
    assert "<p>No separate evaluation data.</p>" in html and "No plots." in html


def test_every_template_ships_with_the_pip_package():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medtl"]
    package = ROOT / "MedTLTraining" / "medtl"
    templates = [p.relative_to(package).as_posix() for p in (package / "templates").iterdir()]
    assert templates
    for template in templates:
        assert any(fnmatch.fnmatch(template, g) for g in globs), f"{template} is not in pyproject's package-data"
