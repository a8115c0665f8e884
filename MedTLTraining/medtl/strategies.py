"""Transfer-learning strategies: which parameters train, and at which learning rate.

- ``feature_extraction``: the pretrained encoder stays frozen (weights and BatchNorm statistics);
  the decoder and head train.
- ``full_finetune``: everything trains; the encoder at ``encoder_lr_factor`` × the learning rate.
- ``feature_extraction_then_finetune``: frozen for ``feature_extraction_epochs``, then unfrozen
  at the smaller encoder learning rate.

One optimiser holds both groups from the start: a frozen parameter has no gradient, so AdamW
skips it, and the optimiser state survives a checkpoint/resume across the switch.

Example:
    >>> from medtl.config import StrategyConfig
    >>> from medtl.models.registry import build_model
    >>> net = build_model("unet_resnet18", num_classes=2)
    >>> groups = param_groups(net, lr=1e-3, encoder_lr_factor=0.1)
    >>> [(g["name"], g["lr"]) for g in groups]
    [('decoder', 0.001), ('encoder', 0.0001)]
    >>> encoder_trainable(StrategyConfig(name="feature_extraction"), epoch=7)
    False
"""

from __future__ import annotations

from typing import Any

from medtl.config import StrategyConfig
from medtl.models.registry import SegmentationNet


def encoder_trainable(strategy: StrategyConfig, epoch: int) -> bool:
    """Whether the encoder trains during ``epoch`` (0-based)."""
    if strategy.name == "feature_extraction":
        return False
    if strategy.name == "feature_extraction_then_finetune":
        return epoch >= strategy.feature_extraction_epochs
    return True


def set_encoder_trainable(model: SegmentationNet, trainable: bool) -> None:
    encoder = model.encoder
    if encoder is None:
        return
    for param in encoder.parameters():
        param.requires_grad_(trainable)
    model.encoder_frozen = not trainable
    model.train(model.training)  # re-applies eval mode to a frozen encoder's BatchNorm


def param_groups(model: SegmentationNet, *, lr: float, encoder_lr_factor: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups: decoder/head at ``lr``, encoder at ``lr * encoder_lr_factor``."""
    encoder = model.encoder
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    rest = [p for p in model.parameters() if id(p) not in encoder_ids]
    groups = [{"name": "decoder", "params": rest, "lr": lr}]
    if encoder is not None:
        groups.append({"name": "encoder", "params": list(encoder.parameters()), "lr": lr * encoder_lr_factor})
    return groups
