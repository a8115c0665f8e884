"""``medtl train CONFIG``: from a dataset CSV to a run directory with a model package.

A run directory holds ``config.json``, ``checkpoint.pt`` (resumable), ``events.jsonl``,
``metrics.json``, ``training.png`` and ``model/`` (the package).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from medtl.config import RunConfig
from medtl.data.checks import read_checked_image, read_checked_label
from medtl.data.dataset import Case, load_cases
from medtl.data.geometry import SLICE_AXES, label_on_image_grid
from medtl.data.io import atomic_write_text
from medtl.data.partial_labels import UNKNOWN, unpainted_slices_unknown
from medtl.data.slices import slice_items
from medtl.errors import DataError
from medtl.events import EventSink
from medtl.package import preprocess, save_package, working_image
from medtl.run_folder import check_resume
from medtl.train import dice_per_class, fit, resolve_device


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
    known = labels[labels != UNKNOWN]
    low, high = (int(known.min()), int(known.max())) if known.size else (0, 0)
    if low < 0 or high >= cfg.num_classes:
        raise DataError(
            f"row {case.row}: label {case.label.name} has values {low}..{high}, "
            f"but data.label_names defines 0..{cfg.num_classes - 1} ({UNKNOWN}: unknown)"
        )
    if cfg.data.labelled_slices and cfg.spatial_dims == 2:
        labels = unpainted_slices_unknown(labels, SLICE_AXES[cfg.preprocessing.slice_axis])
    return arrays["image"], labels


def case_label_image(case: Case, image: sitk.Image, cfg: RunConfig) -> sitk.Image:
    """A CSV row's label file, checked (whole numbers) and on its image's grid: an error naming the
    row when the grids differ, or resampled onto the image (``data.resample_labels``)."""
    return label_on_image_grid(
        image,
        read_checked_label(case.label, row=case.row),
        where=f"row {case.row}: label {case.label.name} of image {case.image.name}",
        resample=cfg.data.resample_labels,
        unknown=UNKNOWN,
    )


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


def case_domains(cases: list[Case], column: str) -> list[str]:
    """The sorted domain names of ``column``; a row without one is an error that names it."""
    missing = [c.row for c in cases if not (c.extra.get(column) or "").strip()]
    if missing:
        present = sorted({k for c in cases for k in c.extra})
        where = f"no value in CSV row(s) {missing[:5]}" if present and column in present else "no such column"
        raise DataError(
            f"adaptation.domain_column '{column}': {where}"
            + (f" (columns: {', '.join(present)})" if column not in present else "")
        )
    return sorted({c.extra[column].strip() for c in cases})


def split_cases(cases: list[Case], fraction: float, seed: int, group_column: str = "") -> tuple[list[Case], list[Case]]:
    """Held-out validation cases; with ``group_column``, whole groups (sites, patients) are held out."""
    if fraction <= 0 or len(cases) < 2:
        return cases, []
    if group_column:
        missing = [c.row for c in cases if not c.extra.get(group_column)]
        if missing:
            raise DataError(f"data.group_column '{group_column}': no value in CSV row(s) {missing[:5]}")
        groups = sorted({c.extra[group_column] for c in cases})
    else:
        groups = [str(i) for i in range(len(cases))]
    if len(groups) < 2:
        raise DataError(f"data.group_column '{group_column}': a validation split needs at least two groups")
    order = np.random.default_rng(seed).permutation(len(groups))
    n_val = min(len(groups) - 1, max(1, int(round(fraction * len(groups)))))
    held_out = {groups[i] for i in order[:n_val]}

    def key(index: int, case: Case) -> str:
        return case.extra[group_column] if group_column else str(index)

    val = [c for i, c in enumerate(cases) if key(i, c) in held_out]
    train = [c for i, c in enumerate(cases) if key(i, c) not in held_out]
    return train, val


def validation_scorer(
    val_cases: list[Case], cfg: RunConfig, device, domain_of: Callable[[Case], int] | None = None
) -> tuple[Callable[[torch.nn.Module], dict[str, float]], list[dict]]:
    """A function scoring a network on the held-out cases (mean Dice per label name), and the
    per-case scores of its last call. The cases are read once. ``domain_of`` gives each case's
    domain for a domain-specific BatchNorm network."""
    from medtl.adaptation.dsbn import use_domain
    from medtl.infer import predict_run_volume

    if cfg.is_classification:
        return classification_scorer(val_cases, cfg, device, domain_of)
    loaded = [(case, *load_case_arrays(case, cfg)) for case in val_cases]
    classes = list(range(1, cfg.num_classes))
    last: list[dict] = []

    def score(model) -> dict[str, float]:
        last.clear()
        for case, volume, labels in loaded:
            with use_domain(model, domain_of(case)) if domain_of else contextlib.nullcontext():
                probs = predict_run_volume(cfg, model, volume, device=device)
            scores = dice_per_class(probs.argmax(0), labels, classes)
            last.append(
                {
                    "image": case.image.name,
                    "row": case.row,
                    **{cfg.data.label_names[c - 1]: s for c, s in scores.items()},
                }
            )
        return {name: float(np.nanmean([p[name] for p in last])) for name in cfg.data.label_names}

    return score, last


def classification_scorer(
    val_cases: list[Case], cfg: RunConfig, device, domain_of: Callable[[Case], int] | None = None
) -> tuple[Callable[[torch.nn.Module], dict[str, float]], list[dict]]:
    """Held-out AUROC per class (one class against the rest; NaN where the held-out cases hold
    only one side), and the per-case probabilities of its last call."""
    from monai.metrics import compute_roc_auc

    from medtl.adaptation.dsbn import use_domain
    from medtl.infer import predict_class_probabilities

    images = [classification_image(case, cfg)[0] for case in val_cases]
    targets = np.stack([class_target(case, cfg) for case in val_cases])
    if not cfg.data.multi_label:
        targets = np.eye(cfg.num_classes, dtype=np.float32)[targets[:, 0]]
    last: list[dict] = []

    def score(model) -> dict[str, float]:
        if domain_of is None:
            probs = predict_class_probabilities(
                model, images, size=cfg.preprocessing.patch_size, multi_label=cfg.data.multi_label, device=device
            )
        else:
            rows = []
            for case, image in zip(val_cases, images, strict=True):
                with use_domain(model, domain_of(case)):
                    rows.append(
                        predict_class_probabilities(
                            model,
                            [image],
                            size=cfg.preprocessing.patch_size,
                            multi_label=cfg.data.multi_label,
                            device=device,
                        )[0]
                    )
            probs = np.stack(rows)
        last.clear()
        last.extend(
            {"image": c.image.name, "row": c.row, **dict(zip(cfg.data.label_names, map(float, p), strict=True))}
            for c, p in zip(val_cases, probs, strict=True)
        )
        scores = {}
        for index, name in enumerate(cfg.data.label_names):
            column = targets[:, index]
            both = 0 < column.sum() < len(column)
            scores[name] = (
                float(compute_roc_auc(torch.from_numpy(probs[:, index]), torch.from_numpy(column)))
                if both
                else float("nan")
            )
        return scores

    return score, last


def run_training(
    cfg: RunConfig, *, events: EventSink, resume: bool = False, cases: list[Case] | None = None
) -> dict[str, Any]:
    """Trains from ``cfg.data.csv`` (or the given ``cases``: a cross-validation fold) into
    ``cfg.output_dir``; returns the metrics it wrote.

    With held-out cases, their Dice is computed after every epoch (in the epoch events and the
    history, for live curves) and reported for the final network. The run ends with a model card
    and an HTML report.
    """
    from medtl.distributed import world
    from medtl.report import training_figure

    if not cfg.data.csv and cases is None:
        raise DataError("config field 'data.csv' is empty: name the dataset CSV")
    main = world().is_main  # under torchrun, rank 0 writes everything
    run_dir = Path(cfg.output_dir)
    if main:
        if resume:  # before config.json is replaced: the checkpoint must fit this config
            check_resume(run_dir, cfg, require=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    if cases is None:
        cases = load_cases(cfg.data.csv, label_files=not cfg.is_classification)
    train_cases, val_cases = split_cases(cases, cfg.data.val_fraction, cfg.train.seed, cfg.data.group_column)
    if cfg.strategy.unfreeze_on_plateau and cfg.strategy.name == "gradual_unfreezing" and not val_cases:
        raise DataError("strategy.unfreeze_on_plateau watches the validation score: set data.val_fraction above 0")
    device = resolve_device(cfg.train.device)
    adaptation = cfg.adaptation
    domains: list[str] = []
    domain_of = None
    record: dict[str, Any] = {"method": adaptation.method}
    if adaptation.method == "dsbn":
        column = adaptation.domain_column
        domains = case_domains(train_cases, column)
        if val_cases:
            case_domains(val_cases, column)  # every validation row must name its domain too
        unseen = sorted({c.extra[column].strip() for c in val_cases} - set(domains))
        if unseen:
            raise DataError(
                f"adaptation.domain_column '{column}': {', '.join(unseen)} appear(s) only among the validation "
                "cases, so its BatchNorm would never train; add training cases from it"
            )

        def domain_of(case: Case) -> int:
            return domains.index(case.extra[column].strip())

        counts = {d: sum(1 for c in train_cases if c.extra[column].strip() == d) for d in domains}
        record.update(domain_column=column, domains=domains, training_cases=counts)
        events.emit(
            "message", message="one BatchNorm per domain: " + ", ".join(f"{d} ({n})" for d, n in counts.items())
        )
    target_cases: list[Case] = []
    if adaptation.method in ("adabn", "dann"):
        target_cases = load_cases(adaptation.target_csv, require_labels=False, label_files=False)
        from medtl.adaptation.adapt_package import target_record

        record["target"] = target_record([c.image for c in target_cases])
    if val_cases and not main:
        score, per_case = _scored_by_rank_0, []
    else:
        score, per_case = validation_scorer(val_cases, cfg, device, domain_of) if val_cases else (None, [])
    result = fit(
        cfg,
        training_items(train_cases, cfg, domain_of),
        run_dir=run_dir,
        events=events,
        resume=resume,
        validate=score,
        n_domains=len(domains),
        target_items=unlabelled_items(target_cases, cfg) if adaptation.method == "dann" else None,
    )

    if not main:
        return {"rank": world().rank, "epochs_trained": len(result.history)}
    metrics: dict[str, Any] = {
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "seconds": round(result.seconds, 1),
    }
    if score is not None:
        # The last validation scored the packaged network unless the package holds an earlier, best
        # epoch's weights, or a resumed run had nothing left to train: then it is scored again.
        key = "val_auroc" if cfg.is_classification else "val_dice"
        scored = bool(per_case) and result.best_epoch in (None, result.history[-1]["epoch"])
        metrics[key] = result.history[-1][key] if scored else score(result.model)
        metrics[f"val_cases_{key.removeprefix('val_')}"] = list(per_case)
        metrics.update(best_epoch=result.best_epoch, stopped_early=result.stopped_early)
    metrics["epochs_trained"] = len(result.history)
    if adaptation.method == "adabn":
        from medtl.adaptation.adapt_package import statistics_pass, target_images
        from medtl.adaptation.batchnorm import adapt_batchnorm

        arrays = target_images([c.image for c in target_cases], cfg)
        record["layers"] = adapt_batchnorm(result.model, statistics_pass(arrays, cfg, device, events))
        metrics["note"] = "validation scores are the source network's, before AdaBN on the target images"
        events.emit("message", message=f"AdaBN: {record['layers']} BatchNorm layers re-estimated on the target images")
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    training_figure(run_dir / "training.png", {"train": result.history})
    from medtl.provenance import data_provenance

    include = cfg.card.include_identifiers
    provenance = data_provenance(train_cases, cfg, include_identifiers=include)
    training_files = [p for c in train_cases for p in (c.image, c.label) if p is not None and p.is_file()]
    extra: dict[str, Any] = {"provenance": provenance}
    if adaptation.method != "none":
        extra.update(adaptation=[record], domains=domains)
    from medtl.adaptation.dsbn import use_domain
    from medtl.drift import REFERENCE_FILE, profile_images, reference_bytes

    # The training images as the network sees them, for drift monitoring after deployment.
    with use_domain(result.model, 0) if domains else contextlib.nullcontext():
        profile = profile_images(result.model, cfg, [c.image for c in train_cases], device=device)
    package = save_package(
        run_dir / "model",
        result.model,
        cfg,
        # A package travels: it names its training files by hash only, unless the user asks.
        training_files=training_files if include else (),
        training_data=None if include else [{"sha256": h} for h in provenance["sha256"]],
        # The manifest's per-case validation scores name files; the card keeps rows only.
        metrics=metrics if include else _without_file_names(metrics),
        extra=extra,
        files={REFERENCE_FILE: reference_bytes(profile)},
    )
    run_report(run_dir, package, val_cases, result.history, metrics, device=device, events=events)
    events.emit("done", run_dir=str(run_dir), package=str(package), metrics=metrics)
    return metrics


def _scored_by_rank_0(model) -> dict[str, float]:
    raise AssertionError("validation runs on rank 0 only; fit broadcasts its scores")


def _without_file_names(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [{f: v for f, v in r.items() if f != "image"} for r in value] if k.startswith("val_cases_") else value
        for k, value in metrics.items()
    }


def run_report(
    run_dir: Path,
    package_path: Path,
    val_cases: list[Case],
    history: list[dict],
    metrics: dict[str, Any],
    *,
    device,
    events: EventSink,
    n_resamples: int = 1000,
) -> Path:
    """``report.html`` and ``model_card.json`` of a training run: provenance, the held-out cases
    scored by the package as ``medtl evaluate`` would (with intervals), curves, limitations."""
    from medtl.evaluate import evaluate_cases, summarise
    from medtl.package import load_package
    from medtl.provenance import data_provenance, group_columns
    from medtl.report import evaluation_figures, model_card, training_curves_png, write_report

    package = load_package(package_path)
    cfg = package.config
    manifest = package.manifest
    limitations = []
    summary, figures = None, {"Training loss and validation score per epoch": training_curves_png(history)}
    eval_data = None
    if val_cases:
        columns = group_columns(val_cases, include_identifiers=cfg.card.include_identifiers)
        domain_column = cfg.adaptation.domain_column if package.domains else None
        records = evaluate_cases(
            package, val_cases, group_by=columns, domain_column=domain_column, device=device, events=events
        )
        # Groups with one case make no table; the counts are in the provenance.
        columns = [c for c in columns if len({r["groups"][c] for r in records} - {""}) > 1]
        summary = summarise(records, cfg, group_by=columns, n_resamples=n_resamples)
        figures.update(evaluation_figures(summary, records))
        eval_data = data_provenance(val_cases, cfg, include_identifiers=cfg.card.include_identifiers)
        eval_data["role"] = "held out from training (validation split of the training CSV)"
        if len(val_cases) < 10:
            limitations.append(
                f"Only {len(val_cases)} held-out case(s) scored: the intervals are wide, and they come from "
                "the same source as the training data (not an external validation)."
            )
        else:
            limitations.append("Validated on cases from the training CSV's source, not on external data.")
    else:
        limitations.append(
            "No held-out validation (data.val_fraction is 0): nothing here estimates how well the model works; "
            "run 'medtl evaluate' on separate data or 'medtl cv'."
        )
    for column, counts in manifest.get("provenance", {}).get("groups", {}).items():
        if len(counts) == 1:
            limitations.append(
                f"All training cases share {column} = {next(iter(counts))}; other values of {column} are untested."
            )
    for step in manifest.get("adaptation", []):
        limitations.append(f"Domain adaptation '{step['method']}' was applied; see the configuration.")
    if cfg.spatial_dims == 2 and not cfg.is_classification:
        limitations.append(
            f"A 2D network segments each {cfg.preprocessing.slice_axis} slice on its own "
            "(with context_slices neighbours)."
        )
    card = model_card(
        kind="training", manifest=manifest, summary=summary, evaluation_data=eval_data, limitations=limitations
    )
    rows = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
    html, _ = write_report(
        run_dir, card, title=f"MedTL training run: {cfg.model.name}", figures=figures, metrics_rows=rows
    )
    return html
