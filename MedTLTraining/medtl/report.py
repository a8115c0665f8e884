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


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.warn { color: #a15c00; } pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }
figure { display: inline-block; margin: .5em 1em .5em 0; } figcaption { font-size: .85em; color: #555; }
nav a { margin-right: 1em; }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ card.kind | capitalize }} report, created {{ card.created }} by MedTL {{ card.software.get("medtl", "") }}.
Cases are named by CSV row and image hash{% if not include_identifiers %}; no file names{% endif %}.</p>
<nav>{% for id, name in sections %}<a href="#{{ id }}">{{ name }}</a>{% endfor %}</nav>

<h2 id="intended-use">Intended use</h2>
<p>{{ card.intended_use }}</p>

<h2 id="model">Model</h2>
<table>
<tr><th>network</th><td>{{ card.model.name }} ({{ card.model.spatial_dims }}D, {{ card.model.task }})</td></tr>
<tr><th>labels</th><td>{% for e in card.model.labels %}
{{ e.get("value", e.get("index")) }} = {{ e.name }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>
<tr><th>pretrained weights</th><td>{{ card.model.pretrained }}</td></tr>
<tr><th>strategy</th><td>{{ card.model.strategy }}</td></tr>
<tr><th>adaptation</th><td>{{ card.model.adaptation | join(", ") or "none" }}</td></tr>
{% if card.model.ensemble %}<tr><th>ensemble</th>
<td>{{ card.model.ensemble.get("combine") }} of {{ card.model.ensemble.get("members") | length }} members</td></tr>
{% endif %}
<tr><th>weights sha256</th><td>{{ card.model.weights_sha256 or "–" }}</td></tr>
</table>

<h2 id="training-data">Training data provenance</h2>
{{ provenance(card.training_data) }}

<h2 id="evaluation-data">Evaluation data</h2>
{% if card.evaluation_data %}{{ provenance(card.evaluation_data) }}
{% else %}<p>No separate evaluation data.</p>{% endif %}

<h2 id="metrics">Metrics</h2>
{{ metrics_html }}

<h2 id="fairness">Fairness</h2>
{{ fairness_html }}

<h2 id="plots">Plots</h2>
{% for caption, data in figures %}<figure><img alt="{{ caption }}" src="data:image/png;base64,{{ data }}">
<figcaption>{{ caption }}</figcaption></figure>{% else %}<p>No plots.</p>{% endfor %}

<h2 id="configuration">Configuration</h2>
<pre>{{ configuration }}</pre>

<h2 id="software">Software versions</h2>
<table>{% for k, v in card.software.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>

<h2 id="limitations">Known limitations</h2>
<ul>{% for item in card.limitations %}<li class="warn">{{ item }}</li>
{% else %}<li>None found; that is not proof there are none.</li>{% endfor %}</ul>
</body></html>
"""


def _esc(value: Any) -> str:
    """Escaped text as a plain str: adding a str to markupsafe's Markup would escape the str."""
    from markupsafe import escape

    return str(escape(value))


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


def _metrics_html(summary: dict[str, Any] | None, extra_rows: dict[str, Any]) -> str:
    parts = []
    if extra_rows:
        parts.append(
            "<table>"
            + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_pretty_value(v))}</td></tr>" for k, v in extra_rows.items())
            + "</table>"
        )
    if not summary:
        parts.append("<p>No held-out cases were scored.</p>")
        return "\n".join(parts)
    parts.append(f"<p>{summary['cases']} case(s); means with 95 % bootstrap intervals over cases.</p>")
    if summary["task"] == "segmentation":
        head = "".join(f"<th>{_esc(m)}</th>" for m in next(iter(summary["metrics"].values())))
        rows = "".join(
            f"<tr><td>{_esc(name)}</td>" + "".join(f"<td>{_esc(_interval(v))}</td>" for v in entry.values()) + "</tr>"
            for name, entry in summary["metrics"].items()
        )
        parts.append(f"<table><tr><th>label</th>{head}</tr>{rows}</table>")
    else:
        m = summary["metrics"]
        cols = ("auroc", "sensitivity", "specificity", "f1")
        rows = "".join(
            f"<tr><td>{_esc(name)} ({e['positives']}+/{e['negatives']}-)</td>"
            + "".join(f"<td>{_esc(_interval(e[c]))}</td>" for c in cols)
            + f"<td>{_esc(_pretty_value(e['ece']))}</td></tr>"
            for name, e in m["classes"].items()
        )
        parts.append(
            "<table><tr><th>class</th>" + "".join(f"<th>{c}</th>" for c in cols) + f"<th>ECE</th></tr>{rows}</table>"
        )
        if "accuracy" in m:
            parts.append(f"<p>Accuracy {m['accuracy']:.3f}.</p>")
    return "\n".join(parts)


