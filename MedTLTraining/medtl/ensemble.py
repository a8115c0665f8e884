"""Ensembles: several model packages (different pretrained backbones, or the folds of a
cross-validation) combined into one package, with an uncertainty volume beside the prediction.

An ensemble package holds copies of its members (``members/0``, ``members/1`` …) and a manifest
naming how they are combined; :func:`medtl.any_package.load_package` returns an
:class:`EnsemblePackage`, and :mod:`medtl.any_package`'s ``segment_image`` / ``classify_image``,
``medtl predict`` and the Slicer module use it unchanged. Members are single networks, loaded and
run by :mod:`medtl.package`.
Each member predicts with its own preprocessing (members may differ in preset, spacing, even 2D
against 3D) and the ensemble combines their probabilities on the input image's grid:

- ``mean``: the (weighted) mean of the members' probabilities, then argmax;
- ``vote``: each member's label map votes; ties go to the higher mean probability; the vote share
  is the probability the ensemble reports.

Uncertainty (:func:`ensemble_uncertainty`): the entropy of the mean (total), the variance across
members, or the mutual information (entropy of the mean minus the mean entropy: the part due to
members disagreeing, the epistemic part).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from medtl.config import RunConfig
from medtl.data.io import array_like, replace_directory, sha256_file
from medtl.errors import DataError, WeightsError
from medtl.manifest import MANIFEST, PackageLabels, read_manifest, versions
from medtl.package import (
    ModelPackage,
    classify_image,
    load_package,
    require_classifier,
    require_segmentation,
    segment_image,
)

COMBINE = ("mean", "vote")
UNCERTAINTY = ("entropy", "variance", "mutual_information")


@dataclass
class EnsemblePackage(PackageLabels):
    path: Path
    manifest: dict[str, Any]
    members: list[ModelPackage]

    @property
    def config(self) -> RunConfig:
        """The first member's configuration (label names, task; members agree on them)."""
        return self.members[0].config

    @property
    def domains(self) -> list[str]:
        """Domains every member knows (members with one BatchNorm per domain)."""
        known = [set(m.domains) for m in self.members]
        return sorted(set.intersection(*known)) if all(known) else []

    @property
    def combine(self) -> str:
        return self.manifest["ensemble"]["combine"]

    @property
    def weights(self) -> list[float]:
        return self.manifest["ensemble"]["weights"]


def _label_key(manifest: dict[str, Any]) -> list[tuple]:
    return [(e.get("value", e.get("index")), e["name"]) for e in manifest["labels"]]


