"""``medtl evaluate`` (a package on a labelled CSV) and ``medtl cv`` (k-fold cross-validation
grouped so that one patient or site never sits on both sides).

Both write ``evaluation.json`` (per case and pooled, with intervals and fairness tables),
``model_card.json`` and ``report.html``. Cross-validation also keeps each fold's run directory
(``fold_K/``: the run's own report and package, and ``fold_K/test/``: the report of the fold's
model on its held-out cases), and can join the fold packages into an ensemble.

Example:
    >>> from medtl.data.dataset import Case
    >>> from pathlib import Path
    >>> cases = [Case(Path(f"{i}.nrrd"), None, i + 2, {"patient": "p" + str(i // 2)}) for i in range(6)]
    >>> folds = fold_splits(cases, folds=3, group_column="patient")
    >>> [sorted({cases[i].extra["patient"] for i in test}) for _, test in folds]
    [['p2'], ['p1'], ['p0']]
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtl.config import RunConfig
from medtl.data.dataset import Case, load_cases
from medtl.data.io import atomic_write_text
from medtl.errors import DataError
from medtl.events import EventSink

EVALUATION = "evaluation.json"


def _check_columns(cases: Sequence[Case], columns: Sequence[str], csv: str | Path) -> None:
    present = sorted({k for c in cases for k in c.extra})
    for column in columns:
        if column not in present:
            raise DataError(f"{csv}: no column '{column}' to group by (columns: {', '.join(present) or 'none'})")


def fold_splits(
    cases: Sequence[Case],
    *,
    folds: int,
    group_column: str = "",
    stratify: Sequence[Any] | None = None,
    seed: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """(training, test) case indices of each fold; a value of ``group_column`` (patient, site) is
    always on one side only. ``stratify`` (single-label classes) keeps class shares alike across
    folds where the groups allow (scikit-learn's StratifiedGroupKFold)."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    if folds < 2:
        raise DataError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if group_column:
        missing = [c.row for c in cases if not (c.extra.get(group_column) or "").strip()]
        if missing:
            raise DataError(f"group column '{group_column}': no value in CSV row(s) {missing[:5]}")
        groups = [c.extra[group_column].strip() for c in cases]
    else:
        groups = [str(i) for i in range(len(cases))]
    distinct = len(set(groups))
    if distinct < folds:
        what = f"values of '{group_column}'" if group_column else "cases"
        raise DataError(f"{folds} folds need at least {folds} {what}; the data has {distinct}")
    index = np.arange(len(cases))
    if stratify is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(index, list(stratify), groups)
    else:
        splits = GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(index, groups=groups)
    return [(sorted(map(int, train)), sorted(map(int, test))) for train, test in splits]


def _card_and_report(
    out_dir: Path,
    *,
    kind: str,
    manifest: dict[str, Any],
    records: list[dict[str, Any]],
    summary: dict[str, Any],
    cases: Sequence[Case],
    cfg: RunConfig,
    title: str,
    limitations: list[str],
    extra_figures: dict[str, bytes] | None = None,
    extra: dict[str, Any] | None = None,
    check_overlap: bool = True,
) -> Path:
    from medtl.provenance import data_provenance
    from medtl.report import evaluation_figures, model_card, write_report

    include = cfg.card.include_identifiers
    eval_data = data_provenance(cases, cfg, include_identifiers=include)
    training = set(
        manifest.get("provenance", {}).get("sha256") or [r["sha256"] for r in manifest.get("training_data", [])]
    )
    overlap = sum(1 for r in records if r["image_sha256"] in training)
    if overlap and check_overlap:
        limitations.append(
            f"{overlap} of the {len(records)} evaluated images were training images: these metrics overstate how "
            "well the model works on new data."
        )
    card = model_card(
        kind=kind, manifest=manifest, summary=summary, evaluation_data=eval_data, limitations=limitations, extra=extra
    )
    figures = dict(extra_figures or {})
    figures.update(evaluation_figures(summary, records))
    html, _ = write_report(out_dir, card, title=title, figures=figures)
    return html


def _public(records: list[dict[str, Any]], cases: Sequence[Case], include: bool) -> list[dict[str, Any]]:
    """Per-case records for evaluation.json: the image hash shortened (enough to match a file,
    useless to look one up) and file names only when asked for."""
    out = []
    for record, case in zip(records, cases, strict=True):
        entry = {**record, "image_sha256": record["image_sha256"][:16]}
        if include:
            entry["image"] = case.image.name
        out.append(entry)
    return out


def evaluate_package(
    package_path: str | Path,
    data_csv: str | Path,
    *,
    out_dir: str | Path,
    group_by: Sequence[str] = (),
    domain_column: str | None = None,
    tolerance_mm: float = 2.0,
    n_resamples: int = 1000,
    min_group: int = 10,
    device: str = "auto",
    events: EventSink | None = None,
) -> dict[str, Any]:
    """Scores a package on every case of a labelled CSV; writes the evaluation, card and report."""
    from medtl.any_package import load_package
    from medtl.evaluate import evaluate_cases, summarise
    from medtl.train import resolve_device

    events = events or EventSink()
    package = load_package(package_path)
    cfg = package.config
    cases = load_cases(data_csv, label_files=not cfg.is_classification)
    _check_columns(cases, group_by, data_csv)
    if package.domains and domain_column is None:
        domain_column = (package.manifest.get("adaptation") or [{}])[0].get("domain_column") or "site"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device, events)
    records = evaluate_cases(
        package,
        cases,
        group_by=group_by,
        domain_column=domain_column,
        tolerance_mm=tolerance_mm,
        device=torch_device,
        events=events,
    )
    summary = summarise(records, cfg, group_by=group_by, n_resamples=n_resamples, min_group=min_group)
    result = {
        "package": str(package_path),
        "tolerance_mm": tolerance_mm,
        "summary": summary,
        "cases": _public(records, cases, cfg.card.include_identifiers),
    }
    _write_json(out_dir / EVALUATION, result)
    limitations = []
    if len(records) < 10:
        limitations.append(f"Only {len(records)} case(s) evaluated: the intervals are wide.")
    html = _card_and_report(
        out_dir,
        kind="evaluation",
        manifest=package.manifest,
        records=records,
        summary=summary,
        cases=cases,
        cfg=cfg,
        title=f"MedTL evaluation: {package.manifest['model']['name']} on {Path(data_csv).name}",
        limitations=limitations,
    )
    events.emit("done", out_dir=str(out_dir), report=str(html), summary=_headline(summary))
    return result


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The one number per label or class a progress line shows."""
    if summary["task"] == "segmentation":
        return {name: m["dice"]["mean"] for name, m in summary["metrics"].items()}
    return {name: e["auroc"]["value"] for name, e in summary["metrics"]["classes"].items()}


def _write_json(path: Path, value: Any) -> None:
    from medtl.report import json_safe

    atomic_write_text(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")


def cross_validate(
    cfg: RunConfig,
    *,
    folds: int,
    group_column: str | None = None,
    group_by: Sequence[str] = (),
    events: EventSink,
    resume: bool = False,
    ensemble: bool = False,
    n_resamples: int = 1000,
    tolerance_mm: float = 2.0,
) -> dict[str, Any]:
    """k-fold cross-validation of a run configuration.

    Each fold trains a run (``fold_K/``, its own validation split drawn from its training part as
    ``data.val_fraction`` says) and its package is scored on the fold's held-out cases. The pooled
    metrics are over every case, each scored by the fold that never saw it. ``group_column``
    (default ``data.group_column``) keeps groups whole; ``resume`` skips finished folds and resumes
    an interrupted one; ``ensemble`` joins the fold packages into ``ensemble/``.
    """
    from medtl.evaluate import summarise
    from medtl.train import resolve_device

    if not cfg.data.csv:
        raise DataError("config field 'data.csv' is empty: name the dataset CSV")
    group_column = cfg.data.group_column if group_column is None else group_column
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = load_cases(cfg.data.csv, label_files=not cfg.is_classification)
    splits = _fold_plan(cfg, cases, folds, group_column, group_by, out_dir / "folds.json", resume=resume)
    device = resolve_device(cfg.train.device, events)
    all_records: list[dict[str, Any]] = []
    all_cases: list[Case] = []
    per_fold = []
    for k, (train_idx, test_idx) in enumerate(splits):
        events.emit("message", message=f"fold {k + 1}/{folds}: {len(train_idx)} training, {len(test_idx)} test cases")
        fold_cases = [cases[i] for i in test_idx]
        train_cases = [cases[i] for i in train_idx]
        fold = _Fold(k, folds, out_dir / f"fold_{k}", group_by, n_resamples, tolerance_mm)
        records = _fold_records(fold, cfg, train_cases, fold_cases, device=device, events=events, resume=resume)
        summary = summarise(records, cfg, group_by=(), n_resamples=n_resamples)
        per_fold.append({"fold": k, "test_cases": len(records), "summary": summary})
        all_records += records
        all_cases += fold_cases
    packages = [out_dir / f"fold_{k}" / "model" for k in range(len(splits))]
    pooled = summarise(all_records, cfg, group_by=group_by, n_resamples=n_resamples)
    result: dict[str, Any] = {
        "folds": folds,
        "group_column": group_column,
        "pooled": pooled,
        "per_fold": per_fold,
        "cases": _public(all_records, all_cases, cfg.card.include_identifiers),
    }
    if ensemble:
        from medtl.ensemble import save_ensemble

        result["ensemble"] = str(save_ensemble(out_dir / "ensemble", packages, combine="mean"))
    _write_json(out_dir / EVALUATION, result)
    html = _pooled_report(out_dir, cfg, cases, all_cases, all_records, result, packages[0])
    events.emit("done", out_dir=str(out_dir), report=str(html), summary=_headline(pooled))
    return result


def _fold_plan(
    cfg: RunConfig,
    cases: list[Case],
    folds: int,
    group_column: str,
    group_by: Sequence[str],
    plan_file: Path,
    *,
    resume: bool,
) -> list[tuple[list[int], list[int]]]:
    """The folds' (training, test) indices, written to ``plan_file``; a folder holding other folds,
    or the same folds without ``resume``, is refused."""
    from medtl.case_data import class_target

    _check_columns(cases, list(group_by) + ([group_column] if group_column else []), cfg.data.csv)
    stratify = None
    if cfg.is_classification and not cfg.data.multi_label:
        stratify = [int(class_target(c, cfg)[0]) for c in cases]
    splits = fold_splits(cases, folds=folds, group_column=group_column, stratify=stratify, seed=cfg.train.seed)
    plan = {"folds": folds, "group_column": group_column, "test_rows": [[cases[i].row for i in t] for _, t in splits]}
    if plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) != plan:
        raise DataError(f"{plan_file}: this folder holds a cross-validation with other folds; use a new output_dir")
    if plan_file.is_file() and not resume:
        # The same folds again would retrain and overwrite every fold's model without a word.
        raise DataError(
            f"{plan_file}: this folder holds a cross-validation already; continue it with --resume, "
            "or use a new output_dir"
        )
    _write_json(plan_file, plan)
    return splits


@dataclass
class _Fold:
    """Fold ``index`` of ``folds``, its run folder, and how its test cases are scored."""

    index: int
    folds: int
    run_dir: Path
    group_by: Sequence[str]
    n_resamples: int
    tolerance_mm: float


def _fold_records(
    fold: _Fold, cfg: RunConfig, train_cases: list[Case], test_cases: list[Case], *, device, events, resume: bool
) -> list[dict[str, Any]]:
    """The fold's test records: trained, scored and reported now, or read back from a finished
    fold when resuming."""
    from medtl.any_package import load_package
    from medtl.evaluate import evaluate_cases, summarise
    from medtl.pipeline import run_training

    done_file = fold.run_dir / "fold_evaluation.json"
    if not (resume and done_file.is_file()):
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.output_dir = str(fold.run_dir)
        run_training(fold_cfg, events=events, resume=resume, cases=train_cases)
        package = load_package(fold.run_dir / "model")
        domain_column = cfg.adaptation.domain_column if package.domains else None
        records = evaluate_cases(
            package,
            test_cases,
            group_by=fold.group_by,
            domain_column=domain_column,
            tolerance_mm=fold.tolerance_mm,
            device=device,
            events=events,
            fold=fold.index,
        )
        # The fold's own report: its model on the cases it never saw.
        n = len(test_cases)
        _card_and_report(
            fold.run_dir / "test",
            kind="evaluation",
            manifest=package.manifest,
            records=records,
            summary=summarise(records, cfg, group_by=(), n_resamples=fold.n_resamples),
            cases=test_cases,
            cfg=cfg,
            title=f"MedTL cross-validation fold {fold.index}: {cfg.model.name} on its {n} test case(s)",
            limitations=[f"One fold of {fold.folds}: {n} test case(s); see the pooled report."],
        )
        _write_json(done_file, {"records": records})
    return json.loads(done_file.read_text(encoding="utf-8"))["records"]


def _pooled_report(
    out_dir: Path,
    cfg: RunConfig,
    cases: list[Case],
    all_cases: list[Case],
    all_records: list[dict[str, Any]],
    result: dict[str, Any],
    first_package: Path,
) -> Path:
    """The cross-validation's report and model card: every case, scored by the fold that did not
    train on it."""
    from medtl.any_package import load_package

    folds, group_column, per_fold = result["folds"], result["group_column"], result["per_fold"]
    manifest = load_package(first_package).manifest
    manifest = {**manifest, "provenance": _all_training(cases, cfg)}
    limitations = [
        f"Cross-validation: each case was scored by the one of {folds} fold models that did not train on it; "
        "the packaged models each saw only their fold's training part."
    ]
    if not group_column:
        limitations.append(
            "Folds were split case by case: cases of one patient or site may sit in training and test folds "
            "(set data.group_column or --group-column)."
        )
    return _card_and_report(
        out_dir,
        kind="cross-validation",
        manifest=manifest,
        records=all_records,
        summary=result["pooled"],
        cases=all_cases,
        cfg=cfg,
        title=f"MedTL {folds}-fold cross-validation: {cfg.model.name}",
        limitations=limitations,
        extra_figures={"Per-fold score (mean over the fold's test cases)": _fold_png(per_fold)},
        extra={"cross_validation": {"folds": folds, "group_column": group_column, "per_fold": per_fold}},
        # The training data of a cross-validation is the whole CSV, and so is the evaluation data
        # (each case once, by the fold that did not train on it).
        check_overlap=False,
    )


def _all_training(cases: Sequence[Case], cfg: RunConfig) -> dict[str, Any]:
    from medtl.provenance import data_provenance

    return data_provenance(cases, cfg, include_identifiers=cfg.card.include_identifiers)


def _fold_png(per_fold: Sequence[dict[str, Any]]) -> bytes:
    from medtl.report import _figure_png, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    heads = [_headline(f["summary"]) for f in per_fold]
    names = list(heads[0])
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        ax.bar(np.arange(len(heads)) + j * width, [h[name] or 0.0 for h in heads], width, label=name)
    ax.set_xticks(np.arange(len(heads)) + width * (len(names) - 1) / 2, [f"fold {f['fold']}" for f in per_fold])
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean Dice" if per_fold[0]["summary"]["task"] == "segmentation" else "AUROC")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _figure_png(fig)
