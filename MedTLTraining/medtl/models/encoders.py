"""torchvision ImageNet backbones as MONAI FlexibleUNet encoders.

FlexibleUNet asks its registry (``FLEXUNET_BACKBONE``) for encoders that return five feature maps
at strides 2, 4, 8, 16 and 32. Each class below cuts a torchvision classifier into those five
stages. FlexibleUNet cannot download, so with ``pretrained=True`` the encoder loads its own weights
through :func:`medtl.models.weights.imagenet_state_dict` (torch hub cache, hash-checked) before
it is cut, so torchvision's own key names are used for loading.

Example:
    >>> from monai.networks.nets import FlexibleUNet
    >>> net = FlexibleUNet(in_channels=3, out_channels=2, backbone="tv-resnet18")
    >>> net(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 2, 64, 64])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn


def _mobilenet_stages(net: nn.Module) -> list[nn.Module]:
    f = net.features
    return [f[0:2], f[2:4], f[4:7], f[7:14], f[14:18]]


def _resnet_stages(net: nn.Module) -> list[nn.Module]:
    return [
        nn.Sequential(net.conv1, net.bn1, net.relu),
        nn.Sequential(net.maxpool, net.layer1),
        net.layer2,
        net.layer3,
        net.layer4,
    ]


def _densenet_stages(net: nn.Module) -> list[nn.Module]:
    f = net.features
    return [
        nn.Sequential(f.conv0, f.norm0, f.relu0),
        nn.Sequential(f.pool0, f.denseblock1),
        nn.Sequential(f.transition1, f.denseblock2),
        nn.Sequential(f.transition2, f.denseblock3),
        nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU(inplace=True)),
    ]


def _efficientnet_stages(net: nn.Module) -> list[nn.Module]:
    f = net.features
    return [f[0:2], f[2:3], f[3:4], f[4:6], f[6:8]]


# arch -> (stage cutter, channels of the five outputs)
ARCHS: dict[str, tuple[Callable[[nn.Module], list[nn.Module]], tuple[int, ...]]] = {
    "mobilenet_v2": (_mobilenet_stages, (16, 24, 32, 96, 320)),
    "resnet18": (_resnet_stages, (64, 64, 128, 256, 512)),
    "resnet34": (_resnet_stages, (64, 64, 128, 256, 512)),
    "resnet50": (_resnet_stages, (64, 256, 512, 1024, 2048)),
    "resnet101": (_resnet_stages, (64, 256, 512, 1024, 2048)),
    "densenet121": (_densenet_stages, (64, 256, 512, 1024, 1024)),
    "efficientnet_b0": (_efficientnet_stages, (16, 24, 40, 112, 320)),
}


class TorchvisionEncoder(nn.Module, BaseEncoder):
    """A torchvision classifier's feature stages, usable as a FlexibleUNet backbone ``tv-<arch>``.

    Args:
        arch: torchvision architecture name (a key of :data:`ARCHS`).
        spatial_dims: must be 2 (torchvision backbones are 2D).
        in_channels: must be 3 (MedTL's input adapter replicates grey images to RGB).
        pretrained: load ImageNet weights from the torch hub cache (hash-checked, never downloads).
    """

    def __init__(self, arch: str, spatial_dims: int, in_channels: int, pretrained: bool) -> None:
        super().__init__()
        if spatial_dims != 2 or in_channels != 3:
            raise ValueError(
                f"tv-{arch} is a 2D RGB encoder (got spatial_dims={spatial_dims}, in_channels={in_channels})"
            )
        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            from medtl.models.weights import imagenet_state_dict

            net.load_state_dict(imagenet_state_dict(arch))
        cut, _ = ARCHS[arch]
        self.stages = nn.ModuleList(cut(net))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"arch": a, "spatial_dims": 2, "in_channels": 3, "pretrained": False} for a in ARCHS]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [channels for _, channels in ARCHS.values()]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5] * len(ARCHS)

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return [f"tv-{a}" for a in ARCHS]


if "tv-mobilenet_v2" not in FLEXUNET_BACKBONE.register_dict:
    FLEXUNET_BACKBONE.register_class(TorchvisionEncoder)
