"""Grad-CAM (MONAI's ``GradCAM``) as a volume with the input image's geometry, so Slicer shows it
as an overlay on the image it explains.

- Classifiers: the map of a class (default: the predicted one) on the resized network input,
  brought back to the image's grid.
- Segmentation networks: Seg-Grad-CAM (Vinogradova et al., AAAI 2020). The network is wrapped so
  that a class's score is its mean logit over the voxels the network assigns to that class;
  where the network finds none of the class the score is constant and the map is zero. 2D
  networks go slice by slice (padded as in prediction), 3D networks by MONAI sliding windows, the
  window maps blended as predictions are.

The map is ReLU(Σ_c w_c A_c) of the target layer (default: the deepest encoder stage, whose
coarse grid is why Grad-CAM is blurry), upsampled, and scaled by its maximum over the whole
volume: 0 where the class score does not depend on the region, 1 where it depends most. A
slice-by-slice min-max would light up empty slices.
"""

from __future__ import annotations

import copy

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from medtl.data.geometry import SLICE_AXES
from medtl.errors import DataError


class SegmentationClassScores(nn.Module):
    """(N, C) class scores of a segmentation network: each class's mean logit over the voxels the
    network assigns to it (the mask is detached: only the logits carry gradients)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        mask = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        mask = mask.detach()
        dims = tuple(range(2, logits.ndim))
        return (logits * mask).sum(dims) / mask.sum(dims).clamp(min=1.0)


# Grad-CAM localises on the target layer's grid; below this many cells per axis (a 2 x 2 grid
# is what MobileNet's last stage gives a 64-pixel image) the upsampled map only says "a corner".
MIN_GRID = 4


def default_target_layer(model: nn.Module, example: torch.Tensor, *, segmentation: bool = False) -> str:
    """The dotted name of the default Grad-CAM layer for an input like ``example``.

    - Classifiers: the deepest encoder stage whose grid has at least :data:`MIN_GRID` cells along
      every axis (the deepest stage otherwise).
    - Segmentation networks: the last convolution, in call order, before the output layer (the
      decoder's last features). Measured on a small U-Net trained on discs: its map's mean was
      0.54 inside the disc against 0.02 outside, while every encoder stage gave near-equal means
      inside and out: a segmentation network decides where in its decoder.
    """
    from medtl.models.registry import stage_output_module

    names = {id(m): n for n, m in model.named_modules()}
    stages = [] if segmentation or not hasattr(model, "encoder_stages") else model.encoder_stages()
    if stages:
        modules = [stage_output_module(stage) for stage in stages]
    else:
        modules = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        if not modules:
            raise DataError("the network has no convolution to compute Grad-CAM on; name a target layer")
    calls: list[tuple[nn.Module, tuple[int, ...]]] = []

    def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        calls.append((module, tuple(output.shape[1:])))

    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not stages:
        features = [m for m, shape in calls if shape[0] > out.shape[1]]
        return names[id(features[-1] if features else calls[-1][0])]
    for module, shape in reversed(calls):
        if min(shape[1:]) >= MIN_GRID:
            return names[id(module)]
    return names[id(calls[-1][0])]


def _check_layer(model: nn.Module, layer: str) -> None:
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        hint = ", ".join(n for n in names if n.count(".") <= 2)[:600]
        raise DataError(f"Grad-CAM target layer '{layer}' is not in the network; some layers: {hint} …")


def _cam(net: nn.Module, layer: str):
    from monai.visualize import GradCAM

    # Raw maps: normalised once over the whole volume (MONAI's default flips and scales each sample).
    return GradCAM(nn_module=net, target_layers=layer, postprocessing=lambda m: m)


def gradcam_array(
    package,
    volume: np.ndarray,
    *,
    class_index: int,
    target_layer: str | None = None,
    device: str | torch.device = "cpu",
    events=None,
) -> np.ndarray:
    """Grad-CAM of the package's network on a preprocessed array ((z, y, x), or (y, x) for a 2D
    classifier), on the array's own grid, scaled to [0, 1]."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import Resize

    from medtl.data.slices import slice_stack

    cfg = package.config
    # A copy: MONAI's hooks stay registered on the module they wrap, and it turns off in-place
    # activations; the package's network must come out of this unchanged.
    net = copy.deepcopy(package.model).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(True)
    if target_layer:
        _check_layer(net, target_layer)

    def layer_for(example: torch.Tensor) -> str:
        return target_layer or default_target_layer(net, example, segmentation=not cfg.is_classification)

    with torch.inference_mode(False), torch.enable_grad():
        if cfg.is_classification:
            size = tuple(cfg.preprocessing.patch_size)
            x = Resize(spatial_size=size, mode="area")(torch.from_numpy(volume[None]))
            x = torch.as_tensor(x, dtype=torch.float32)[None].to(device)
            heat = _cam(net, layer_for(x))(x, class_idx=class_index)[0, 0]
            out = Resize(spatial_size=volume.shape, mode="bilinear" if volume.ndim == 2 else "trilinear")(
                heat[None].detach().cpu()
            )[0]
            result = np.asarray(torch.as_tensor(out).numpy(), dtype=np.float32)
        elif cfg.spatial_dims == 2:
            scorer = SegmentationClassScores(net)
            divisor = getattr(net.spec, "divisor", 32)
            # Slices of the plane the network was trained on, moved back at the end.
            axis = SLICE_AXES[cfg.preprocessing.slice_axis]
            volume = np.moveaxis(volume, axis, 0)
            n, height, width = volume.shape
            pad_h, pad_w = -height % divisor, -width % divisor
            maps, cam = [], None
            for start in range(0, n, 8):
                stop = min(n, start + 8)
                if cfg.preprocessing.context_slices:
                    context = cfg.preprocessing.context_slices
                    chunk = np.stack([slice_stack(volume, z, context) for z in range(start, stop)])
                else:
                    chunk = volume[start:stop, None]
                x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
                x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))
                cam = cam or _cam(scorer, "net." + layer_for(x))
                maps.append(cam(x, class_idx=class_index)[:, 0, :height, :width].detach().cpu())
                if events is not None:
                    events.emit("step", label="gradcam", step=stop, total_steps=n)
            result = np.moveaxis(torch.cat(maps).numpy().astype(np.float32), 0, axis)
        else:
            scorer = SegmentationClassScores(net)
            roi = tuple(cfg.preprocessing.patch_size)
            x = torch.from_numpy(np.ascontiguousarray(volume[None, None], dtype=np.float32)).to(device)
            cam = _cam(scorer, "net." + layer_for(torch.zeros(1, 1, *roi, device=device)))
            heat = sliding_window_inference(
                x,
                roi_size=roi,
                sw_batch_size=1,
                predictor=lambda window: cam(window, class_idx=class_index).detach(),
                overlap=0.25,
                mode="gaussian",
            )
            result = torch.as_tensor(heat)[0, 0].cpu().numpy().astype(np.float32)
    result = np.nan_to_num(np.clip(result, 0, None))
    peak = float(result.max())
    return result / peak if peak > 0 else result


