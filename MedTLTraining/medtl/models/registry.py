"""The model registry: every network MedTL can fine-tune, by name.

Every registered network is a :class:`SegmentationNet`: an input adapter (replicate grey to RGB
and normalise as the ImageNet encoder expects, so preprocessing and padding stay in the windowed
[0, 1] space where 0 means air), a core network, and, where it has one, an ``encoder`` that the
strategies freeze and unfreeze.

Example:
    >>> net = build_model("unet_resnet18", num_classes=3, pretrained="none")
    >>> net(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 3, 64, 64])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.networks.nets import FlexibleUNet, SegResNet, UNet
from torch import nn

import medtl.models.encoders  # noqa: F401 - registers the tv-* FlexibleUNet backbones
from medtl.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetInput(nn.Module):
    """Maps a grey image in [0, 1] to the 3-channel, ImageNet-normalised input of the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class SegmentationNet(nn.Module):
    """Input adapter + core network; knows its encoder so strategies can freeze it.

    While the encoder is frozen its BatchNorm layers stay in eval mode even in ``train()``: their
    running statistics are part of what was pretrained.
    """

    def __init__(self, core: nn.Module, input_adapter: nn.Module | None = None) -> None:
        super().__init__()
        self.input_adapter = input_adapter if input_adapter is not None else nn.Identity()
        self.core = core
        self.encoder_frozen = False

    @property
    def encoder(self) -> nn.Module | None:
        return getattr(self.core, "encoder", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(self.input_adapter(x))

    def train(self, mode: bool = True) -> SegmentationNet:
        super().train(mode)
        if mode and self.encoder_frozen and self.encoder is not None:
            self.encoder.eval()
        return self


@dataclass(frozen=True)
class ModelSpec:
    name: str
    spatial_dims: int
    imagenet: bool  # pretrained ImageNet weights are available through torchvision
    build: Callable[[int, bool], nn.Module]  # (num_classes, imagenet_pretrained) -> core
    description: str
    has_encoder: bool = True
    adapter: bool = True
    divisor: int = 32  # input sizes must be multiples of this (the encoder's total stride)


def _flexible_unet_2d(arch: str) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        return FlexibleUNet(
            in_channels=3, out_channels=num_classes, backbone=f"tv-{arch}", pretrained=pretrained, spatial_dims=2
        )

    return build


def _resnet_unet_3d(depth: int) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        # MONAI's own ResNet encoder has MedicalNet's layout; its weights come from a local file.
        return FlexibleUNet(
            in_channels=1, out_channels=num_classes, backbone=f"resnet{depth}", pretrained=False, spatial_dims=3
        )

    return build


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    MODELS[spec.name] = spec


for _arch in ("mobilenet_v2", "resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0"):
    register(
        ModelSpec(
            name=f"unet_{_arch}",
            spatial_dims=2,
            imagenet=True,
            build=_flexible_unet_2d(_arch),
            description=f"2D U-Net (MONAI FlexibleUNet) on torchvision's ImageNet {_arch}",
        )
    )
for _depth in (10, 18, 34, 50):
    register(
        ModelSpec(
            name=f"unet3d_resnet{_depth}",
            spatial_dims=3,
            imagenet=False,
            build=_resnet_unet_3d(_depth),
            description=f"3D U-Net on MONAI's ResNet-{_depth} encoder (MedicalNet/Med3D weights from a file)",
            adapter=False,
        )
    )
register(
    ModelSpec(
        name="unet3d",
        spatial_dims=3,
        imagenet=False,
        build=lambda n, _p: UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=n,
            channels=(16, 32, 64, 128, 256),
            strides=(2, 2, 2, 2),
            num_res_units=2,
            norm="batch",
        ),
        description="MONAI 3D residual U-Net",
        has_encoder=False,
        adapter=False,
        divisor=16,
    )
)
register(
    ModelSpec(
        name="segresnet3d",
        spatial_dims=3,
        imagenet=False,
        build=lambda n, _p: SegResNet(spatial_dims=3, in_channels=1, out_channels=n, init_filters=16, norm="batch"),
        description="MONAI SegResNet (3D)",
        has_encoder=False,
        adapter=False,
        divisor=8,
    )
)


def build_model(name: str, *, num_classes: int, pretrained: str = "none") -> SegmentationNet:
    """Builds a registered network.

    Args:
        name: registry name (see :data:`MODELS`).
        num_classes: output channels, background included.
        pretrained: ``"imagenet"``, ``"none"`` or a local weight file (matched key by key; see
            :func:`medtl.models.weights.load_matching`).
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; registered: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    if pretrained == "imagenet" and not spec.imagenet:
        raise ConfigError(f"model '{name}' has no ImageNet weights; use 'none' or a weight file")
    core = spec.build(num_classes, pretrained == "imagenet")
    model = SegmentationNet(core, ImageNetInput() if spec.adapter else None)
    if pretrained not in ("imagenet", "none"):
        from medtl.models.weights import load_matching, read_state_dict

        model.load_report = load_matching(model, read_state_dict(pretrained))
    return model
