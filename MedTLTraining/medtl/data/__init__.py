"""Data: image I/O with geometry, dataset CSVs, intensity presets, slice sampling, demo data."""
