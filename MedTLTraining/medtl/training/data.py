"""Training batches: which samples each step draws, and how they are augmented.

Every drawn sample carries a seed for its augmentation, from the epoch and its place in the epoch,
so one process, N torchrun processes and any number of DataLoader workers train on the same batches,
and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import apply_transform
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from medtl import distributed
from medtl.config import RunConfig
from medtl.data.partial_labels import known_fraction


class SampleSeeds(Sampler[list[tuple[int, int]]]):
    """Tags every drawn index with a seed for its augmentation, from the epoch's seed and the
    sample's place in the epoch: a sample is augmented the same whichever process or DataLoader
    worker loads it, so one process, N torchrun processes and any number of workers train on the
    same batches (and a resumed run continues exactly)."""

    def __init__(self, batches: Sampler[list[int]]) -> None:
        self.batches = batches
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self):
        position = 0
        for batch in self.batches:
            keys = []
            for index in batch:
                keys.append((int(index), (self.epoch_seed * 1_000_003 + position) % 2**32))
                position += 1
            yield keys


class SeededSamples(torch.utils.data.Dataset):
    """The training samples, augmented with the seed each drawn index carries (see :class:`SampleSeeds`)."""

    def __init__(self, items: Sequence[dict[str, Any]], transform) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        self.transform.set_random_state(seed=seed)
        # Training needs the pixels, not MONAI's metadata: without it the same pixels come 1.7x as
        # fast with `standard` augmentation (the benchmark's data-path section) and 6x with none.
        with without_metadata():
            return apply_transform(self.transform, dict(self.items[index]))


@contextlib.contextmanager
def without_metadata():
    tracking = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(tracking)


def random_batches(
    n_items: int, cfg: RunConfig, generator: torch.Generator, weights: Sequence[float] | None = None
) -> Sampler[list[int]]:
    """``steps_per_epoch`` global batches of indices drawn with replacement (in proportion to
    ``weights`` when given)."""
    n_samples = cfg.train.steps_per_epoch * cfg.train.batch_size
    if weights is not None:
        draws: Sampler[int] = WeightedRandomSampler(weights, n_samples, replacement=True, generator=generator)
    else:
        draws = RandomSampler(range(n_items), replacement=True, num_samples=n_samples, generator=generator)
    return BatchSampler(draws, cfg.train.batch_size, drop_last=True)


def annotation_weights(items: Sequence[dict[str, Any]], cfg: RunConfig) -> list[float] | None:
    """2D slices drawn in proportion to their annotated voxels when some are partly unknown (a
    slice crossed by a plane painted in another view holds one annotated line), times an item's
    ``emphasis`` (a slice the user just corrected, :mod:`medtl.serve`); None (uniform) when every
    slice is fully annotated and none is emphasised."""
    if cfg.is_classification or cfg.spatial_dims != 2:
        return None
    weights = [known_fraction(item["label"]) * float(item.get("emphasis", 1.0)) for item in items]
    return weights if any(w != 1.0 for w in weights) else None


def worker_count(requested: int | None, device: torch.device, world: distributed.World) -> int:
    """DataLoader workers: as configured, else none on the CPU (they would compete with the
    network for the cores) and up to 4 per process on a GPU, leaving a core to each process."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores // world.size - 1))


def make_loader(items, transform, batches: Sampler, device: torch.device, workers: int) -> DataLoader:
    return DataLoader(
        SeededSamples(items, transform),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
