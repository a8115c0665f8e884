"""What the registry knows of a network (:class:`ModelSpec`), and the encoder-stage helpers that
both the segmentation registry and the classifiers use; imports no registry, so both can use it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    spatial_dims: int
    imagenet: bool  # pretrained ImageNet weights are available through torchvision
    build: Callable[[int, bool], nn.Module]  # (num_classes, imagenet_pretrained) -> core
    description: str
    stages: Callable[[nn.Module], list[nn.Module]] | None = None  # core -> encoder stages, input first
    task: str = "segmentation"  # or "classification"
    adapter: bool = True
    divisor: int = 32  # input sizes must be multiples of this (the encoder's total stride)
    min_size: int = 16
    exact_size: int | None = None  # e.g. ViT-B/16's position embedding is for 224 × 224 only
    batchnorm: bool = True  # AdaBN and domain-specific BatchNorm need BatchNorm layers

    @property
    def has_encoder(self) -> bool:
        return self.stages is not None


def group_modules(*modules: nn.Module) -> nn.Module:
    # A handle over modules that already live in the network; not attached to it, so the state
    # dict is unchanged.
    return nn.ModuleList(modules)


def resnet_stages(net: nn.Module) -> list[nn.Module]:
    """Stem, layer1..layer4 of a torchvision or MONAI ResNet (2D or 3D)."""
    return [group_modules(net.conv1, net.bn1), net.layer1, net.layer2, net.layer3, net.layer4]
