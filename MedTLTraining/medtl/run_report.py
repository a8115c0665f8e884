"""The report of a training run: ``report.html`` and ``model_card.json`` in its run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtl.data.dataset import Case
from medtl.events import EventSink


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
    from medtl.any_package import load_package
    from medtl.evaluate import evaluate_cases, summarise
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
