"""The preprocessed-data cache: a second run on the same cases reads no image, trains the same
network, and a changed file or preprocessing is never served from the cache."""

from __future__ import annotations

import shutil

import numpy as np
import SimpleITK as sitk
import torch
from conftest import synthetic_case, tiny_config
from medtl.config import RunConfig
from medtl.data.dataset import load_cases
from medtl.events import EventSink
from medtl.pipeline import load_case_arrays, run_training
from safetensors.torch import load_file


def _cfg(csv, out, cache="", **preprocessing) -> RunConfig:
    return RunConfig.from_dict(
        tiny_config(
            csv,
            out,
            data={"cache_dir": str(cache), "val_fraction": 0.25},
            train={"epochs": 1, "steps_per_epoch": 2},
            preprocessing={"preset": "ct_abdomen", "patch_size": [32, 32], **preprocessing},
            model={"name": "unet_mobilenet_v2", "pretrained": "none"},
        )
    )


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_a_cached_run_reads_no_image_and_trains_the_same_network(tmp_path, synthetic_dataset, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset.parent, data)
    csv = data / "dataset.csv"
    cache = tmp_path / "cache"
    run_training(_cfg(csv, tmp_path / "plain"), events=EventSink())
    run_training(_cfg(csv, tmp_path / "first", cache), events=EventSink())
    entries = sorted(p for p in cache.glob("*/*") if (p / "complete").is_file())
    assert len(entries) == 4  # every case, training and validation, once

    def no_reading(path, **_options):
        raise AssertionError(f"read {path} although it is cached")

    with monkeypatch.context() as m:
        # Preprocessing a case starts by reading its image through this reader. (The run's report
        # reads the validation cases again to score them as `medtl evaluate` would.)
        m.setattr("medtl.case_data.read_checked_image", no_reading)
        run_training(_cfg(csv, tmp_path / "second", cache), events=EventSink())
    plain, first, second = (_weights(tmp_path / r) for r in ("plain", "first", "second"))
    for key, value in plain.items():
        torch.testing.assert_close(first[key], value, msg=key)
        torch.testing.assert_close(second[key], value, msg=key)

    # Cached arrays come back memory-mapped, labels in a compact integer type.
    case = load_cases(csv)[0]
    volume, labels = load_case_arrays(case, _cfg(csv, tmp_path / "x", cache))
    assert isinstance(volume, np.memmap) and labels.dtype == np.uint8
    fresh_volume, fresh_labels = load_case_arrays(case, _cfg(csv, tmp_path / "x"))
    np.testing.assert_array_equal(volume, fresh_volume)
    np.testing.assert_array_equal(labels, fresh_labels)

    # Another window, or the same file name with other contents, is another entry.
    load_case_arrays(case, _cfg(csv, tmp_path / "x", cache, window=[-100.0, 200.0]))
    image, _ = synthetic_case(11)
    sitk.WriteImage(image, str(case.image))
    changed, _ = load_case_arrays(case, _cfg(csv, tmp_path / "x", cache))
    assert not np.array_equal(changed, volume)
    assert len([p for p in cache.glob("*/*") if (p / "complete").is_file()]) == 6

    # So is another release of MedTL (its preprocessing may have changed).
    with monkeypatch.context() as m:
        m.setattr("medtl.__version__", "99.0")
        load_case_arrays(case, _cfg(csv, tmp_path / "x", cache))
    assert len([p for p in cache.glob("*/*") if (p / "complete").is_file()]) == 7
