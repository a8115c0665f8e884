"""The ImageNet weights a first "Learn from my slices" needs: found in the torch hub cache, or
downloaded once after the user agrees, with progress.

The engine never downloads (a run must not stall on the network, and every loaded file is checked
against its hash); on a fresh Slicer the hub cache is empty, so the module fills it here, before it
starts the engine. Torch-free: Slicer's own process never imports torch for this.

Example:
    >>> needed_weights("unet_mobilenet_v2", "none") is None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medtl.errors import WeightsError
from medtl.models.hub_files import (
    IMAGENET_FILES,
    Progress,
    WeightFile,
    WeightsUnreachable,
    checkpoint_path,
    download,
    is_cached,
)

__all__ = ["confirmation_text", "ensure_weights", "needed_weights"]


def needed_weights(network: str, pretrained: str) -> WeightFile | None:
    """The ImageNet file a run of ``network`` starting from ``pretrained`` needs and the hub cache
    lacks (or holds damaged); ``None`` when nothing is missing.

    Args:
        network: a registered network name (``unet_mobilenet_v2``).
        pretrained: the run's ``model.pretrained`` (``imagenet``, ``none``, a file or a package).
    """
    if pretrained != "imagenet":
        return None
    weight = IMAGENET_FILES.get(network.removeprefix("unet_"))
    if weight is None or is_cached(weight):
        return None
    return weight


def confirmation_text(weight: WeightFile) -> str:
    """The question asked once, before the download."""
    return (
        f"Learning starts from a network pretrained on ImageNet ({weight.arch}). Its weights are not on this"
        f" computer yet.\n\nDownload them now (about {weight.size_mb:.0f} MB, once) from\n{weight.url}\ninto\n"
        f"{checkpoint_path(weight.file_name)}?\n\nThe file is checked against its known SHA-256 before it is used."
    )


def ensure_weights(
    network: str,
    pretrained: str,
    *,
    confirm: Callable[[str], bool],
    progress: Progress | None = None,
    url: str | None = None,
) -> Path | None:
    """Makes sure the weights a run needs are in the hub cache: asks, then downloads.

    Args:
        network: the network to train.
        pretrained: its starting weights (only ``imagenet`` can need a download).
        confirm: shows the question and returns True to download.
        progress: download progress (bytes, total); returning False stops it.
        url: the server to download from (default: torchvision's; tests serve the file locally).

    Returns:
        The downloaded file, or ``None`` when nothing was needed.

    Raises:
        RuntimeError: declined, offline (saying which file to put where), or a file that is refused.
    """
    weight = needed_weights(network, pretrained)
    if weight is None:
        return None
    if not confirm(confirmation_text(weight)):
        raise RuntimeError(
            f"Learning needs the ImageNet weights of {weight.arch}. Choose to download them, put"
            f" {weight.file_name} at {checkpoint_path(weight.file_name)}, or learn from random weights."
        )
    try:
        return download(weight, url=url, progress=progress)
    except WeightsUnreachable as err:
        raise RuntimeError(str(err)) from None
    except WeightsError as err:  # refused or stopped: nothing was saved
        raise RuntimeError(str(err)) from None
