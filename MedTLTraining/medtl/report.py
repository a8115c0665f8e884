"""Plots, model cards and HTML reports for runs, evaluations and cross-validations (matplotlib
without a display, Jinja2 with autoescaping; every plot embedded so the report reads offline)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loss_axes(ax, curves: dict[str, Sequence[dict]]) -> None:
    for name, history in curves.items():
        ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o", ms=3, label=name)
        switch = [h["epoch"] for h in history if h.get("encoder_trainable")]
        frozen = [h["epoch"] for h in history if not h.get("encoder_trainable")]
        if switch and frozen:
            ax.axvline(min(switch) - 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("loss (dotted: encoder unfrozen)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def training_figure(
    path: str | Path,
    curves: dict[str, Sequence[dict]],
    *,
    image: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    slices: Sequence[int] = (),
    labelled: Sequence[int] = (),
    colours: Sequence[Sequence[float]] = ((0.87, 0.51, 0.40), (0.2, 0.9, 0.2)),
    truth_colours: Sequence[str] = ("yellow", "cyan"),
) -> Path:
    """The loss curve, and for each chosen z slice the image with truth (contours) and prediction
    (filled) overlaid. ``image`` is (z, y, x) in [0, 1]."""
    plt = _pyplot()
    n = 1 + len(slices)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    _loss_axes(axes[0, 0], curves)
    for ax, z in zip(axes[0, 1:], slices, strict=True):
        ax.imshow(image[z], cmap="gray", vmin=0, vmax=1)
        overlay = np.zeros((*image[z].shape, 4))
        for value, (colour, line) in enumerate(zip(colours, truth_colours, strict=False), start=1):
            overlay[pred[z] == value] = (*colour, 0.45)
            if truth is not None and (truth[z] == value).any():
                # Truth drawn as a contrasting line so disagreement with the fill stands out.
                ax.contour(truth[z] == value, levels=[0.5], colors=[line], linewidths=1.0)
        ax.imshow(overlay)
        tag = "labelled" if z in labelled else "predicted"
        ax.set_title(f"slice z={z} ({tag})\nfill: prediction, line: truth", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Writes a figure as PNG (atomically) and closes it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Model card and HTML report
# ---------------------------------------------------------------------------------------------

CARD_SCHEMA = "medtl-model-card/1"
SECTIONS = (
    ("intended-use", "Intended use"),
    ("model", "Model"),
    ("training-data", "Training data provenance"),
    ("evaluation-data", "Evaluation data"),
    ("metrics", "Metrics"),
    ("fairness", "Fairness"),
    ("plots", "Plots"),
    ("configuration", "Configuration"),
    ("software", "Software versions"),
    ("limitations", "Known limitations"),
)


def default_intended_use(manifest: dict[str, Any]) -> str:
    cfg = manifest["config"]
    names = ", ".join(e["name"] for e in manifest["labels"] if e.get("value", 1) != 0)
    what = "classification into" if manifest.get("task", "").startswith("classification") else "segmentation of"
    return (
        f"Research use only: {what} {names} in images prepared with the '{cfg['preprocessing']['preset']}' "
        "intensity preset, similar to the training data described below. Not a medical device; not for "
        "diagnosis. Check every prediction."
    )


def _plain_config(cfg: dict[str, Any], include_identifiers: bool) -> dict[str, Any]:
    """The configuration without folder names (a path can hold a patient's name)."""
    out = json.loads(json.dumps(cfg))
    if not include_identifiers:
        for section, key in (("data", "csv"), ("adaptation", "target_csv")):
            if out.get(section, {}).get(key):
                out[section][key] = Path(out[section][key]).name
        out.pop("output_dir", None)
        if out.get("model", {}).get("pretrained") not in (None, "imagenet", "none"):
            out["model"]["pretrained"] = "a local weight file: " + Path(out["model"]["pretrained"]).name
    return out


def training_provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """The package's training-data record; packages from before provenance keep only hashes."""
    if manifest.get("provenance"):
        return manifest["provenance"]
    from medtl.provenance import combined_sha256

    hashes = sorted(r["sha256"] for r in manifest.get("training_data", []))
    return {"files": len(hashes), "sha256": hashes, "combined_sha256": combined_sha256(hashes)}


def _pretty_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1000 or abs(value) < 0.01 and value != 0 else f"{value:.3f}"
    return str(value)


def model_card(
    *,
    kind: str,
    manifest: dict[str, Any],
    summary: dict[str, Any] | None = None,
    evaluation_data: dict[str, Any] | None = None,
    limitations: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of a training run, an evaluation or a cross-validation (JSON-able).

    ``summary`` is :func:`medtl.evaluate.summarise`'s result; ``evaluation_data`` the
    provenance of the evaluated cases.
    """
    from datetime import datetime, timezone

    cfg = manifest["config"]
    card_cfg = cfg.get("card", {})
    include = bool(card_cfg.get("include_identifiers"))
    found = list(card_cfg.get("limitations", [])) + list(limitations)
    if summary:
        for table in summary.get("fairness", []):
            found += table.get("warnings", [])
        if summary.get("sparse_label_rows"):
            rows = ", ".join(map(str, summary["sparse_label_rows"][:10]))
            found.append(
                f"Sparse labels (CSV rows {rows}): scored on the annotated voxels only; Dice there says how well "
                "the painted voxels are predicted, and distances and volumes are not computed."
            )
    ensemble = manifest.get("ensemble")
    return {
        "schema": CARD_SCHEMA,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": card_cfg.get("intended_use") or default_intended_use(manifest),
        "model": {
            "name": manifest["model"]["name"],
            "task": manifest.get("task"),
            "spatial_dims": manifest["model"]["spatial_dims"],
            "labels": manifest["labels"],
            "pretrained": _plain_config(cfg, include)["model"]["pretrained"],
            "strategy": cfg["strategy"]["name"],
            "adaptation": [step.get("method") for step in manifest.get("adaptation", [])],
            "weights_sha256": manifest.get("files", {}).get("model.safetensors"),
            "ensemble": ensemble,
            "preprocessing": manifest.get("preprocessing"),
        },
        "training_data": training_provenance(manifest),
        "evaluation_data": evaluation_data,
        "configuration": _plain_config(cfg, include),
        "software": manifest.get("versions", {}),
        "metrics": summary,
        "fairness": (summary or {}).get("fairness", []),
        "limitations": found,
        **(extra or {}),
    }


def _figure_png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def training_curves_png(history: Sequence[dict]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    _loss_axes(ax, {"train": history})
    key = "val_score" if any(h.get("val_score") is not None for h in history) else None
    if key:
        twin = ax.twinx()
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        twin.plot(*zip(*points, strict=True), color="tab:green", marker="s", ms=3, label=key)
        twin.set_ylabel("validation score (mean Dice or AUROC)")
        twin.set_ylim(0, 1)
    return _figure_png(fig)


def evaluation_figures(summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """Caption -> PNG: per-case metric spread, confusion matrix, ROC and reliability, per-group bars."""
    plt = _pyplot()
    figures: dict[str, bytes] = {}
    if summary["task"] == "segmentation":
        names = list(summary["metrics"])
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, metric, title in zip(axes, ("dice", "hd95_mm"), ("Dice per case", "HD95 (mm) per case"), strict=True):
            data = [[v for r in records if _finite(v := r["metrics"][n][metric])] for n in names]
            ax.boxplot([d or [np.nan] for d in data], tick_labels=names)
            for i, d in enumerate(data, start=1):
                ax.scatter(np.full(len(d), i) + np.linspace(-0.08, 0.08, len(d)), d, s=10, alpha=0.6)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        figures["Per-case Dice and 95th-percentile Hausdorff distance (each dot a case)"] = _figure_png(fig)
        cm = np.array(summary["voxel_confusion"]["counts"], dtype=np.float64)
        figures["Voxel confusion matrix, rows normalised to the truth"] = _confusion_png(
            cm, summary["voxel_confusion"]["labels"]
        )
    else:
        metrics = summary["metrics"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for name, entry in metrics["classes"].items():
            if "roc" in entry:
                axes[0].plot(
                    entry["roc"]["fpr"], entry["roc"]["tpr"], label=f"{name} (AUROC {entry['auroc']['value']:.2f})"
                )
            rel = entry["reliability"]
            points = [
                (p, f) for p, f in zip(rel["mean_probability"], rel["fraction_positive"], strict=True) if p is not None
            ]
            if points:
                axes[1].plot(*zip(*points, strict=True), marker="o", label=f"{name} (ECE {entry['ece']:.3f})")
        for ax in axes:
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curves (one class against the rest)")
        axes[1].set(xlabel="mean predicted probability", ylabel="fraction positive", title="Reliability diagram")
        figures["ROC curves and reliability diagram"] = _figure_png(fig)
        if "confusion_matrix" in metrics:
            figures["Case confusion matrix, rows normalised to the truth"] = _confusion_png(
                np.array(metrics["confusion_matrix"], dtype=np.float64), list(metrics["classes"])
            )
    for table in summary.get("fairness", []):
        figures[f"Per-group metrics by '{table['column']}' (bars: 95 % interval)"] = _fairness_png(table, summary)
    return figures


def _finite(value: Any) -> bool:
    return value is not None and bool(np.isfinite(value))


def _confusion_png(counts: np.ndarray, labels: Sequence[str]) -> bytes:
    plt = _pyplot()
    rows = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.0 * len(labels) + 1.5))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(rows):
        ax.text(
            j,
            i,
            f"{value:.2f}\n({int(counts[i, j])})",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if value > 0.5 else "black",
        )
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="prediction", ylabel="truth")
    return _figure_png(fig)


def _fairness_png(table: dict[str, Any], summary: dict[str, Any]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    if summary["task"] == "segmentation":
        groups = list(table["groups"])
        names = [k for k in next(iter(table["groups"].values())) if k != "cases"]
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            means = [table["groups"][g][name]["dice"]["mean"] or 0.0 for g in groups]
            cis = [table["groups"][g][name]["dice"]["ci95"] for g in groups]
            err = np.array([[m - c[0], c[1] - m] if c else [0, 0] for m, c in zip(means, cis, strict=True)]).T
            ax.bar(np.arange(len(groups)) + k * width, means, width, yerr=err, capsize=3, label=name)
        ax.set_xticks(
            np.arange(len(groups)) + width * (len(names) - 1) / 2,
            [f"{g}\n(n={table['groups'][g]['cases']})" for g in groups],
        )
        ax.set_ylabel("mean Dice")
        ax.set_ylim(0, 1)
    else:
        first = next(iter(table["classes"].values()))["by_group"]
        groups = list(first)
        names = list(table["classes"])
        width = 0.8 / max(1, 2 * len(names))
        for k, name in enumerate(names):
            for j, metric in enumerate(("sensitivity", "specificity")):
                values = [table["classes"][name]["by_group"][g][metric] or 0.0 for g in groups]
                ax.bar(np.arange(len(groups)) + (2 * k + j) * width, values, width, label=f"{name} {metric}")
        ax.set_xticks(
            np.arange(len(groups)) + width * (2 * len(names) - 1) / 2, [f"{g}\n(n={table['cases'][g]})" for g in groups]
        )
        ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"by {table['column']}")
    return _figure_png(fig)


def _interval(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "–"
    value = entry.get("mean", entry.get("value"))
    text = _pretty_value(value)
    if entry.get("ci95"):
        text += f" [{_pretty_value(entry['ci95'][0])}, {_pretty_value(entry['ci95'][1])}]"
    if "n" in entry:
        text += f" (n={entry['n']})"
    return text


def _templates():
    """The report templates (``medtl/templates``), autoescaped, with the report's number formats as filters."""
    from jinja2 import Environment, FileSystemLoader

    env = Environment(
        loader=FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pretty=_pretty_value, interval=_interval)
    return env


def write_report(
    out_dir: str | Path,
    card: dict[str, Any],
    *,
    title: str,
    figures: dict[str, bytes] | None = None,
    metrics_rows: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Writes ``model_card.json`` and ``report.html`` (one self-contained file: plots embedded)."""
    import base64

    from medtl.data.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = json_safe(card)
    html = (
        _templates()
        .get_template("report.html.j2")
        .render(
            title=title,
            card=card,
            sections=SECTIONS,
            include_identifiers=bool(card["configuration"].get("card", {}).get("include_identifiers")),
            metrics_rows=metrics_rows or {},
            figures=[(caption, base64.b64encode(data).decode()) for caption, data in (figures or {}).items()],
            configuration=json.dumps(card["configuration"], indent=2),
        )
    )
    card_path, html_path = out_dir / "model_card.json", out_dir / "report.html"
    atomic_write_text(card_path, json.dumps(card, indent=2, allow_nan=False) + "\n")
    atomic_write_text(html_path, html)
    return html_path, card_path


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (strict JSON; an undefined metric is 'none')
    and NumPy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