def save_ensemble(
    path: str | Path,
    members: Sequence[str | Path],
    *,
    combine: str = "mean",
    weights: Sequence[float] | None = None,
) -> Path:
    """Writes an ensemble package holding copies of ``members``; built beside ``path`` and renamed.

    Members must agree on the task and the label values and names.
    """
    if combine not in COMBINE:
        raise DataError(f"ensemble combine '{combine}': choose from {', '.join(COMBINE)}")
    members = [Path(m) for m in members]
    if len(members) < 2:
        raise DataError("an ensemble needs at least two member packages")
    weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
    if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
        raise DataError(f"ensemble weights {weights}: one non-negative weight per member, not all zero")
    manifests = [read_manifest(m) for m in members]
    _check_members(members, manifests)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        entries, files = [], {}
        for i, (member, m) in enumerate(zip(members, manifests, strict=True)):
            target = tmp / "members" / str(i)
            shutil.copytree(member, target)
            files[f"members/{i}/{MANIFEST}"] = sha256_file(target / MANIFEST)
            entries.append(_member_entry(f"members/{i}", m, weights[i]))
        manifest = _ensemble_manifest(manifests, {"combine": combine, "weights": weights, "members": entries}, files)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_members(members: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> None:
    """Members must be single models of one task that give each label value the same meaning."""
    first = manifests[0]
    for member, m in zip(members[1:], manifests[1:], strict=True):
        if m.get("ensemble"):
            raise DataError(f"{member} is itself an ensemble; list its members instead")
        if m.get("task") != first.get("task"):
            raise DataError(f"{member} is a {m.get('task')} model but {members[0]} is a {first.get('task')} model")
        if _label_key(m) != _label_key(first):
            raise DataError(
                f"{member} labels {_label_key(m)} differ from {members[0]}'s {_label_key(first)}: "
                "members must give each label value the same meaning"
            )
    if first.get("ensemble"):
        raise DataError(f"{members[0]} is itself an ensemble; list its members instead")


def _member_entry(folder: str, manifest: dict[str, Any], weight: float) -> dict[str, Any]:
    """What the ensemble's manifest says of one member (its scalar metrics, not their per-case lists)."""
    return {
        "path": folder,
        "model": manifest["model"]["name"],
        "spatial_dims": manifest["model"]["spatial_dims"],
        "preset": manifest["preprocessing"]["preset"],
        "weight": weight,
        "weights_sha256": manifest.get("files", {}).get("model.safetensors"),
        "metrics": {k: v for k, v in manifest.get("metrics", {}).items() if not isinstance(v, list)},
    }


def _ensemble_manifest(
    manifests: Sequence[dict[str, Any]], ensemble: dict[str, Any], files: dict[str, str]
) -> dict[str, Any]:
    """The ensemble's own manifest: the first member's task, labels and preprocessing, and the
    training data of all members."""
    from medtl.provenance import combined_sha256

    first = manifests[0]
    hashes = sorted({r["sha256"] for m in manifests for r in m.get("training_data", [])})
    return {
        "format_version": first.get("format_version", 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": "ensemble",
            "num_classes": first["model"]["num_classes"],
            "spatial_dims": first["model"]["spatial_dims"],
        },
        "task": first.get("task"),
        "preprocessing": first["preprocessing"],
        "labels": first["labels"],
        "config": first["config"],
        "ensemble": ensemble,
        "training_data": [{"sha256": h} for h in hashes],
        "provenance": {"files": len(hashes), "sha256": hashes, "combined_sha256": combined_sha256(hashes)},
        "metrics": {},
        "versions": versions(),
        "files": files,
    }


def load_ensemble(path: Path, manifest: dict[str, Any]) -> EnsemblePackage:
    """The ensemble at ``path`` (its manifest already read and its signature verified, see
    :func:`medtl.package.read_verified_manifest`); every member is hash-checked and verified."""
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise WeightsError(f"{path}: ensemble file missing: {name}")
        if sha256_file(file) != expected:
            raise WeightsError(f"{file}: sha256 does not match the ensemble manifest; refusing to load it")
    members = [load_package(path / entry["path"]) for entry in manifest["ensemble"]["members"]]
    return EnsemblePackage(path=path, manifest=manifest, members=members)


def combine_probabilities(member_probs: Sequence[np.ndarray], combine: str, weights: Sequence[float]) -> np.ndarray:
    """The ensemble's (C, ...) probabilities from the members' (C, ...) probabilities."""
    stack = np.stack(member_probs).astype(np.float32)
    w = np.asarray(weights, np.float32).reshape(-1, *[1] * (stack.ndim - 1))
    mean = (stack * w).sum(0) / w.sum()
    if combine == "mean":
        return mean
    classes = stack.shape[1]
    votes = np.eye(classes, dtype=np.float32)[stack.argmax(1)]  # (M, ..., C)
    share = (np.moveaxis(votes, -1, 1) * w).sum(0) / w.sum()
    # A tie in votes goes to the higher mean probability: the bonus stays below half a vote.
    out = share + mean * (0.5 * float(w.min() if w.min() > 0 else 1e-6) / float(w.sum()))
    return out / out.sum(0, keepdims=True)


def ensemble_uncertainty(member_probs: Sequence[np.ndarray], kind: str = "entropy") -> np.ndarray:
    """Per voxel (or per case), in [0, 1]: ``entropy`` of the mean probabilities over log C,
    ``variance`` of the probabilities across members (mean over classes, times 4: the largest
    variance of a probability is 1/4), or ``mutual_information`` over log C."""
    from medtl.infer import normalised_entropy

    if kind not in UNCERTAINTY:
        raise DataError(f"uncertainty '{kind}': choose from {', '.join(UNCERTAINTY)}")
    stack = np.stack(member_probs).astype(np.float32)
    mean = stack.mean(0)
    if kind == "entropy":
        return normalised_entropy(mean)
    if kind == "variance":
        return np.clip(4.0 * stack.var(0).mean(0), 0.0, 1.0).astype(np.float32)
    mean_entropy = np.mean([normalised_entropy(p) for p in stack], axis=0)
    return np.clip(normalised_entropy(mean) - mean_entropy, 0.0, 1.0).astype(np.float32)


def segment_members(
    ensemble: EnsemblePackage,
    image: sitk.Image,
    *,
    device: str | torch.device = "cpu",
    events=None,
    domain: str | None = None,
) -> tuple[sitk.Image, np.ndarray, list[np.ndarray]]:
    """Label image, ensemble probabilities and each member's probabilities, on ``image``'s grid."""
    require_segmentation(ensemble)
    member_probs = []
    for i, member in enumerate(ensemble.members):
        if events is not None:
            events.emit("message", message=f"ensemble member {i + 1}/{len(ensemble.members)}")
        member_probs.append(segment_image(member, image, device=device, events=events, domain=domain)[1])
    probs = combine_probabilities(member_probs, ensemble.combine, ensemble.weights)
    return array_like(probs.argmax(0).astype(np.uint8), image), probs, member_probs


def classify_members(
    ensemble: EnsemblePackage, image: sitk.Image, *, device: str | torch.device = "cpu", domain: str | None = None
) -> dict[str, float]:
    require_classifier(ensemble)
    names = ensemble.config.data.label_names
    member_probs = []
    for member in ensemble.members:
        probs = classify_image(member, image, device=device, domain=domain)
        member_probs.append(np.array([probs[n] for n in names], np.float32))
    if ensemble.config.data.multi_label:
        # Independent sigmoids: combine each class on its own (vote: a majority says present).
        stack = np.stack(member_probs)
        w = np.asarray(ensemble.weights, np.float32)[:, None]
        combined = (stack * w).sum(0) / w.sum() if ensemble.combine == "mean" else ((stack >= 0.5) * w).sum(0) / w.sum()
    else:
        combined = combine_probabilities(member_probs, ensemble.combine, ensemble.weights)
    return {n: float(p) for n, p in zip(names, combined, strict=True)}


def describe_ensemble(manifest: dict[str, Any]) -> list[str]:
    spec = manifest["ensemble"]
    lines = [f"  ensemble:      {spec['combine']} of {len(spec['members'])} members"]
    for i, entry in enumerate(spec["members"]):
        lines.append(
            f"    member {i}:    {entry['model']} ({entry['spatial_dims']}D, preset {entry['preset']}, "
            f"weight {entry['weight']:g})"
        )
    return lines
