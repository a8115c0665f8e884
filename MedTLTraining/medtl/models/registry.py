"""The model registry: every network MedTL can fine-tune, by name.

Every registered network is a :class:`TransferNet`: an input adapter (replicate grey to RGB and
normalise as an ImageNet encoder expects, so preprocessing and padding stay in the windowed [0, 1]
space where 0 means air), a core network, and the core's pretrained encoder cut into *stages*
(input side first). Strategies freeze, unfreeze and set learning rates stage by stage; every
parameter outside the stages (decoder, new head) is the ``head``.

Segmentation networks output (N, classes + background, *spatial) logits; classifiers output
(N, classes) logits.

Example:
    >>> net = build_model("unet_resnet18", num_classes=3, pretrained="none")
    >>> net(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 3, 64, 64])
    >>> len(net.encoder_stages())
    5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.nets import FlexibleUNet, SegResNet, SwinUNETR, UNet
from torch import nn

import medtl.models.encoders  # noqa: F401 - registers the tv-* FlexibleUNet backbones
from medtl.adaptation.dsbn import DomainBatchNorm
from medtl.errors import ConfigError
from medtl.models.spec import ModelSpec, group_modules, resnet_stages  # noqa: F401 - resnet_stages: part of the registry's API

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetInput(nn.Module):
    """Maps a grey image in [0, 1] to the 3-channel, ImageNet-normalised input of the encoder.

    A 3-channel input (2.5D: a slice and its two neighbours) is normalised as it is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class TransferNet(nn.Module):
    """Input adapter + core network; knows its encoder stages so strategies can freeze them.

    Frozen stages keep their BatchNorm layers in eval mode even in ``train()``: their running
    statistics are part of what was pretrained (domain-specific BatchNorm excepted).
    """

    def __init__(self, core: nn.Module, input_adapter: nn.Module | None = None, *, name: str = "") -> None:
        super().__init__()
        self.input_adapter = input_adapter if input_adapter is not None else nn.Identity()
        self.core = core
        self.name = name
        self.frozen_stages: set[int] = set()

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.name]

    @property
    def encoder(self) -> nn.Module | None:
        return getattr(self.core, "encoder", None)

    def encoder_stages(self) -> list[nn.Module]:
        """The pretrained encoder's stages from the input side to the output side ([] if none)."""
        stages = self.spec.stages
        return stages(self.core) if stages is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(self.input_adapter(x))

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if mode and self.frozen_stages:
            stages = self.encoder_stages()
            for index in self.frozen_stages:
                stages[index].eval()
                # Domain-specific BatchNorm still learns each domain's statistics in a frozen stage:
                # telling the domains apart there is the point of it (its weights stay frozen).
                for module in stages[index].modules():
                    if isinstance(module, DomainBatchNorm):
                        module.train()
        return self


def stage_output_module(stage: nn.Module) -> nn.Module:
    """The module whose output is ``stage``'s output, for a forward hook.

    A stage may be a list of modules (a stem of conv + norm, a Swin stage) or a Sequential made
    up for the cut (a slice of a classifier's ``features``) that the network never calls itself:
    its output is the output of its last module, which the network does call. A bare
    ``nn.Module`` is a holder of that kind too (ViT's patch embedding).
    """
    while (isinstance(stage, (nn.ModuleList, nn.Sequential)) or type(stage) is nn.Module) and any(stage.children()):
        stage = list(stage.children())[-1]
    return stage


def stage_tensor(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The feature tensor of a stage's output (some blocks return a tuple with extras after it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def pool_stage_output(feature: torch.Tensor) -> torch.Tensor:
    """One vector (N, C) per sample: the stage's features averaged over the image.

    Transformer stages give tokens (N, L, C), averaged over the tokens; convolutional stages give
    maps (N, C, *spatial), averaged over space; a vector (N, C) is already one.
    """
    if feature.dim() == 3:
        return feature.mean(dim=1)
    if feature.dim() == 2:
        return feature
    return feature.flatten(2).mean(dim=2)


def _flexible_unet_2d(arch: str) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        return FlexibleUNet(
            in_channels=3, out_channels=num_classes, backbone=f"tv-{arch}", pretrained=pretrained, spatial_dims=2
        )

    return build


def _tv_unet_stages(core: nn.Module) -> list[nn.Module]:
    return list(core.encoder.stages)


def _resnet_unet_3d(depth: int) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        # MONAI's own ResNet encoder has MedicalNet's layout; its weights come from a local file.
        return FlexibleUNet(
            in_channels=1, out_channels=num_classes, backbone=f"resnet{depth}", pretrained=False, spatial_dims=3
        )

    return build


def _swinunetr_stages(core: nn.Module) -> list[nn.Module]:
    vit = core.swinViT
    return [group_modules(vit.patch_embed), vit.layers1, vit.layers2, vit.layers3, vit.layers4]


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    MODELS[spec.name] = spec


for _arch in ("mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "efficientnet_b0"):
    register(
        ModelSpec(
            name=f"unet_{_arch}",
            spatial_dims=2,
            imagenet=True,
            build=_flexible_unet_2d(_arch),
            stages=_tv_unet_stages,
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
            stages=lambda core: resnet_stages(core.encoder),
            description=f"3D U-Net on MONAI's ResNet-{_depth} encoder (MedicalNet/Med3D weights from a file)",
            adapter=False,
        )
    )
register(
    ModelSpec(
        name="swinunetr3d",
        spatial_dims=3,
        imagenet=False,
        # feature_size 48 is the width of the published self-supervised Swin encoder weights.
        build=lambda n, _p: SwinUNETR(in_channels=1, out_channels=n, feature_size=48, spatial_dims=3),
        stages=_swinunetr_stages,
        description="MONAI SwinUNETR (3D); its Swin encoder loads the self-supervised weights from a file",
        adapter=False,
        min_size=64,  # instance norm at the 1/32 bottleneck needs more than one voxel
        batchnorm=False,  # instance and layer norm
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
        adapter=False,
        divisor=8,
    )
)

from medtl.models.classifiers import register_classifiers  # noqa: E402 - registers into MODELS, defined above

register_classifiers(register)


def build_model(name: str, *, num_classes: int, pretrained: str = "none") -> TransferNet:
    """Builds a registered network.

    Args:
        name: registry name (see :data:`MODELS`).
        num_classes: output channels: background included for segmentation, the classes for a
            classifier.
        pretrained: ``"imagenet"``, ``"none"``, a local weight file or a model package (matched
            key by key; see :func:`medtl.models.weights.load_matching`).
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; registered: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    if pretrained == "imagenet" and not spec.imagenet:
        raise ConfigError(f"model '{name}' has no ImageNet weights; use 'none' or a weight file")
    core = spec.build(num_classes, pretrained == "imagenet")
    model = TransferNet(core, ImageNetInput() if spec.adapter else None, name=name)
    if pretrained not in ("imagenet", "none"):
        from medtl.models.weights import load_matching, read_state_dict

        model.load_report = load_matching(model, read_state_dict(pretrained))
    return model
