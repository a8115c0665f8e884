"""Classification networks: torchvision ImageNet classifiers (2D) and MONAI ResNets (3D), each
with a new head for the user's classes.

The pretrained classifier is built whole, its ImageNet weights loaded with torchvision's own key
names (hub cache, hash-checked), and only then is its last linear layer replaced, so everything
but the head is pretrained. Each architecture is cut into five encoder stages (input first) for
gradual unfreezing and discriminative learning rates.

Multi-label tasks (CheXNet-style: several findings per image) use the same networks with one
sigmoid output per class; the loss decides, not the network.

Example:
    >>> from medtl.models.registry import build_model
    >>> net = build_model("cls_resnet50", num_classes=4)
    >>> net(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Callable

import torch  # noqa: F401 - the example uses it
import torchvision
from monai.networks.nets import resnet as monai_resnet
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args
from torch import nn

from medtl.models.spec import ModelSpec, resnet_stages


def _densenet(net: nn.Module) -> list[nn.Module]:
    f = net.features
    return [
        nn.ModuleList([f.conv0, f.norm0]),
        f.denseblock1,
        nn.ModuleList([f.transition1, f.denseblock2]),
        nn.ModuleList([f.transition2, f.denseblock3]),
        nn.ModuleList([f.transition3, f.denseblock4, f.norm5]),
    ]


def _mobilenet_v2(net: nn.Module) -> list[nn.Module]:
    f = net.features
    return [f[0:2], f[2:4], f[4:7], f[7:14], f[14:19]]


def _efficientnet(net: nn.Module) -> list[nn.Module]:
    f = net.features
    return [f[0:2], f[2:3], f[3:4], f[4:6], f[6:9]]


def _inception_v3(net: nn.Module) -> list[nn.Module]:
    return [
        nn.ModuleList([net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3]),
        nn.ModuleList([net.Conv2d_3b_1x1, net.Conv2d_4a_3x3]),
        nn.ModuleList([net.Mixed_5b, net.Mixed_5c, net.Mixed_5d]),
        nn.ModuleList([net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e]),
        nn.ModuleList([net.Mixed_7a, net.Mixed_7b, net.Mixed_7c]),
    ]


def _vit(net: nn.Module) -> list[nn.Module]:
    # The class token and position embedding are bare parameters; a detached holder groups them
    # with the patch projection without adding keys to the state dict.
    embed = nn.Module()
    embed.conv_proj = net.conv_proj
    embed.register_parameter("class_token", net.class_token)
    embed.register_parameter("pos_embedding", net.encoder.pos_embedding)
    blocks = list(net.encoder.layers)
    return [
        embed,
        nn.ModuleList(blocks[0:3]),
        nn.ModuleList(blocks[3:6]),
        nn.ModuleList(blocks[6:9]),
        nn.ModuleList([*blocks[9:12], net.encoder.ln]),
    ]


def _new_head(net: nn.Module, arch: str, num_classes: int) -> None:
    if arch.startswith("resnet") or arch == "inception_v3":
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    elif arch.startswith("densenet"):
        net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    elif arch.startswith(("mobilenet", "efficientnet")):
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
    elif arch.startswith("vit"):
        net.heads.head = nn.Linear(net.heads.head.in_features, num_classes)
    else:
        raise ValueError(f"no head rule for {arch}")


def _tv_classifier(arch: str) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        kwargs: dict = {}
        if arch == "inception_v3":
            # As torchvision builds it for its ImageNet weights: the auxiliary head exists to take
            # the file's keys, and the input is re-normalised the way those weights were trained.
            # transform_input is not a weight: it must be on whenever the network is rebuilt (from a
            # package too), because MedTL's input adapter always hands it ImageNet-normalised input.
            kwargs = {"aux_logits": True, "transform_input": True, "init_weights": not pretrained}
        net = getattr(torchvision.models, arch)(weights=None, **kwargs)
        if pretrained:
            from medtl.models.weights import imagenet_state_dict

            net.load_state_dict(imagenet_state_dict(arch))
        if arch == "inception_v3":
            net.aux_logits = False
            net.AuxLogits = None
        _new_head(net, arch, num_classes)
        return net

    return build


def _monai_resnet_3d(depth: int) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        # MedicalNet's layout, so its files load key by key: conv1 7×7×7 with stride 2, and the
        # shortcut type and downsample bias MedicalNet used for this depth (A for 18 and 34).
        bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
        return getattr(monai_resnet, f"resnet{depth}")(
            spatial_dims=3,
            n_input_channels=1,
            num_classes=num_classes,
            conv1_t_stride=2,
            shortcut_type=shortcut_type,
            bias_downsample=bias_downsample,
        )

    return build


# arch -> (stage cutter, minimum input size, exact input size)
TORCHVISION_CLASSIFIERS: dict[str, tuple[Callable[[nn.Module], list[nn.Module]], int, int | None]] = {
    "resnet50": (resnet_stages, 32, None),
    "resnet101": (resnet_stages, 32, None),
    "densenet121": (_densenet, 32, None),
    "inception_v3": (_inception_v3, 75, None),
    "efficientnet_b0": (_efficientnet, 32, None),
    "mobilenet_v2": (_mobilenet_v2, 32, None),
    "vit_b_16": (_vit, 224, 224),
}


def register_classifiers(register: Callable) -> None:
    for arch, (cut, min_size, exact) in TORCHVISION_CLASSIFIERS.items():
        register(
            ModelSpec(
                name=f"cls_{arch}",
                spatial_dims=2,
                imagenet=True,
                build=_tv_classifier(arch),
                stages=cut,
                task="classification",
                description=f"2D classifier: torchvision's ImageNet {arch} with a new head",
                divisor=1,
                min_size=min_size,
                exact_size=exact,
                batchnorm=arch != "vit_b_16",  # layer norm only
            )
        )
    for depth in (10, 18, 34, 50):
        register(
            ModelSpec(
                name=f"cls3d_resnet{depth}",
                spatial_dims=3,
                imagenet=False,
                build=_monai_resnet_3d(depth),
                stages=resnet_stages,
                task="classification",
                description=f"3D classifier: MONAI ResNet-{depth} (MedicalNet/Med3D weights from a file), new head",
                adapter=False,
                divisor=1,
            )
        )
