"""``python -m medtl`` (also ``PythonSlicer -m medtl`` inside Slicer)."""

from medtl.cli import run

raise SystemExit(run())
