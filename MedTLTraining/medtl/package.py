"""One network's model package: one directory that ``predict``, ``export`` and the Slicer module
load. (An ensemble of such packages is :mod:`medtl.ensemble`'s; :mod:`medtl.any_package` loads and
runs either.)

Contents: ``model.safetensors`` (weights), ``medtl_package.json`` (the run configuration, the
preprocessing, label values with names and colours, training-data hashes, metrics, software
versions, and the sha256 of every file). Loading checks every listed file's sha256 first.

Example:
    >>> import tempfile
    >>> from medtl.config import RunConfig
    >>> from medtl.models.registry import build_model
    >>> cfg = RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"}})
    >>> path = save_package(tempfile.mkdtemp() + "/pkg", build_model("unet_resnet18", num_classes=2), cfg)
    >>> load_package(path).labels[1]["name"]
    'foreground'
"""

from __future__ import annotations

import contextlib
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
from safetensors.torch import load_file, save_file

from medtl.config import RunConfig
from medtl.data.geometry import SLICE_AXES, from_canonical, to_canonical
from medtl.data.io import array_like, replace_directory, resample_like, resample_to_spacing, sha256_file
from medtl.data.presets import intensity_transform
from medtl.errors import DataError, WeightsError
from medtl.manifest import MANIFEST, WEIGHTS, PackageLabels, read_manifest, versions
from medtl.models.registry import TransferNet, build_model

FORMAT_VERSION = 2
# Format 2: images are reoriented to one canonical orientation before the network sees them.
# A format-1 package was trained on arrays in each file's stored axis order and is run that way.


def package_config(manifest: dict[str, Any]) -> RunConfig:
    """The run configuration a package's network was trained with."""
    config = manifest["config"]
    if manifest.get("format_version", 1) < 2 and "orientation" not in config.get("preprocessing", {}):
        config = {**config, "preprocessing": {**config.get("preprocessing", {}), "orientation": "as_stored"}}
    return RunConfig.from_dict(config)


# Colours for label values 1, 2, ... (Slicer's generic anatomy colours where they fit).
DEFAULT_COLOURS = [
    (0.867, 0.510, 0.396),  # liver-like
    (0.565, 0.933, 0.565),  # tumour/lesion green
    (0.502, 0.682, 0.502),
    (0.945, 0.839, 0.569),
    (0.694, 0.478, 0.396),
    (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310),
    (0.863, 0.961, 0.078),
]


def label_table(names: Sequence[str]) -> list[dict[str, Any]]:
    """Label value, name and colour for background and each named class."""
    table = [{"value": 0, "name": "background", "color": [0.0, 0.0, 0.0]}]
    for i, name in enumerate(names, start=1):
        table.append({"value": i, "name": name, "color": list(DEFAULT_COLOURS[(i - 1) % len(DEFAULT_COLOURS)])})
    return table


@dataclass
class ModelPackage(PackageLabels):
    path: Path
    manifest: dict[str, Any]
    model: TransferNet
    signature: str = "unsigned"  # or "signature valid (key ...)", see medtl.signing

    @property
    def config(self) -> RunConfig:
        return package_config(self.manifest)

    @property
    def domains(self) -> list[str]:
        """The domains of a domain-specific BatchNorm network, in index order ([] for others)."""
        return list(self.manifest.get("domains") or [])

    def domain_context(self, domain: str | None = None):
        """The block in which the network normalises as ``domain`` (default: the package's default
        domain); a no-op for networks without domain-specific BatchNorm."""
        from medtl.adaptation.dsbn import use_domain

        if not self.domains:
            if domain:
                raise DataError(f"{self.path} has no domain-specific BatchNorm; a domain does not apply")
            return contextlib.nullcontext()
        domain = domain or self.manifest.get("default_domain")
        if not domain:
            raise DataError(
                f"{self.path} normalises each domain separately: name one of {', '.join(self.domains)} "
                "(--domain), or adapt it to this image's domain first ('medtl adapt', or the MedTL "
                "module's 'Adapt model to this volume')"
            )
        if domain not in self.domains:
            raise DataError(
                f"{self.path}: unknown domain '{domain}'; known: {', '.join(self.domains)}. Adapt the package "
                "to it first ('medtl adapt --domain')"
            )
        return use_domain(self.model, self.domains.index(domain))


