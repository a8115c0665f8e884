"""Plots for runs: loss curves and prediction overlays (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
