"""Training losses: MONAI's, on MedTL's label layout, with unknown voxels left out.

Segmentation labels are (N, 1, *spatial) class indices where :data:`~medtl.data.partial_labels.UNKNOWN`
(255) marks voxels nobody annotated. Dice and focal terms use MONAI's ``ignore_index``; cross
entropy uses torch's. A label without unknown voxels gives exactly the plain losses.

Example:
    >>> import torch
    >>> loss = make_loss("dice_ce")
    >>> logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    >>> label = torch.full((1, 1, 4, 4), UNKNOWN); label[..., 0] = 1
    >>> value = loss(logits, label); value.backward()
    >>> bool(logits.grad[..., 1:].abs().sum() == 0)  # unknown voxels push nothing
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medtl.data.partial_labels import UNKNOWN

SEGMENTATION = ("dice_ce", "dice", "ce", "ce_weighted", "dice_ce_weighted", "focal", "dice_focal")
# Losses whose cross-entropy term weighs each class by the training labels (see class_weights).
WEIGHTED = ("ce_weighted", "dice_ce_weighted")


def class_weights(items: Sequence[dict[str, Any]], num_classes: int) -> torch.Tensor:
    """Balanced class weights from the annotated training voxels: ``total / (classes × count)``,
    as scikit-learn's ``class_weight="balanced"``; a class that never occurs gets 0 (it is never a
    target, so its weight has no effect). Unknown voxels count for no class."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for item in items:
        label = np.asarray(item["label"]).ravel()
        counts += np.bincount(label[label != UNKNOWN].astype(np.int64), minlength=num_classes)[:num_classes]
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float32)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.from_numpy(weights)


def make_loss(
    name: str, *, weights: torch.Tensor | None = None, classification: bool = False, multi_label: bool = False
) -> torch.nn.Module:
    """A MONAI loss (or torch's CE/BCE) taking logits and MedTL's label layout: (N, 1, *spatial)
    class indices for segmentation (255 unknown), (N, 1) indices or (N, C) 0/1 targets (``bce``)
    for classifiers."""
    if name == "bce":
        return _FloatTargetLoss(torch.nn.BCEWithLogitsLoss())
    if classification:
        if name == "focal":
            return _FocalClassification(multi_label=multi_label)
        if name == "ce":
            return _LabelChannelLoss(torch.nn.CrossEntropyLoss())
        if name == "ce_weighted":
            return _LabelChannelLoss(torch.nn.CrossEntropyLoss(weight=_required(weights)))
        raise ValueError(f"unknown classification loss '{name}'")
    if name not in SEGMENTATION:
        raise ValueError(f"unknown loss '{name}'")
    return PartialLabelLoss(name, weights=_required(weights) if name in WEIGHTED else None)


class PartialLabelLoss(torch.nn.Module):
    """Dice, cross entropy, focal loss or a sum of two, over the annotated voxels only.

    Args:
        name: ``dice_ce``, ``dice``, ``ce``, ``ce_weighted``, ``dice_ce_weighted``, ``focal`` or
            ``dice_focal``.
        weights: per-class weights of the cross entropy of ``ce_weighted`` and ``dice_ce_weighted``.
    """

    def __init__(self, name: str, *, weights: torch.Tensor | None = None) -> None:
        super().__init__()
        from monai.losses import DiceLoss, FocalLoss

        self.name = name
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, ignore_index=UNKNOWN) if "dice" in name else None
        self.ce = torch.nn.CrossEntropyLoss(weight=weights, ignore_index=UNKNOWN) if "ce" in name else None
        # MONAI's focal loss zeroes the unknown voxels' terms but averages over every voxel: it is
        # summed here and divided by the annotated voxels (times classes), its mean over those.
        self.focal = (
            FocalLoss(to_onehot_y=True, use_softmax=True, ignore_index=UNKNOWN, reduction="sum")
            if "focal" in name
            else None
        )

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label.long()
        known = int((label != UNKNOWN).sum())
        if known == 0:
            # Nothing annotated in this batch: no gradient, not a NaN from an empty mean.
            return logits.sum() * 0.0
        total = logits.new_zeros(())
        if self.dice is not None:
            total = total + self.dice(logits, label)
        if self.ce is not None:
            total = total + self.ce(logits, label[:, 0])
        if self.focal is not None:
            total = total + self.focal(logits, label) / (known * logits.shape[1])
        return total


def _required(weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        raise ValueError("a weighted loss needs class weights from the training labels")
    return weights


class _LabelChannelLoss(torch.nn.Module):
    """Adapts a loss on (N,) class indices to the (N, 1) label layout."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, label[:, 0].long())


class _FloatTargetLoss(torch.nn.Module):
    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, label.float())


class _FocalClassification(torch.nn.Module):
    """MONAI's focal loss for (N, C) logits: softmax over classes for (N, 1) indices, sigmoid per
    class for multi-label (N, C) targets."""

    def __init__(self, *, multi_label: bool) -> None:
        super().__init__()
        from monai.losses import FocalLoss

        self.multi_label = multi_label
        self.loss = FocalLoss() if multi_label else FocalLoss(to_onehot_y=True, use_softmax=True)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, label.float() if self.multi_label else label.long())
