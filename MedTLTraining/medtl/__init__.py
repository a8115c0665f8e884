"""MedTL engine: transfer learning for medical images (pure Python, no Slicer imports)."""

__version__ = "0.1.0"