def save_package(
    path: str | Path,
    model: torch.nn.Module,
    cfg: RunConfig,
    *,
    training_files: Sequence[str | Path] = (),
    training_data: Sequence[dict[str, str]] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Writes a package directory; built beside the target and renamed, so it appears whole.

    ``training_data`` (name and sha256 records) stands for ``training_files`` when the files are
    no longer at hand (a package derived from another one). ``files``: further files (name ->
    content), listed with their sha256 like the weights.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": cfg.model.name, "num_classes": cfg.num_classes, "spatial_dims": cfg.spatial_dims},
            "task": cfg.task,
            "preprocessing": {
                "preset": cfg.preprocessing.preset,
                "window": cfg.preprocessing.window,
                "equalize": cfg.preprocessing.equalize,
                "spacing": cfg.preprocessing.spacing,
                "context_slices": cfg.preprocessing.context_slices,
                "patch_size": cfg.preprocessing.patch_size,
                "input": "one channel in [0, 1] after the preset (three neighbouring slices with context_slices 1); "
                "the network replicates and normalises",
            },
            "labels": (
                [{"index": i, "name": n} for i, n in enumerate(cfg.data.label_names)]
                if cfg.is_classification
                else label_table(cfg.data.label_names)
            ),
            "config": cfg.to_dict(),
            "training_data": (
                list(training_data)
                if training_data is not None
                else [{"file": Path(f).name, "sha256": sha256_file(f)} for f in training_files]
            ),
            "metrics": metrics or {},
            "versions": versions(),
            "files": {name: sha256_file(tmp / name) for name in (WEIGHTS, *(files or {}))},
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_verified_manifest(path: Path) -> tuple[dict[str, Any], str]:
    """The manifest of the package at ``path`` and its signature status, after
    :func:`medtl.signing.verify_package` (a package edited after signing is refused here): the first
    step of loading any package, one network's or an ensemble's."""
    from medtl.signing import verify_package

    manifest = read_manifest(path)
    return manifest, verify_package(path)


def load_package(path: str | Path) -> ModelPackage:
    """Loads one network's package after checking every listed file's sha256 (any package, an
    ensemble too: :func:`medtl.any_package.load_package`)."""
    path = Path(path)
    manifest, signature = read_verified_manifest(path)
    if manifest.get("ensemble"):
        # Reached by an ensemble member that is itself an ensemble (save_ensemble never writes one)
        # or by a caller that wanted any package.
        raise DataError(
            f"{path} is an ensemble package, not one network's: medtl.any_package.load_package loads it "
            "(an ensemble's members are single networks)"
        )
    return load_network_package(path, manifest, signature)


def load_network_package(path: Path, manifest: dict[str, Any], signature: str) -> ModelPackage:
    """One network's package, its manifest read and its signature verified
    (:func:`read_verified_manifest`): every listed file is hash-checked before the weights load."""
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path}: package format {manifest['format_version']} is newer than this MedTL understands")
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise WeightsError(f"{path}: package file missing: {name}")
        if sha256_file(file) != expected:
            raise WeightsError(f"{file}: sha256 does not match the package manifest; refusing to load it")
    if WEIGHTS not in manifest.get("files", {}):
        raise WeightsError(f"{path}: manifest lists no hash for {WEIGHTS}")
    cfg = package_config(manifest)
    model = build_model(cfg.model.name, num_classes=cfg.num_classes, pretrained="none")
    if manifest.get("domains"):
        from medtl.adaptation.dsbn import convert_to_dsbn

        convert_to_dsbn(model, len(manifest["domains"]))
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    model.eval()
    return ModelPackage(path=path, manifest=manifest, model=model, signature=signature)


