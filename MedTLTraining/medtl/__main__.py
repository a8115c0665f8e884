"""``python -m medtl`` (also ``PythonSlicer -m medtl`` inside Slicer)."""

from medtl.cli import main

raise SystemExit(main())
