"""The loss of one micro-batch, plain or with domain adaptation: what a training step plugs in.

- :class:`TaskLoss`: the task's loss on the batch.
- :class:`DomainBatchNormLoss`: the same, through the BatchNorm layers of the batch's domain (DSBN).
- :class:`AdversarialLoss`: the task loss plus a domain classifier's, whose gradient reaches the
  encoder reversed (DANN), on a source and a target batch.

Each is a :class:`~medtl.training.handlers.Handler` too, so it can keep per-epoch statistics and
add them to the epoch's record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from medtl.adaptation.dann import DomainAdversary, ramp
from medtl.adaptation.dsbn import use_domain
from medtl.training.handlers import Handler

if TYPE_CHECKING:
    from medtl.training.trainer import Trainer

Batch = dict[str, torch.Tensor]


class TaskLoss(Handler):
    """The task's loss of a micro-batch (``image``, ``label``).

    Args:
        loss_fn: maps (logits, labels) to a scalar loss.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss_fn = loss_fn

    def begin_attempt(self, trainer: Trainer) -> None:
        """Called before each try of a step (a step retried after running out of memory tries again)."""

    def loss(self, net: torch.nn.Module, part: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the loss to back-propagate and the task's share of it."""
        loss = self.loss_fn(net(part["image"]), part["label"])
        return loss, loss


class DomainBatchNormLoss(TaskLoss):
    """The task loss through the BatchNorm layers of each sample's ``domain``.

    Args:
        loss_fn: the task loss.
        model: the network with domain-specific BatchNorm (not a DDP wrapper of it).
        device: where mixed-domain indices go.
    """

    def __init__(self, loss_fn: Callable, *, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__(loss_fn)
        self.model = model
        self.device = device

    def loss(self, net: torch.nn.Module, part: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # One domain per batch (the sampler's rule): an int avoids a device sync per layer.
        ids = part["domain"]
        domain = int(ids[0]) if bool((ids == ids[0]).all()) else ids.to(self.device)
        with use_domain(self.model, domain):
            return super().loss(net, part)


class AdversarialLoss(TaskLoss):
    """The task loss on the source batch plus the domain classifier's loss on source and ``target``
    batches, with the reversed gradient's weight ramped up over the run (DANN).

    Source and target go through the network in separate passes: BatchNorm normalises each with its
    own domain's statistics (one mixed batch would blur them and hurt the task), while the domain
    classifier sees the features of both. The target pass leaves the running statistics alone, so
    the package normalises as its task was trained.

    Args:
        loss_fn: the task loss.
        adversary: the domain classifier, hooked into ``model``'s encoder.
        model: the network (not a DDP wrapper of it).
        device: the training device.
        weight: the domain loss's final weight (``adaptation.dann_weight``).
        gamma: how fast the weight ramps up (``adaptation.dann_gamma``).
    """

    def __init__(
        self,
        loss_fn: Callable,
        *,
        adversary: DomainAdversary,
        model: torch.nn.Module,
        device: torch.device,
        weight: float,
        gamma: float,
    ) -> None:
        super().__init__(loss_fn)
        self.adversary = adversary
        self.model = model
        self.device = device
        self.final_weight = weight
        self.gamma = gamma
        self.weight = 0.0
        self._epoch: tuple[list[float], list[int]] = ([], [0, 0])  # domain losses; hits, answers
        self._step: tuple[list[float], list[int]] = ([], [0, 0])

    def on_epoch_start(self, trainer: Trainer) -> None:
        self._epoch = ([], [0, 0])

    def begin_attempt(self, trainer: Trainer) -> None:
        steps = trainer.cfg.train.steps_per_epoch
        progress = (trainer.state.epoch * steps + trainer.step_in_epoch) / max(1, trainer.total_steps)
        self.weight = self.final_weight * ramp(progress, self.gamma)
        self._step = ([], [0, 0])

    def loss(self, net: torch.nn.Module, part: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        source = part["image"]
        target = part["target"].to(source.dtype)
        with self.adversary.capturing():
            logits = net(source)
            source_domain = self.adversary(self.weight)
        with self.adversary.capturing(), frozen_statistics(self.model):
            net(target)
            target_domain = self.adversary(self.weight)
        domain_logits = torch.cat([source_domain, target_domain]).float()
        task_loss = self.loss_fn(logits, part["label"])
        domain_target = torch.cat(
            [torch.zeros(source.shape[0], dtype=torch.long), torch.ones(target.shape[0], dtype=torch.long)]
        ).to(self.device)
        domain_loss = torch.nn.functional.cross_entropy(domain_logits, domain_target)
        losses, hits = self._step
        losses.append(float(domain_loss.detach()))
        hits[0] += int((domain_logits.argmax(1) == domain_target).sum())
        hits[1] += domain_target.numel()
        return task_loss + domain_loss, task_loss

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        # Only the try that went through counts (not one that ran out of memory half-way).
        self._epoch[0].extend(self._step[0])
        self._epoch[1][0] += self._step[1][0]
        self._epoch[1][1] += self._step[1][1]

    def on_train_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        losses, (hits, answers) = self._epoch
        record.update(
            domain_loss=float(np.mean(losses)), domain_accuracy=hits / max(1, answers), dann_weight=self.weight
        )

    def on_train_end(self, trainer: Trainer) -> None:
        self.adversary.remove()


@contextlib.contextmanager
def frozen_statistics(model: torch.nn.Module):
    """BatchNorm still normalises with the batch's statistics but does not update its running ones
    (momentum 0)."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum
