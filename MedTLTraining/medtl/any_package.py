"""Any model package, one network's or an ensemble's: what ``medtl predict``, ``info``,
``evaluate``, ``explain``, ``export``, ``drift`` and the run code load and run.

It sits above :mod:`medtl.package` (one network) and :mod:`medtl.ensemble` (several, each member
loaded and run by :mod:`medtl.package`) and hands each package to the module that knows it, so
neither of them needs the other's dispatch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from medtl import package as one_network
from medtl.ensemble import EnsemblePackage, classify_members, describe_ensemble, load_ensemble, segment_members
from medtl.manifest import read_manifest
from medtl.package import ModelPackage, adaptation_and_metrics_lines, read_verified_manifest, summary_lines


def load_package(path: str | Path) -> ModelPackage | EnsemblePackage:
    """Loads a package after checking its signature (:func:`medtl.signing.verify_package`) and
    every listed file's sha256 (an ensemble's members each in turn): an :class:`EnsemblePackage`
    for an ensemble, else a :class:`~medtl.package.ModelPackage`."""
    path = Path(path)
    manifest, signature = read_verified_manifest(path)
    if manifest.get("ensemble"):
        return load_ensemble(path, manifest)
    return one_network.load_network_package(path, manifest, signature)


def segment_image(
    package: ModelPackage | EnsemblePackage,
    image: sitk.Image,
    *,
    device: str | torch.device = "cpu",
    events=None,
    domain: str | None = None,
) -> tuple[sitk.Image, np.ndarray]:
    """Label image (the input's geometry exactly) and softmax probabilities (C, z, y, x); an
    ensemble's are its members' combined.

    ``domain``: the image's domain for a domain-specific BatchNorm package.
    """
    if isinstance(package, EnsemblePackage):
        return segment_members(package, image, device=device, events=events, domain=domain)[:2]
    return one_network.segment_image(package, image, device=device, events=events, domain=domain)


def classify_image(
    package: ModelPackage | EnsemblePackage,
    image: sitk.Image,
    *,
    device: str | torch.device = "cpu",
    domain: str | None = None,
) -> dict[str, float]:
    """Class probabilities of one image (softmax, or one sigmoid per class when multi-label); an
    ensemble's are its members' combined."""
    if isinstance(package, EnsemblePackage):
        return classify_members(package, image, device=device, domain=domain)
    return one_network.classify_image(package, image, device=device, domain=domain)


def describe(path: str | Path) -> str:
    """A human-readable summary of a package (``medtl info``); an ensemble's lists its members."""
    manifest = read_manifest(path)
    ensemble_lines = describe_ensemble(manifest) if manifest.get("ensemble") else []
    return "\n".join(summary_lines(path, manifest) + ensemble_lines + adaptation_and_metrics_lines(manifest))
