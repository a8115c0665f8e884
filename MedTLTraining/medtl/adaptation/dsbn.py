"""Domain-specific batch normalisation (DSBN, Chang et al., 2019).

Every BatchNorm layer of a network becomes a :class:`DomainBatchNorm`: one BatchNorm per domain
(site, scanner) behind the shared convolution weights. Which domain a sample belongs to is set
for the whole network with :func:`use_domain`; each sample is normalised by its own domain's
layer, so a batch may even mix domains. Training draws each batch from one domain
(:class:`DomainBatchSampler`), as the method prescribes, so every domain's statistics come from
batches of that domain alone.

A domain the network has never seen gets its own layers with :func:`add_domain`: affine
parameters averaged over the known domains, statistics estimated AdaBN-style on its images.

Example:
    >>> from medtl.models.registry import build_model
    >>> net = convert_to_dsbn(build_model("unet_resnet18", num_classes=2), 2).eval()
    >>> with use_domain(net, torch.tensor([0, 1])):
    ...     net(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 2, 32, 32])
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Sampler


class DomainBatchNorm(nn.Module):
    """One BatchNorm per domain; ``domain`` (set by :func:`use_domain`) picks it per sample."""

    def __init__(self, template: _BatchNorm, n_domains: int) -> None:
        super().__init__()
        self.bns = nn.ModuleList(copy.deepcopy(template) for _ in range(n_domains))
        self.domain: int | torch.Tensor | None = None

    @property
    def n_domains(self) -> int:
        return len(self.bns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        domain = self.domain
        if domain is None:
            raise RuntimeError("a domain-specific BatchNorm network needs a domain: wrap the call in use_domain()")
        if isinstance(domain, int):
            return self.bns[domain](x)
        ids = domain.to(x.device)
        if ids.shape != (x.shape[0],):
            raise ValueError(f"{x.shape[0]} samples but {tuple(ids.shape)} domain indices")
        present = torch.unique(ids).tolist()
        if len(present) == 1:
            return self.bns[present[0]](x)
        out = torch.empty_like(x)
        for d in present:
            mask = ids == d
            out[mask] = self.bns[d](x[mask])
        return out


def domain_layers(model: nn.Module) -> list[DomainBatchNorm]:
    return [m for m in model.modules() if isinstance(m, DomainBatchNorm)]


def convert_to_dsbn(model: nn.Module, n_domains: int) -> nn.Module:
    """Replaces every BatchNorm layer (in place) by a :class:`DomainBatchNorm` of ``n_domains``
    copies of it; a layer reachable from two parents becomes one shared wrapper. Returns ``model``."""
    if n_domains < 1:
        raise ValueError("DSBN needs at least one domain")
    wrappers: dict[int, DomainBatchNorm] = {}
    for parent in list(model.modules()):
        if isinstance(parent, DomainBatchNorm):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                if id(child) not in wrappers:
                    wrappers[id(child)] = DomainBatchNorm(child, n_domains)
                setattr(parent, name, wrappers[id(child)])
    if not wrappers:
        raise ValueError("the network has no BatchNorm layers: domain-specific BatchNorm does not apply to it")
    return model


@contextlib.contextmanager
def use_domain(model: nn.Module, domain: int | Sequence[int] | torch.Tensor) -> Iterator[None]:
    """Within the block every :class:`DomainBatchNorm` of ``model`` normalises with ``domain``'s
    layers: one index for every sample, or one per sample."""
    layers = domain_layers(model)
    if not isinstance(domain, int):
        domain = torch.as_tensor(domain, dtype=torch.long).reshape(-1)
        if domain.numel() and (int(domain.min()) < 0 or int(domain.max()) >= (layers[0].n_domains if layers else 0)):
            raise ValueError(f"domain index out of range: {domain.tolist()}")
    elif layers and not 0 <= domain < layers[0].n_domains:
        raise ValueError(f"domain index {domain} out of range (the network has {layers[0].n_domains} domains)")
    previous = [layer.domain for layer in layers]
    for layer in layers:
        layer.domain = domain
    try:
        yield
    finally:
        for layer, value in zip(layers, previous, strict=True):
            layer.domain = value


def add_domain(model: nn.Module) -> int:
    """Adds one domain to every :class:`DomainBatchNorm` (affine parameters averaged over the known
    domains, no domain favoured; fresh statistics to estimate) and returns its index."""
    layers = domain_layers(model)
    if not layers:
        raise ValueError("the network has no domain-specific BatchNorm layers")
    for layer in layers:
        new = copy.deepcopy(layer.bns[0])
        new.reset_running_stats()
        if new.affine:
            with torch.no_grad():
                new.weight.copy_(torch.stack([bn.weight for bn in layer.bns]).mean(0))
                new.bias.copy_(torch.stack([bn.bias for bn in layer.bns]).mean(0))
        layer.bns.append(new)
    return layers[0].n_domains - 1


class DomainBatchSampler(Sampler[list[int]]):
    """``n_batches`` batches of ``batch_size`` indices, each batch from one domain, domains taking
    turns in a shuffled order (so each domain trains equally often, however few its samples);
    indices drawn with replacement, reproducibly from ``generator``."""

    def __init__(self, domains: Sequence[int], *, batch_size: int, n_batches: int, generator: torch.Generator) -> None:
        self.by_domain = [np.flatnonzero(np.asarray(domains) == d) for d in sorted(set(domains))]
        self.batch_size = batch_size
        self.n_batches = n_batches
        self.generator = generator

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.by_domain)
        order: list[int] = []
        for _ in range(self.n_batches):
            if not order:
                order = torch.randperm(n, generator=self.generator).tolist()
            members = self.by_domain[order.pop()]
            picks = torch.randint(len(members), (self.batch_size,), generator=self.generator)
            yield members[picks.numpy()].tolist()