def working_image(image: sitk.Image, cfg: RunConfig, *, labels: bool = False) -> sitk.Image:
    """The image on the grid the network works on: reoriented to the canonical orientation
    (``preprocessing.orientation``), then resampled to ``preprocessing.spacing`` if set.

    2D tasks resample in-plane only: their samples are slices along ``preprocessing.slice_axis``,
    and a painted slice must stay a slice (a coarser grid across the slices would drop it, a finer
    one would invent labels). A 2D classifier's image (a radiograph) keeps its axes.
    """
    if image.GetDimension() != 3:
        return image
    if cfg.preprocessing.orientation == "canonical" and not (cfg.is_classification and cfg.spatial_dims == 2):
        image = to_canonical(image)
    spacing = cfg.preprocessing.spacing
    if spacing is None:
        return image
    spacing = list(spacing)
    if cfg.spatial_dims == 2:
        axis = SLICE_AXES[cfg.preprocessing.slice_axis]
        spacing[axis] = image.GetSpacing()[2 - axis]  # SimpleITK orders (x, y, z)
    return resample_to_spacing(image, spacing, labels=labels)


def on_input_grid(array: np.ndarray, grid: sitk.Image, image: sitk.Image, cfg: RunConfig) -> sitk.Image:
    """A float array on the working grid (``grid``, from :func:`working_image`) as an image with
    exactly ``image``'s grid: resampled (linear) where the run set a spacing, and put back into the
    input's axis order and orientation."""
    result = array_like(array.astype(np.float32, copy=False), grid)
    if cfg.preprocessing.spacing is not None:
        # Resampling keeps the direction: the working grid's says whether it was reoriented.
        oriented = image if grid.GetDirection() == image.GetDirection() else to_canonical(image)
        result = resample_like(result, oriented)
    return from_canonical(result, image)


def preprocess(
    image: sitk.Image,
    manifest_or_cfg: dict[str, Any] | RunConfig,
    *,
    ndim: int = 3,
    grid: sitk.Image | None = None,
) -> np.ndarray:
    """The run's preprocessing applied to a SimpleITK image: resampling (if the run sets a
    spacing), then the intensity preset. (z, y, x) float32, (y, x) for 2D images (``ndim=2``).

    For 2D images a single-slice volume (a DICOM radiograph reads as x × y × 1) is taken as its
    slice, and a colour image (a PNG export) as the mean of its channels. ``grid``: the image's
    :func:`working_image`, when the caller has it already.
    """
    cfg = manifest_or_cfg if isinstance(manifest_or_cfg, RunConfig) else package_config(manifest_or_cfg)
    pre = cfg.preprocessing
    array = sitk.GetArrayFromImage(grid if grid is not None else working_image(image, cfg)).astype(np.float32)
    if ndim == 2 and image.GetNumberOfComponentsPerPixel() > 1:
        array = array.mean(axis=-1)
    if ndim == 2 and array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != ndim:
        raise DataError(f"expected a {ndim}D scalar image, got array shape {array.shape}")
    return np.asarray(intensity_transform(pre.preset, pre.window, equalize=pre.equalize)(array), dtype=np.float32)


def require_segmentation(package) -> RunConfig:
    """The configuration of ``package`` (one network's or an ensemble's), refused if it classifies."""
    if package.config.is_classification:
        raise DataError(f"{package.path} is a classifier; it gives class probabilities, not a segmentation")
    return package.config


def require_classifier(package) -> RunConfig:
    """The configuration of ``package`` (one network's or an ensemble's), refused if it segments."""
    if not package.config.is_classification:
        raise DataError(f"{package.path} is a segmentation model; use it to segment, not to classify")
    return package.config


def segment_image(
    package: ModelPackage,
    image: sitk.Image,
    *,
    device: str | torch.device = "cpu",
    events=None,
    domain: str | None = None,
) -> tuple[sitk.Image, np.ndarray]:
    """Label image (the input's geometry exactly) and softmax probabilities (C, z, y, x) from one
    network's package (any package: :func:`medtl.any_package.segment_image`).

    ``domain``: the image's domain for a domain-specific BatchNorm package.
    """
    cfg = require_segmentation(package)
    with package.domain_context(domain):
        return segment_with_network(cfg, package.model, image, device=device, events=events)