def gradcam_image(
    package,
    image: sitk.Image,
    *,
    class_index: int | None = None,
    target_layer: str | None = None,
    device: str | torch.device = "cpu",
    domain: str | None = None,
    events=None,
) -> sitk.Image:
    """Grad-CAM of ``image`` as a float32 image in [0, 1] with exactly ``image``'s geometry.

    ``class_index``: a classifier's class index (default: the predicted class), or a segmentation
    label value (default 1).
    """
    from medtl.any_package import classify_image
    from medtl.package import on_input_grid, preprocess, working_image

    if hasattr(package, "members"):
        # An ensemble looks where its members look: the mean of their maps, rescaled. Every member
        # explains the class the ensemble predicts, not its own.
        if class_index is None and package.config.is_classification:
            probs = classify_image(package, image, device=device, domain=domain)
            class_index = int(np.argmax([probs[n] for n in package.config.data.label_names]))
        maps = [
            sitk.GetArrayFromImage(
                gradcam_image(
                    m, image, class_index=class_index, target_layer=target_layer, device=device, domain=domain
                )
            )
            for m in package.members
        ]
        mean = np.mean(maps, axis=0)
        result = sitk.GetImageFromArray((mean / max(float(mean.max()), 1e-12)).astype(np.float32))
        result.CopyInformation(image)
        return result
    cfg = package.config
    if cfg.is_classification:
        if class_index is None:
            probs = classify_image(package, image, device=device, domain=domain)
            class_index = int(np.argmax([probs[n] for n in cfg.data.label_names]))
        limit = len(cfg.data.label_names) - 1
    else:
        class_index = 1 if class_index is None else class_index
        limit = cfg.num_classes - 1
    if not 0 <= class_index <= limit or (not cfg.is_classification and class_index == 0):
        names = cfg.data.label_names
        raise DataError(
            f"Grad-CAM class {class_index}: the model's "
            + (f"classes are 0..{limit} ({', '.join(names)})" if cfg.is_classification else f"labels are 1..{limit}")
        )
    ndim = cfg.spatial_dims if cfg.is_classification else 3
    volume = preprocess(image, cfg, ndim=ndim)
    with package.domain_context(domain):
        heat = gradcam_array(
            package, volume, class_index=class_index, target_layer=target_layer, device=device, events=events
        )
    if heat.ndim == 2 and image.GetDimension() == 3:
        heat = heat[None]  # a single-slice volume read as a 2D image
    return on_input_grid(heat, working_image(image, cfg), image, cfg)
