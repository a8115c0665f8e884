"""AdaBN (Li et al., 2016): re-estimate BatchNorm statistics on the target domain.

The network's inference path runs over unlabelled target images with only the chosen BatchNorm
layers in training mode and ``momentum=None`` (a cumulative average over the batches). So the
statistics come from exactly the inputs inference will see: whole padded slices for 2D networks,
sliding-window patches for 3D ones, resized images for classifiers. Every weight and every other
buffer stays bit-identical; dropout and stochastic depth stay off. (``torch.optim.swa_utils.update_bn``
puts the whole network in training mode, which would switch stochastic depth on in EfficientNet
and perturb the statistics of the layers after it.)

Example:
    >>> import numpy as np
    >>> from medtl.infer import predict_slices
    >>> from medtl.models.registry import build_model
    >>> net = build_model("unet_resnet18", num_classes=2).eval()
    >>> target = np.random.rand(4, 32, 32).astype("float32")  # four unlabelled target slices
    >>> adapt_batchnorm(net, lambda m: predict_slices(m, target)) == len(batchnorm_layers(net))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


class _CollectStatistics(nn.Module):
    """Wraps a network so that, even after the caller's ``eval()``, the chosen BatchNorm layers run
    in training mode (they normalise with, and accumulate, the batch statistics)."""

    def __init__(self, model: nn.Module, layers: Sequence[_BatchNorm]) -> None:
        super().__init__()
        self.model = model
        self._layers = list(layers)  # a plain list: not submodules of the wrapper

    @property
    def spec(self):  # inference reads the network's input divisor from its spec
        return self.model.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._layers:
            layer.train()
        return self.model(x)


def adapt_batchnorm(
    model: nn.Module,
    run: Callable[[nn.Module], object],
    *,
    layers: Sequence[_BatchNorm] | None = None,
) -> int:
    """Replaces the running statistics of ``layers`` (default: every BatchNorm layer) with those of
    the batches ``run`` feeds through the network; returns how many layers were re-estimated.

    Args:
        model: the network; left in eval mode.
        run: feeds the target images through its argument (a stand-in for ``model``), typically one
            of :mod:`medtl.infer`'s prediction functions over every target image.
        layers: a subset, e.g. one domain's BatchNorm layers in a DSBN network.
    """
    layers = batchnorm_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError("the network has no BatchNorm layers: AdaBN does not apply to it")
    saved = [(layer.momentum, layer.track_running_stats) for layer in layers]
    statistics = [{k: v.clone() for k, v in layer.state_dict().items() if k in _STATISTICS} for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: every target batch weighs the same
        layer.track_running_stats = True
    model.eval()
    try:
        with torch.no_grad():
            run(_CollectStatistics(model, layers))
    except BaseException:
        for layer, values in zip(layers, statistics, strict=True):
            layer.load_state_dict(values, strict=False)  # a failed pass leaves the old statistics
        raise
    finally:
        for layer, (momentum, track) in zip(layers, saved, strict=True):
            layer.momentum = momentum
            layer.track_running_stats = track
        model.eval()
    if any(int(layer.num_batches_tracked) == 0 for layer in layers):
        raise ValueError("no target image reached every BatchNorm layer: nothing to re-estimate from")
    return len(layers)
