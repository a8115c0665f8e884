"""How much memory a training run needs, before it starts, and what to try when it does not fit.

The estimate traces one forward pass of the network on PyTorch's ``meta`` device (shapes only, no
arithmetic, no memory) and adds up the tensors autograd keeps for the backward pass; weights,
gradients and AdamW's two moments come from the parameter counts. It is an estimate: allocator
caching, cuDNN workspaces and the data pipeline come on top, which is what the margin is for.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    >>> est = estimate_training_memory(net, (1, 32, 32), batch_size=2)
    >>> est.activations_per_sample  # the conv's input (1×32×32) and the ReLU's output (4×32×32)
    20480
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Allocator fragmentation, workspaces and the batch on its way in: measured peaks on CUDA run
# 10-40 % above the sum of tensors.
MARGIN = 1.3


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes of parameters and buffers
    gradients: int
    optimizer: int  # AdamW: two moments per trainable parameter
    activations_per_sample: int  # tensors saved for backward, one sample, full precision
    batch_size: int
    amp: bool = False

    @property
    def activations(self) -> int:
        # Under autocast most saved activations are half precision.
        return int(self.activations_per_sample * self.batch_size * (0.5 if self.amp else 1.0))

    @property
    def total(self) -> int:
        return int(MARGIN * (self.weights + self.gradients + self.optimizer + self.activations))

    def with_batch(self, batch_size: int) -> MemoryEstimate:
        return MemoryEstimate(
            self.weights, self.gradients, self.optimizer, self.activations_per_sample, batch_size, self.amp
        )

    def largest_batch(self, available: int) -> int:
        """The largest batch whose estimate fits into ``available`` bytes (0 if not even one)."""
        fixed = MARGIN * (self.weights + self.gradients + self.optimizer)
        per_sample = MARGIN * self.activations_per_sample * (0.5 if self.amp else 1.0)
        return max(0, int((available - fixed) // per_sample)) if per_sample else self.batch_size


def estimate_training_memory(
    model: torch.nn.Module, sample_shape: Sequence[int], *, batch_size: int, amp: bool = False
) -> MemoryEstimate:
    """Memory for training ``model`` on batches of ``batch_size`` samples of ``sample_shape``
    (channels, *spatial) with AdamW; see the module docstring for what is counted."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ghost = copy.deepcopy(model).to("meta")
    ghost.train(model.training)
    seen: dict[int, int] = {}
    held = {t.untyped_storage()._cdata for t in [*ghost.parameters(), *ghost.buffers()]}  # counted above

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in held:
            seen[storage._cdata] = storage.nbytes()  # a tensor saved by two ops is kept once
        return tensor

    # Two samples: BatchNorm in training mode refuses a single value per channel (a 1x1 bottleneck).
    x = torch.zeros(2, *sample_shape, device="meta")
    x.requires_grad_(not any(p.requires_grad for p in ghost.parameters()))  # a frozen net still needs a graph
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ghost(x)
    return MemoryEstimate(
        weights=weights,
        gradients=trainable,
        optimizer=2 * trainable,  # AdamW's moments have the parameters' dtype
        activations_per_sample=sum(seen.values()) // 2,
        batch_size=batch_size,
        amp=amp,
    )


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the GPU, or the memory Linux says is available for a new process; ``None``
    where neither can be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def smaller_patch(patch: Sequence[int], *, divisor: int, min_size: int = 16) -> list[int] | None:
    """About three quarters of ``patch`` per axis, still a multiple of the network's ``divisor``
    and at least ``min_size``; ``None`` when no axis can shrink."""
    floor = max(min_size, divisor)
    smaller = [max(floor, int(math.floor(0.75 * s / divisor)) * divisor) for s in patch]
    smaller = [min(new, old) for new, old in zip(smaller, patch, strict=True)]
    return None if list(smaller) == list(patch) else smaller


def gib(n: int | float | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"
