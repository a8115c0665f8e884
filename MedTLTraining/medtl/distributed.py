"""Data-parallel training under ``torchrun``: one process per GPU (or CPU process with gloo).

``torchrun --nproc_per_node N -m medtl train CONFIG`` starts N copies of ``medtl train``; each
finds its rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). ``train.batch_size`` stays the *global* batch: each of the N
processes trains on its own 1/N of every batch, and DistributedDataParallel averages the
gradients, so the run follows the same recipe as on one device.

Rank 0 is the only process that writes: checkpoints, events, metrics, the package and reports.
The others train and wait.

Example (one process, no torchrun: rank 0 of 1):
    >>> world()
    World(rank=0, size=1, local_rank=0)
    >>> shard([10, 11, 12, 13], world=World(rank=1, size=2, local_rank=1))
    [12, 13]
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from medtl.errors import ConfigError


class World(NamedTuple):
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place among the training processes (rank 0 of 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(0, 1, 0)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[World]:
    """Joins the process group torchrun set up (NCCL on GPUs, gloo on the CPU) for the duration;
    without torchrun it is rank 0 of 1 and does nothing."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield world()
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started local rank {local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "set --nproc_per_node to the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    # A long validation on rank 0 keeps the others waiting at a collective; allow for it.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def shard(batch: Sequence[Any], *, world: World) -> list[Any]:
    """This rank's contiguous share of a global batch (the batch divides evenly; see
    :func:`local_batch_size`)."""
    n = len(batch) // world.size
    return list(batch[world.rank * n : (world.rank + 1) * n])


def local_batch_size(batch_size: int, world: World) -> int:
    if batch_size % world.size:
        raise ConfigError(
            f"config field 'train.batch_size': {batch_size} does not divide among {world.size} processes; "
            f"use a multiple of {world.size} (it is the global batch, shared by all processes)"
        )
    return batch_size // world.size


class ShardedBatches(Sampler[list[Any]]):
    """Every rank draws the same global batches (same generator seed) and keeps its share."""

    def __init__(self, batches: Sampler[list[Any]], world: World) -> None:
        self.batches = batches
        self.world = world

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[Any]]:
        for batch in self.batches:
            yield shard(batch, world=self.world)


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if world.size == 1:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float, world: World) -> float:
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item()) / world.size


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
