"""What a dataset CSV row becomes for the network: the preprocessed image and label arrays of a
segmentation case, the target of a classification row, and the samples training draws from."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medtl.config import RunConfig
from medtl.data.checks import read_checked_image, read_checked_label
from medtl.data.dataset import Case
from medtl.data.geometry import SLICE_AXES, label_on_image_grid
from medtl.data.io import read_segment_names
from medtl.data.partial_labels import UNKNOWN, classes_from_segments, unpainted_slices_unknown
from medtl.data.slices import slice_items
from medtl.errors import DataError
from medtl.package import preprocess, working_image


def load_case_arrays(case: Case, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """The preprocessed image array and its label array (the smallest integer type that holds the
    labels; 255 where unknown), both canonically oriented; errors name the CSV row. A label on
    another grid than its image is an error (or resampled, ``data.resample_labels``). With
    ``data.cache_dir`` both come from the cache when the files and the preprocessing are unchanged."""

    def make() -> dict[str, np.ndarray]:
        image = read_checked_image(case.image, row=case.row, policy=cfg.preprocessing.nan_policy)
        labels = sitk.GetArrayFromImage(working_image(case_label_image(case, image, cfg), cfg, labels=True))
        return {"image": preprocess(image, cfg), "label": compact_labels(labels)}

    arrays = _cached(cfg, [case.image, case.label], "segmentation", make)
    labels = arrays["label"]
    check_label_values(labels, cfg, where=f"row {case.row}: label {case.label.name}")
    if cfg.data.labelled_slices and cfg.spatial_dims == 2:
        labels = unpainted_slices_unknown(labels, SLICE_AXES[cfg.preprocessing.slice_axis])
    return arrays["image"], labels


def check_label_values(labels: np.ndarray, cfg: RunConfig, *, where: str) -> np.ndarray:
    """The annotated values of ``labels``, after checking they are classes of ``data.label_names``
    (255 is unknown); the error says ``where``."""
    known = labels[labels != UNKNOWN]
    low, high = (int(known.min()), int(known.max())) if known.size else (0, 0)
    if low < 0 or high >= cfg.num_classes:
        raise DataError(
            f"{where} has values {low}..{high}, "
            f"but data.label_names defines 0..{cfg.num_classes - 1} ({UNKNOWN}: unknown)"
        )
    return known


def case_label_image(case: Case, image: sitk.Image, cfg: RunConfig) -> sitk.Image:
    """A CSV row's label file, checked (whole numbers) and on its image's grid: an error naming the
    row when the grids differ, or resampled onto the image (``data.resample_labels``)."""
    where = f"row {case.row}: label {case.label.name} of image {case.image.name}"
    label = segment_classes(read_checked_label(case.label, row=case.row), case.label, cfg, where=where)
    return label_on_image_grid(image, label, where=where, resample=cfg.data.resample_labels, unknown=UNKNOWN)


def segment_classes(label: sitk.Image, path: Path, cfg: RunConfig, *, where: str) -> sitk.Image:
    """A ``.seg.nrrd`` label with its segments matched to ``data.label_names`` by name (and an
    explicit ``background`` segment making every other voxel unknown); other files as they are."""
    if not path.name.lower().endswith(".seg.nrrd"):
        return label
    segments = read_segment_names(path)
    if not segments:
        return label
    values = sitk.GetArrayFromImage(label)
    classes = classes_from_segments(values, segments, cfg.data.label_names, where=where)
    if classes is values:
        return label
    mapped = sitk.GetImageFromArray(classes)
    mapped.CopyInformation(label)
    return mapped


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Class indices as uint8 (int16 beyond 255 classes): an eighth of int64's memory; the losses
    take any integer type."""
    labels = np.asarray(labels)
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    return labels.astype(np.uint8 if 0 <= low and high < 256 else np.int16, copy=False)


