"""Running out of memory: an estimate before the run, and a back-off when a step fails anyway.

On a GPU that cannot hold the batch, the step runs in micro-batches whose gradients add up to the
batch's (the same update), and at one sample per pass on a smaller training patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from monai.transforms import CenterSpatialCrop

from medtl import distributed
from medtl.config import RunConfig
from medtl.errors import MedTLError
from medtl.events import EventSink
from medtl.memory import available_memory, estimate_training_memory, gib, smaller_patch
from medtl.models.registry import MODELS, TransferNet
from medtl.training.data import without_metadata
from medtl.training.handlers import Handler

if TYPE_CHECKING:
    from medtl.training.trainer import Trainer


class OutOfMemoryBackoff(Handler):
    """Sets the micro-batch before the first step from the memory estimate, and after a step runs
    out of memory halves it, then shrinks the training patch, then gives up with one line.

    The choice lives in the trainer's state, so a resumed run keeps what it had to lower.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        state = trainer.state
        state.micro_batch = memory_check(
            trainer.model,
            trainer.cfg,
            trainer.device,
            trainer.world,
            trainer.local_batch,
            state.micro_batch,
            trainer.use_amp,
            trainer.events,
        )

    def after_failure(self, trainer: Trainer, failure: str) -> None:
        """Lowers what the failed step asked for, or raises :class:`MedTLError` when nothing is left."""
        state = trainer.state
        state.micro_batch, state.train_patch = _smaller_step(
            failure,
            trainer.cfg,
            trainer.world,
            state.micro_batch,
            state.train_patch,
            trainer.events,
            epoch=state.epoch + 1,
        )


def memory_check(
    model: TransferNet,
    cfg: RunConfig,
    device: torch.device,
    world: distributed.World,
    local_batch: int,
    micro_batch: int,
    amp: bool,
    events: EventSink,
) -> int:
    """Says what the run is expected to need before it starts, and on a GPU that cannot hold the
    batch starts with micro-batches that fit (gradients accumulated: the same batch)."""
    patch = cfg.preprocessing.patch_size
    try:
        estimate = estimate_training_memory(model, (cfg.in_channels, *patch), batch_size=micro_batch, amp=amp)
    except (RuntimeError, NotImplementedError) as err:  # an operation without a shape-only kernel
        events.emit("warning", message=f"could not estimate the training memory: {err}")
        return micro_batch
    free = available_memory(device)
    where = "GPU memory free" if device.type == "cuda" else "memory available"
    per = " per process" if world.size > 1 else ""
    events.emit(
        "message",
        message=f"estimated training memory {gib(estimate.total)}{per} (batch {micro_batch}, patch "
        f"{'x'.join(map(str, patch))}, {'mixed' if amp else 'full'} precision); {where}: {gib(free)}",
        memory_estimate_bytes=estimate.total,
        memory_available_bytes=free,
    )
    if free is None or estimate.total <= free:
        return micro_batch
    fits = estimate.largest_batch(free)
    if device.type == "cuda" and world.size == 1 and 1 <= fits < micro_batch:
        events.emit(
            "warning",
            message=f"a batch of {micro_batch} is estimated not to fit into {gib(free)}: training in micro-batches of "
            f"{fits} with gradients accumulated over the batch of {local_batch}",
        )
        return fits
    events.emit(
        "warning",
        message=f"the estimate ({gib(estimate.total)}) exceeds the {where} ({gib(free)}): lower train.batch_size or "
        "preprocessing.patch_size if the run fails",
    )
    return micro_batch


def _smaller_step(
    failure: str,
    cfg: RunConfig,
    world: distributed.World,
    micro_batch: int,
    train_patch: list[int],
    events: EventSink,
    *,
    epoch: int,
) -> tuple[int, list[int]]:
    """The next thing to try after running out of memory in a training step: half the micro-batch
    (the gradients still add up to the configured batch), and at one sample a smaller training
    patch; raises when neither is left."""
    if world.size > 1:
        # The other processes are already waiting in the gradient exchange of this step.
        raise MedTLError(
            f"out of memory in process {world.rank} ({failure}): lower train.batch_size or preprocessing.patch_size"
        )
    if micro_batch > 1:
        smaller = micro_batch // 2
        events.emit(
            "warning",
            message=f"out of memory at epoch {epoch} with {micro_batch} samples at once; going on with micro-batches "
            f"of {smaller} (gradients accumulated over the batch of {cfg.train.batch_size}). ({failure})",
        )
        return smaller, train_patch
    spec = MODELS[cfg.model.name]
    patch = None if cfg.is_classification else smaller_patch(train_patch, divisor=spec.divisor, min_size=spec.min_size)
    if patch is None:
        raise MedTLError(
            f"out of memory with one sample of {'x'.join(map(str, train_patch))} voxels ({failure}): "
            "choose a smaller network or preprocessing.patch_size, or free the GPU"
        )
    events.emit(
        "warning",
        message=f"out of memory at epoch {epoch} with one sample of {'x'.join(map(str, train_patch))}; going on with "
        f"training patches of {'x'.join(map(str, patch))} (prediction keeps its window). ({failure})",
    )
    return micro_batch, patch


def center_crop(tensor: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor | None:
    """The central ``size`` of the spatial axes of a (N, C, *spatial) batch (the augmentation
    already placed the patch at random)."""
    if tensor is None:
        return None
    # MONAI crops one (C, *spatial) sample: the batch's samples and channels go through as channels.
    with without_metadata():
        cropped = CenterSpatialCrop(roi_size=list(size))(tensor.flatten(0, 1))
    return cropped.unflatten(0, tensor.shape[:2])
