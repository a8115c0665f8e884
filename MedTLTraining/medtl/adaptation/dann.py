"""Domain-adversarial training (DANN, Ganin et al., 2016).

A small domain classifier looks at the encoder's features and tries to tell source (labelled)
from target (unlabelled) images. Between the two sits a gradient reversal layer: the classifier
learns to separate the domains, the encoder receives the negated gradient and learns features
that do not. The reversed gradient is weighted by the usual ramp ``2 / (1 + exp(-γ·p)) − 1`` over
training progress ``p``, so the untrained classifier's noise does not disturb the first steps.

The classifier reads every encoder stage (each global-average pooled, then concatenated), not the
bottleneck alone: a U-Net's decoder also sees the shallow stages through its skip connections,
and a domain difference left there would reach the output (Kamnitsas et al., 2017 use several
depths for the same reason).

Example:
    >>> x = torch.ones(3, requires_grad=True)
    >>> reverse_gradient(x, 0.5).sum().backward()
    >>> x.grad
    tensor([-0.5000, -0.5000, -0.5000])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from medtl.models.registry import pool_stage_output, stage_output_module, stage_tensor


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.neg() * ctx.weight, None


def reverse_gradient(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient comes back negated and multiplied by ``weight``."""
    return _ReverseGradient.apply(x, weight)


def ramp(progress: float, gamma: float = 10.0) -> float:
    """DANN's adaptation weight at training progress ``progress`` in [0, 1]: 0 at the start, → 1."""
    return 2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0


class DomainAdversary(nn.Module):
    """The domain classifier and the hooks that hand it the encoder's stage outputs.

    Args:
        model: a network with encoder stages (:meth:`~medtl.models.registry.TransferNet.encoder_stages`).
        example: one input batch (any size the network takes) to measure the feature widths.
        hidden: width of the classifier's hidden layer.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, *, hidden: int = 256) -> None:
        super().__init__()
        stages = model.encoder_stages()
        if not stages:
            raise ValueError(f"'{model.name}' has no separate encoder for a domain classifier to read")
        self._captured: list[torch.Tensor] = []
        self._active = False
        self._hooks = [stage_output_module(stage).register_forward_hook(self._capture) for stage in stages]
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.capturing():
            model(example)
        model.train(was_training)
        features = self._take()
        if len(features) != len(stages):
            raise RuntimeError(f"only {len(features)} of {len(stages)} encoder stages of '{model.name}' were seen")
        width = sum(pool_stage_output(f).shape[1] for f in features)
        self.classifier = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(hidden, 2)
        )
        self.classifier.to(example.device)

    def _capture(self, _module: nn.Module, _inputs: Sequence[torch.Tensor], output) -> None:
        if not self._active:
            return
        self._captured.append(stage_tensor(output))

    def _take(self) -> list[torch.Tensor]:
        features, self._captured = self._captured, []
        if not features:
            raise RuntimeError("the encoder's stages produced no features: was the network called?")
        return features

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Stage outputs are kept only for forward passes inside this block (not for validation)."""
        self._captured, self._active = [], True
        try:
            yield
        finally:
            self._active = False

    def forward(self, weight: float) -> torch.Tensor:
        """Domain logits (N, 2) for the batch the network has just processed; the gradient reaching
        the encoder is reversed and scaled by ``weight``."""
        pooled = torch.cat([pool_stage_output(f.float()) for f in self._take()], dim=1)
        return self.classifier(reverse_gradient(pooled, weight))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._captured = []
