"""``medtl train CONFIG``: from a dataset CSV to a run directory with a model package.

A run directory holds ``config.json``, ``checkpoint.pt`` (resumable), ``events.jsonl``,
``metrics.json``, ``training.png`` and ``model/`` (the package). The steps live in their own
modules: :mod:`medtl.case_data` (a CSV row as arrays), :mod:`medtl.validation_split` (the
held-out cases), :mod:`medtl.scorers` (validation after every epoch), :mod:`medtl.run_domains`
(domain adaptation) and :mod:`medtl.run_report` (the report); their public names are importable
from here too.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from medtl.case_data import (  # noqa: F401 - re-exported for callers of medtl.pipeline
    case_label_image,
    class_target,
    classification_image,
    compact_labels,
    load_case_arrays,
    training_items,
    unlabelled_items,
)
from medtl.config import RunConfig
from medtl.data.dataset import Case, load_cases
from medtl.data.io import atomic_write_text
from medtl.errors import DataError
from medtl.events import EventSink
from medtl.package import save_package
from medtl.run_domains import RunDomains, adabn_after_training, case_domains, run_domains  # noqa: F401
from medtl.run_folder import check_resume
from medtl.run_report import run_report
from medtl.scorers import classification_scorer, validation_scorer  # noqa: F401
from medtl.train import FitResult, fit, resolve_device
from medtl.validation_split import split_cases


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

    if not cfg.data.csv and cases is None:
        raise DataError("config field 'data.csv' is empty: name the dataset CSV")
    main = world().is_main  # under torchrun, rank 0 writes everything
    run_dir = Path(cfg.output_dir)
    if main:
        _start_run_folder(run_dir, cfg, resume)
    train_cases, val_cases = _split(cfg, cases)
    device = resolve_device(cfg.train.device)
    setup = run_domains(cfg, train_cases, val_cases, events)
    score, per_case = _scorer(cfg, val_cases, device, setup, main)
    result = _fit(cfg, train_cases, setup, run_dir=run_dir, events=events, resume=resume, score=score)
    if not main:
        return {"rank": world().rank, "epochs_trained": len(result.history)}
    metrics = _run_metrics(cfg, result, train_cases, val_cases, score, per_case)
    if cfg.adaptation.method == "adabn":
        adabn_after_training(setup, result.model, cfg, device, events)
        metrics["note"] = "validation scores are the source network's, before AdaBN on the target images"
    _write_results(cfg, run_dir, result, train_cases, val_cases, setup, metrics, device=device, events=events)
    return metrics


def _start_run_folder(run_dir: Path, cfg: RunConfig, resume: bool) -> None:
    if resume:  # before config.json is replaced: the checkpoint must fit this config
        check_resume(run_dir, cfg, require=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")


def _split(cfg: RunConfig, cases: list[Case] | None) -> tuple[list[Case], list[Case]]:
    """The training and held-out cases of the CSV (or of the given fold's ``cases``)."""
    if cases is None:
        cases = load_cases(cfg.data.csv, label_files=not cfg.is_classification)
    train_cases, val_cases = split_cases(cases, cfg.data.val_fraction, cfg.train.seed, cfg.data.group_column)
    if cfg.strategy.unfreeze_on_plateau and cfg.strategy.name == "gradual_unfreezing" and not val_cases:
        raise DataError("strategy.unfreeze_on_plateau watches the validation score: set data.val_fraction above 0")
    return train_cases, val_cases


def _scorer(cfg: RunConfig, val_cases: list[Case], device, setup: RunDomains, main: bool):
    """The validation scorer and its per-case scores; (None, []) without held-out cases."""
    if val_cases and not main:
        return _scored_by_rank_0, []
    return validation_scorer(val_cases, cfg, device, setup.domain_of) if val_cases else (None, [])


def _scored_by_rank_0(model) -> dict[str, float]:
    raise AssertionError("validation runs on rank 0 only; fit broadcasts its scores")


def _fit(cfg: RunConfig, train_cases: list[Case], setup: RunDomains, *, score, **options) -> FitResult:
    return fit(
        cfg,
        training_items(train_cases, cfg, setup.domain_of),
        validate=score,
        n_domains=len(setup.domains),
        target_items=unlabelled_items(setup.target_cases, cfg) if cfg.adaptation.method == "dann" else None,
        **options,
    )


def _run_metrics(
    cfg: RunConfig, result: FitResult, train_cases: list[Case], val_cases: list[Case], score, per_case: list[dict]
) -> dict[str, Any]:
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
    return metrics


def _write_results(
    cfg: RunConfig,
    run_dir: Path,
    result: FitResult,
    train_cases: list[Case],
    val_cases: list[Case],
    setup: RunDomains,
    metrics: dict[str, Any],
    *,
    device,
    events: EventSink,
) -> None:
    """metrics.json, training.png, the model package and the report; then the ``done`` event."""
    from medtl.report import training_figure

    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    training_figure(run_dir / "training.png", {"train": result.history})
    package = _save_run_package(cfg, run_dir, result, train_cases, setup, metrics, device=device)
    run_report(run_dir, package, val_cases, result.history, metrics, device=device, events=events)
    events.emit("done", run_dir=str(run_dir), package=str(package), metrics=metrics)


def _save_run_package(
    cfg: RunConfig,
    run_dir: Path,
    result: FitResult,
    train_cases: list[Case],
    setup: RunDomains,
    metrics: dict[str, Any],
    *,
    device,
) -> Path:
    """``model/``: the network with its provenance, adaptation record and drift reference."""
    from medtl.adaptation.dsbn import use_domain
    from medtl.drift import REFERENCE_FILE, profile_images, reference_bytes
    from medtl.provenance import data_provenance

    include = cfg.card.include_identifiers
    provenance = data_provenance(train_cases, cfg, include_identifiers=include)
    training_files = [p for c in train_cases for p in (c.image, c.label) if p is not None and p.is_file()]
    extra: dict[str, Any] = {"provenance": provenance}
    if cfg.adaptation.method != "none":
        extra.update(adaptation=[setup.record], domains=setup.domains)
    # The training images as the network sees them, for drift monitoring after deployment.
    with use_domain(result.model, 0) if setup.domains else contextlib.nullcontext():
        profile = profile_images(result.model, cfg, [c.image for c in train_cases], device=device)
    return save_package(
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


def _without_file_names(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [{f: v for f, v in r.items() if f != "image"} for r in value] if k.startswith("val_cases_") else value
        for k, value in metrics.items()
    }
