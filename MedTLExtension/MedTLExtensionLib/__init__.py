"""Slicer-side library of MedTL: MRML <-> arrays, the engine process, the learn-from-slices loop,
the training run.

Names are imported on first use, so that modules of this package that do not need MRML
can be imported where ``slicer`` is not available.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LABEL_VALUE_TAG": "mrml_bridge",
    "MAX_LABEL_VALUE": "mrml_bridge",
    "SegmentSpec": "mrml_bridge",
    "array_to_volume": "mrml_bridge",
    "labelmap_to_segmentation": "mrml_bridge",
    "segmentation_to_labelmap": "mrml_bridge",
    "volume_to_array": "mrml_bridge",
    "EngineJob": "engine_process",
    "EngineProcess": "engine_process",
    "EngineRun": "engine_process",
    "WarmEngine": "warm_engine",
    "PreviewOverlay": "live_preview",
    "LearningOptions": "slice_learning",
    "SliceLearner": "slice_learning",
    "TrainingRun": "training_run",
    "HeadlessScene": "headless_scene",
    "create_headless_scene": "headless_scene",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