def _fairness_html(tables: Sequence[dict[str, Any]], task: str | None) -> str:
    if not tables:
        return "<p>No grouping column was given (evaluate with <code>--group-by</code>).</p>"
    parts = []
    for table in tables:
        parts.append(f"<h3>by {_esc(table['column'])}</h3>")
        if task == "segmentation":
            names = [k for k in next(iter(table["groups"].values())) if k != "cases"]
            head = "".join(f"<th>{_esc(n)} Dice</th><th>{_esc(n)} HD95 mm</th>" for n in names)
            rows = "".join(
                f"<tr><td>{_esc(g)}</td><td>{v['cases']}</td>"
                + "".join(
                    f"<td>{_esc(_interval(v[n]['dice']))}</td><td>{_esc(_interval(v[n]['hd95_mm']))}</td>"
                    for n in names
                )
                + "</tr>"
                for g, v in table["groups"].items()
            )
            parts.append(f"<table><tr><th>group</th><th>cases</th>{head}</tr>{rows}</table>")
            parts.append(
                "<p>Largest gap in mean Dice between groups: "
                + ", ".join(f"{_esc(n)} {_pretty_value(gap)}" for n, gap in table["dice_gap"].items())
                + ".</p>"
            )
        else:
            for name, entry in table["classes"].items():
                cols = ("sensitivity", "specificity", "selection_rate", "auroc")
                rows = "".join(
                    f"<tr><td>{_esc(g)}</td><td>{table['cases'][g]}</td>"
                    + "".join(f"<td>{_esc(_pretty_value(v[c]))}</td>" for c in cols)
                    + "</tr>"
                    for g, v in entry["by_group"].items()
                )
                parts.append(
                    f"<p><b>{_esc(name)}</b>: equalised-odds difference "
                    f"{_esc(_pretty_value(entry['equalized_odds_difference']))}, demographic-parity difference "
                    f"{_esc(_pretty_value(entry['demographic_parity_difference']))} (fairlearn; 0 is parity).</p>"
                    "<table><tr><th>group</th><th>cases</th>"
                    + "".join(f"<th>{c}</th>" for c in cols)
                    + f"</tr>{rows}</table>"
                )
        for warning in table.get("warnings", []):
            parts.append(f'<p class="warn">{_esc(warning)}</p>')
    return "\n".join(parts)


def _provenance_html(record: dict[str, Any] | None) -> str:
    from markupsafe import Markup

    if not record:
        return Markup("<p>Not recorded.</p>")
    rows = [
        ("cases", record.get("cases", "–")),
        ("files", record.get("files", "–")),
        ("combined sha256", record.get("combined_sha256", "–")),
    ]
    html = "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"
    for column, counts in (record.get("groups") or {}).items():
        html += f"<p>Cases per {_esc(column)}: " + ", ".join(f"{_esc(k)} {v}" for k, v in counts.items()) + "</p>"
    labels = record.get("labels") or {}
    if labels.get("task") == "segmentation":
        html += (
            "<table><tr><th>label</th><th>cases containing it</th><th>median volume (mL)</th><th>range (mL)</th></tr>"
        )
        for name, e in labels["per_label"].items():
            span = "–" if not e["volume_ml_range"] else f"{e['volume_ml_range'][0]:.2f} – {e['volume_ml_range'][1]:.2f}"
            html += (
                f"<tr><td>{_esc(name)}</td><td>{e['cases_present']}</td>"
                f"<td>{_esc(_pretty_value(e['volume_ml_median']))}</td><td>{span}</td></tr>"
            )
        html += "</table>"
    elif labels.get("task") == "classification":
        html += (
            "<p>Cases per class: " + ", ".join(f"{_esc(k)} {v}" for k, v in labels["cases_per_class"].items()) + "</p>"
        )
    if record.get("sha256"):
        html += f"<details><summary>sha256 of the {len(record['sha256'])} files</summary><pre>"
        html += _esc("\n".join(record["sha256"])) + "</pre></details>"
    return Markup(html)


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

    from jinja2 import Environment
    from markupsafe import Markup

    from medtl.data.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = json_safe(card)
    summary = card.get("metrics")
    html = (
        Environment(autoescape=True)
        .from_string(_TEMPLATE)
        .render(
            title=title,
            card=card,
            sections=SECTIONS,
            include_identifiers=bool(card["configuration"].get("card", {}).get("include_identifiers")),
            provenance=_provenance_html,
            metrics_html=Markup(_metrics_html(summary, metrics_rows or {})),
            fairness_html=Markup(_fairness_html(card.get("fairness", []), (summary or {}).get("task"))),
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
