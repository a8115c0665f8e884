"""``medtl adapt``: AdaBN for a model package, and the target-domain data it is estimated on.

A plain package gets every BatchNorm layer's statistics re-estimated on the target images. A
domain-specific BatchNorm (DSBN) package re-estimates the named domain's layers, or gains a layer
set for a domain it has not seen (then the default domain for prediction). The new package
records the method and the target data by hash (no file names: they may identify patients).

Example:
    >>> import tempfile, SimpleITK as sitk
    >>> from medtl.models.registry import build_model
    >>> from medtl.any_package import load_package
    >>> from medtl.package import save_package
    >>> d = tempfile.mkdtemp()
    >>> cfg = RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"}})
    >>> source = save_package(f"{d}/site_a", build_model("unet_resnet18", num_classes=2), cfg)
    >>> sitk.WriteImage(sitk.GaussianSource(sitk.sitkFloat32, [48, 48, 6], [10, 10, 3]), f"{d}/b.nrrd")
    >>> adapted = load_package(adapt_package(source, [f"{d}/b.nrrd"], f"{d}/site_b"))
    >>> adapted.manifest["adaptation"][0]["method"], adapted.manifest["adaptation"][0]["target"]["images"]
    ('adabn', 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl.adaptation.batchnorm import adapt_batchnorm, batchnorm_layers
from medtl.adaptation.dsbn import add_domain, domain_layers, use_domain
from medtl.config import RunConfig
from medtl.data.checks import read_checked_image
from medtl.data.io import sha256_file
from medtl.errors import DataError
from medtl.events import EventSink
from medtl.provenance import combined_sha256


def target_images(paths: Sequence[str | Path], cfg: RunConfig) -> list[np.ndarray]:
    """The target images preprocessed as the run preprocesses its inputs."""
    from medtl.package import preprocess

    if not paths:
        raise DataError("no target-domain images given")
    ndim = cfg.spatial_dims if cfg.is_classification else 3
    policy, scalar = cfg.preprocessing.nan_policy, not (cfg.is_classification and cfg.spatial_dims == 2)
    return [preprocess(read_checked_image(p, policy=policy, scalar_3d=scalar), cfg, ndim=ndim) for p in paths]


def statistics_pass(
    arrays: Sequence[np.ndarray], cfg: RunConfig, device: torch.device | str, events: EventSink | None = None
) -> Callable[[torch.nn.Module], None]:
    """Feeds every target image through a network the way inference does (see
    :func:`~medtl.adaptation.batchnorm.adapt_batchnorm`)."""
    from medtl.infer import predict_class_probabilities, predict_run_volume

    def run(model: torch.nn.Module) -> None:
        if cfg.is_classification:
            predict_class_probabilities(
                model, arrays, size=cfg.preprocessing.patch_size, multi_label=cfg.data.multi_label, device=device
            )
            return
        for index, volume in enumerate(arrays):
            predict_run_volume(cfg, model, volume, device=device)
            if events is not None:
                events.emit("step", label="adapt", step=index + 1, total_steps=len(arrays))

    return run


def target_record(paths: Sequence[str | Path]) -> dict[str, Any]:
    """How many target images, their sha256 each (sorted) and one hash over all of them."""
    hashes = sorted(sha256_file(p) for p in paths)
    return {
        "images": len(hashes),
        "sha256": hashes,
        "combined_sha256": combined_sha256(hashes),
    }


def adapt_package(
    package_path: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    domain: str | None = None,
    device: torch.device | str = "cpu",
    events: EventSink | None = None,
) -> Path:
    """Writes ``out``: the package at ``package_path`` with BatchNorm statistics re-estimated on
    ``images`` (AdaBN). ``domain`` names the target domain of a DSBN package (required there)."""
    from medtl.any_package import load_package
    from medtl.package import save_package

    package = load_package(package_path)
    cfg, model, manifest = package.config, package.model, package.manifest
    domains = list(package.domains)
    if domains and not domain:
        raise DataError(
            f"{package.path} has one BatchNorm per domain ({', '.join(domains)}): name the target domain with "
            "--domain (a known one is re-estimated, a new one is added)"
        )
    if not domains and domain:
        raise DataError(f"{package.path} has no domain-specific BatchNorm; --domain does not apply (leave it out)")
    if not domains and not batchnorm_layers(model):
        raise DataError(f"{cfg.model.name} has no BatchNorm layers: AdaBN does not apply to it")
    arrays = target_images(images, cfg)
    run = statistics_pass(arrays, cfg, device, events)
    model.to(device)
    record: dict[str, Any] = {"method": "adabn", "target": target_record(images)}
    if domains:
        if domain in domains:
            index = domains.index(domain)
        else:
            index = add_domain(model)
            domains.append(domain)
        record["domain"] = domain
        with use_domain(model, index):
            layers = [layer.bns[index] for layer in domain_layers(model)]
            n = adapt_batchnorm(model, run, layers=layers)
    else:
        n = adapt_batchnorm(model, run)
    record["layers"] = n
    if events is not None:
        events.emit("message", message=f"re-estimated {n} BatchNorm layers on {len(arrays)} target image(s)")
    history = [*manifest.get("adaptation", []), record]
    extra = {
        "adaptation": history,
        "domains": domains,
        "default_domain": domain if domains else None,  # what the adapted package predicts as by default
        # The package's metrics were measured before this adaptation, on the source domain.
        "metrics_before_adaptation": manifest.get("metrics_before_adaptation", manifest.get("metrics", {})),
    }
    return save_package(
        out,
        model.cpu(),
        cfg,
        metrics={},
        extra=extra,
        training_data=manifest.get("training_data", []),
    )