def segment_with_network(
    cfg: RunConfig,
    model: torch.nn.Module,
    image: sitk.Image,
    *,
    device: str | torch.device = "cpu",
    events=None,
    grid: sitk.Image | None = None,
    volume: np.ndarray | None = None,
) -> tuple[sitk.Image, np.ndarray]:
    """:func:`segment_image` with a network in memory (the warm engine's, between rounds) and the
    run configuration it trains with. ``grid`` and ``volume``: the image's :func:`working_image`
    and :func:`preprocess` result, when the caller keeps them."""
    from medtl.infer import predict_run_volume

    grid = working_image(image, cfg) if grid is None else grid
    volume = preprocess(image, cfg, grid=grid) if volume is None else volume
    probs = predict_run_volume(cfg, model, volume, device=device, events=events)
    if grid.GetSize() != image.GetSize() or grid.GetDirection() != image.GetDirection():
        # Probabilities go back to the input's grid (linear where resampled), then the argmax:
        # smoother edges than resampling the label map.
        probs = np.stack([sitk.GetArrayFromImage(on_input_grid(p, grid, image, cfg)) for p in probs])
        if cfg.preprocessing.spacing is not None:
            probs /= np.clip(probs.sum(axis=0, keepdims=True), 1e-6, None)
    labels = probs.argmax(axis=0).astype(np.uint8)
    return array_like(labels, image), probs


def classify_image(
    package: ModelPackage, image: sitk.Image, *, device: str | torch.device = "cpu", domain: str | None = None
) -> dict[str, float]:
    """Class probabilities of one image (softmax, or one sigmoid per class when multi-label) from one
    network's package (any package: :func:`medtl.any_package.classify_image`)."""
    from medtl.infer import predict_class_probabilities

    cfg = require_classifier(package)
    array = preprocess(image, cfg, ndim=cfg.spatial_dims)
    with package.domain_context(domain):
        probs = predict_class_probabilities(
            package.model, [array], size=cfg.preprocessing.patch_size, multi_label=cfg.data.multi_label, device=device
        )[0]
    return {name: float(p) for name, p in zip(cfg.data.label_names, probs, strict=True)}


def summary_lines(path: str | Path, m: dict[str, Any]) -> list[str]:
    """What ``medtl info`` says first of the package at ``path`` (manifest ``m``): the network,
    preprocessing, labels, origin and training data."""
    lines = [
        f"MedTL model package: {Path(path)}",
        f"  model:         {m['model']['name']} ({m['model']['spatial_dims']}D, {m['model']['num_classes']} outputs, "
        f"{m.get('task', 'segmentation')})",
        f"  preprocessing: preset {m['preprocessing']['preset']}"
        + (f", window {m['preprocessing']['window']}" if m["preprocessing"].get("window") else ""),
        "  labels:        " + ", ".join(f"{e.get('value', e.get('index'))}={e['name']}" for e in m["labels"]),
        f"  created:       {m['created']}",
        "  versions:      " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"  training data: {len(m.get('training_data', []))} file(s)",
    ]
    provenance = m.get("provenance") or {}
    if provenance.get("cases"):
        groups = "; ".join(
            f"{column}: " + ", ".join(f"{value} {n}" for value, n in counts.items())
            for column, counts in provenance.get("groups", {}).items()
        )
        lines.append(f"  provenance:    {provenance['cases']} case(s)" + (f" ({groups})" if groups else ""))
    if "drift_reference.json" in m.get("files", {}):
        lines.append("  drift profile: of the training images (medtl drift)")
    return lines


def adaptation_and_metrics_lines(m: dict[str, Any]) -> list[str]:
    """What ``medtl info`` says last of a package (manifest ``m``): its adaptation steps and metrics."""
    lines = []
    for step in m.get("adaptation", []):
        target = step.get("target", {})
        lines.append(
            f"  adaptation:    {step['method']}"
            + (f", domains {', '.join(step['domains'])}" if step.get("domains") else "")
            + (f", domain {step['domain']}" if step.get("domain") else "")
            + (f", {target['images']} target image(s) (sha256 {target['combined_sha256'][:12]}…)" if target else "")
        )
    if m.get("metrics"):
        lines.append("  metrics:       " + json.dumps(m["metrics"], sort_keys=True)[:400])
    return lines
