"""Transfer-learning strategies: which encoder stages train in each epoch, and at which learning rate.

Every network's pretrained encoder is cut into stages, input side first (see
:meth:`medtl.models.registry.TransferNet.encoder_stages`); everything else (decoder, new head) is
the ``head`` and always trains.

- ``feature_extraction``: the encoder stays frozen, weights and BatchNorm statistics; the head
  trains.
- ``full_finetune``: everything trains from the first step; the encoder at ``encoder_lr_factor``
  × the learning rate (small learning rates are what keep pretrained features), after the
  optimiser's warm-up.
- ``feature_extraction_then_finetune``: frozen for ``feature_extraction_epochs``, then all stages
  unfrozen at the smaller encoder learning rate.
- ``gradual_unfreezing`` (ULMFiT): the head alone first, then one more stage from the top (output
  side) down every ``unfreeze_every`` epochs, or, with ``unfreeze_on_plateau``, whenever the
  validation score has not improved for ``plateau_patience`` epochs.
- ``discriminative_lr``: everything trains; stage ``i`` of ``n`` (0 = input side) at
  ``lr × lr_decay ** (n - i)``: the layers nearest the input, the most generic ones, move least.

One optimiser holds every group from the start: a frozen parameter has no gradient, so AdamW skips
it, and the optimiser state survives a checkpoint/resume across an unfreezing.

Example:
    >>> from medtl.config import StrategyConfig
    >>> from medtl.models.registry import build_model
    >>> net = build_model("unet_resnet18", num_classes=2)
    >>> groups = param_groups(net, StrategyConfig(name="discriminative_lr", lr_decay=0.5), lr=1e-3)
    >>> [(g["name"], g["lr"]) for g in groups]  # doctest: +NORMALIZE_WHITESPACE
    [('head', 0.001), ('encoder.0', 3.125e-05), ('encoder.1', 6.25e-05), ('encoder.2', 0.000125),
     ('encoder.3', 0.00025), ('encoder.4', 0.0005)]
    >>> [unfrozen_stages(StrategyConfig(name="gradual_unfreezing", unfreeze_every=2), e, 5) for e in range(8)]
    [0, 0, 1, 1, 2, 2, 3, 3]
"""

from __future__ import annotations

from typing import Any

from medtl.config import StrategyConfig
from medtl.models.registry import TransferNet


def unfrozen_stages(strategy: StrategyConfig, epoch: int, n_stages: int, *, plateau_unfrozen: int = 0) -> int:
    """How many encoder stages, counted from the output side, train during ``epoch`` (0-based).

    ``plateau_unfrozen`` is how many stages a plateau-driven gradual unfreezing has released so far
    (the training loop keeps that count, as it depends on validation).
    """
    name = strategy.name
    if name == "feature_extraction":
        return 0
    if name == "feature_extraction_then_finetune":
        return n_stages if epoch >= strategy.feature_extraction_epochs else 0
    if name == "gradual_unfreezing":
        if strategy.unfreeze_on_plateau:
            return min(n_stages, plateau_unfrozen)
        return min(n_stages, epoch // strategy.unfreeze_every)
    return n_stages


def set_trainable_stages(model: TransferNet, n_top: int) -> None:
    """Trains the top ``n_top`` encoder stages and freezes the others (weights and BatchNorm)."""
    stages = model.encoder_stages()
    first_trainable = len(stages) - max(0, min(n_top, len(stages)))
    for index, stage in enumerate(stages):
        for param in stage.parameters():
            param.requires_grad_(index >= first_trainable)
    model.frozen_stages = set(range(first_trainable))
    model.train(model.training)  # re-applies eval mode to the frozen stages' BatchNorm


def set_encoder_trainable(model: TransferNet, trainable: bool) -> None:
    set_trainable_stages(model, len(model.encoder_stages()) if trainable else 0)


def stage_learning_rates(strategy: StrategyConfig, lr: float, n_stages: int) -> list[float]:
    if strategy.name == "discriminative_lr":
        return [lr * strategy.lr_decay ** (n_stages - i) for i in range(n_stages)]
    return [lr * strategy.encoder_lr_factor] * n_stages


def param_groups(model: TransferNet, strategy: StrategyConfig, *, lr: float) -> list[dict[str, Any]]:
    """Optimiser groups: ``head`` (everything outside the encoder) at ``lr``, then ``encoder.<i>``
    per stage (input side first) at the strategy's rate."""
    stages = model.encoder_stages()
    rates = stage_learning_rates(strategy, lr, len(stages))
    stage_params = [list(stage.parameters()) for stage in stages]
    in_stages = {id(p) for params in stage_params for p in params}
    groups = [{"name": "head", "params": [p for p in model.parameters() if id(p) not in in_stages], "lr": lr}]
    for index, (params, rate) in enumerate(zip(stage_params, rates, strict=True)):
        if params:
            groups.append({"name": f"encoder.{index}", "params": params, "lr": rate})
    return groups
