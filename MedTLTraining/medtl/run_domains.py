"""The domain adaptation of a training run (``adaptation.method``): the DSBN domains named by a CSV
column, the unlabelled target cases of AdaBN and DANN, and what the package records of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medtl.config import RunConfig
from medtl.data.dataset import Case, load_cases
from medtl.errors import DataError
from medtl.events import EventSink


@dataclass
class RunDomains:
    """``domains``: DSBN's domain names, in BatchNorm order; ``domain_of``: a case's index among
    them (None without DSBN); ``target_cases``: AdaBN's and DANN's target images; ``record``: the
    adaptation step for the package manifest."""

    record: dict[str, Any]
    domains: list[str] = field(default_factory=list)
    domain_of: Callable[[Case], int] | None = None
    target_cases: list[Case] = field(default_factory=list)


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


def run_domains(cfg: RunConfig, train_cases: list[Case], val_cases: list[Case], events: EventSink) -> RunDomains:
    adaptation = cfg.adaptation
    setup = RunDomains(record={"method": adaptation.method})
    if adaptation.method == "dsbn":
        _dsbn_domains(setup, adaptation.domain_column, train_cases, val_cases, events)
    if adaptation.method in ("adabn", "dann"):
        from medtl.adaptation.adapt_package import target_record

        setup.target_cases = load_cases(adaptation.target_csv, require_labels=False, label_files=False)
        setup.record["target"] = target_record([c.image for c in setup.target_cases])
    return setup


def _dsbn_domains(
    setup: RunDomains, column: str, train_cases: list[Case], val_cases: list[Case], events: EventSink
) -> None:
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
    setup.domains, setup.domain_of = domains, domain_of
    setup.record.update(domain_column=column, domains=domains, training_cases=counts)
    events.emit("message", message="one BatchNorm per domain: " + ", ".join(f"{d} ({n})" for d, n in counts.items()))


def adabn_after_training(setup: RunDomains, model, cfg: RunConfig, device, events: EventSink) -> None:
    """AdaBN: the trained network's BatchNorm statistics re-estimated on the target images."""
    from medtl.adaptation.adapt_package import statistics_pass, target_images
    from medtl.adaptation.batchnorm import adapt_batchnorm

    arrays = target_images([c.image for c in setup.target_cases], cfg)
    setup.record["layers"] = adapt_batchnorm(model, statistics_pass(arrays, cfg, device, events))
    events.emit(
        "message", message=f"AdaBN: {setup.record['layers']} BatchNorm layers re-estimated on the target images"
    )