def _cached(cfg: RunConfig, files: list, kind: str, make) -> dict[str, np.ndarray]:
    if not cfg.data.cache_dir:
        return make()
    from medtl.data.cache import PreprocessedCache, cache_key

    what = {
        "kind": kind,
        "preprocessing": dataclasses.asdict(cfg.preprocessing),
        "dims": cfg.spatial_dims,
        # A resampled label is another array than a refused one: never served for the other setting.
        "resample_labels": cfg.data.resample_labels,
        # A .seg.nrrd's segments become classes by name: another order is another array.
        "label_names": list(cfg.data.label_names),
    }
    return PreprocessedCache(cfg.data.cache_dir).arrays(cache_key(files, what), make)


def class_target(case: Case, cfg: RunConfig) -> np.ndarray:
    """A classification row's target: (1,) class index, or (classes,) 0/1 for multi-label."""
    names = cfg.data.label_names
    text = (case.target or "").strip()
    given = [t.strip() for t in text.split("|") if t.strip()]
    unknown = [t for t in given if t not in names]
    if unknown:
        raise DataError(
            f"row {case.row}, field 'label': {', '.join(map(repr, unknown))} is not one of data.label_names "
            f"({', '.join(names)})"
        )
    if cfg.data.multi_label:
        target = np.zeros(len(names), np.float32)
        target[[names.index(t) for t in given]] = 1.0
        return target
    if len(given) != 1:
        raise DataError(f"row {case.row}, field 'label': needs exactly one class name, got {text!r}")
    return np.array([names.index(given[0])], np.int64)


def classification_image(case: Case, cfg: RunConfig) -> np.ndarray:
    """The preprocessed image of a classification row: (1, y, x) or (1, z, y, x)."""

    def make() -> dict[str, np.ndarray]:
        image = read_checked_image(
            case.image, row=case.row, policy=cfg.preprocessing.nan_policy, scalar_3d=cfg.spatial_dims == 3
        )
        return {"image": preprocess(image, cfg, ndim=cfg.spatial_dims)}

    return _cached(cfg, [case.image], "classification", make)["image"][None]


def training_items(cases: list[Case], cfg: RunConfig, domain_of: Callable[[Case], int] | None = None) -> list[dict]:
    """Training samples; with ``domain_of`` each carries its case's ``domain`` index (DSBN)."""
    items: list[dict] = []
    for case in cases:
        if cfg.is_classification:
            new = [{"image": classification_image(case, cfg), "label": class_target(case, cfg)}]
        else:
            volume, labels = load_case_arrays(case, cfg)
            if cfg.spatial_dims == 2:
                # Every slice holding an annotated voxel, organ-free ones included; unknown ones not.
                axis = SLICE_AXES[cfg.preprocessing.slice_axis]
                new = slice_items(
                    np.moveaxis(volume, axis, 0), np.moveaxis(labels, axis, 0), context=cfg.preprocessing.context_slices
                )
            else:
                new = [{"image": volume[None], "label": labels[None]}]
        for item in new:
            item["case"] = case.image.name
            if domain_of is not None:
                item["domain"] = domain_of(case)
        items += new
    if not items:
        raise DataError(f"the training cases hold no annotated voxels (every label voxel is {UNKNOWN}: unknown)")
    return items


def unlabelled_items(cases: list[Case], cfg: RunConfig) -> list[dict]:
    """Target-domain samples for adversarial training: every image (every slice for 2D
    segmentation), with an all-zero ``label`` that only rides through the augmentation."""
    items: list[dict] = []
    for case in cases:
        if cfg.is_classification:
            image = classification_image(case, cfg)
            items.append({"image": image, "label": np.zeros(len(cfg.data.label_names) if cfg.data.multi_label else 1)})
            continue
        volume = preprocess(read_checked_image(case.image, row=case.row, policy=cfg.preprocessing.nan_policy), cfg)
        if cfg.spatial_dims == 2:
            volume = np.moveaxis(volume, SLICE_AXES[cfg.preprocessing.slice_axis], 0)
            blank = np.zeros(volume.shape, np.uint8)
            items += slice_items(volume, blank, context=cfg.preprocessing.context_slices)
        else:
            items.append({"image": volume[None], "label": np.zeros((1, *volume.shape), np.uint8)})
    return items
