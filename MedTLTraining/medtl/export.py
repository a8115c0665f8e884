"""``medtl export``: a model package as ONNX and TorchScript, with the preprocessing written
beside it and a parity check after every export.

The network is exported as it is: one float32 input ``image`` in the preset's [0, 1] space, one
output ``logits``. Everything before (resampling, the intensity preset) and after (softmax,
argmax, cropping the padding) is recorded in ``preprocessing.json`` so a deployment can rebuild
it. The parity check runs the package's own inference path (slice batching and padding, or
MONAI's sliding window, or the classifier's resize) once with PyTorch and once with the exported
file plugged into the same path, on a real image, and reports the largest probability
difference and the Dice between the two label maps.

ONNX goes through ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript, the exporter
PyTorch maintains); the batch axis is always dynamic and the spatial axes are where the network
allows (``Dim.AUTO``: torch.export keeps them symbolic unless the network fixes them).
TorchScript is ``torch.jit.trace``: MedTL's networks are plain feed-forward graphs, and the
MONAI U-Nets do not script. torch 2.14 deprecates TorchScript (its warnings are silenced here);
it stays as the second format the issue asks for, for C++ deployments that still load it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from medtl.data.io import atomic_write_text, sha256_file, umask_mode
from medtl.data.presets import CT_WINDOWS, PRESETS
from medtl.errors import DataError, MedTLError

FORMATS = ("onnx", "torchscript")
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
# Parity holds when the probabilities agree to this and the label maps overlap at least this well.
MAX_ABS_DIFF = 1e-3
MIN_DICE = 0.99


class ExportParityError(MedTLError):
    """The exported model disagrees with PyTorch on the check image (files are kept to inspect)."""


class _Exported(torch.nn.Module):
    """An exported model behind a torch module's call, so the package's own inference path
    (padding, slice batches, sliding windows, softmax) runs it unchanged."""

    def __init__(self, run, spec) -> None:
        super().__init__()
        self._run = run
        self.spec = spec  # predict_volume reads the padding divisor from it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _onnx_runner(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise DataError("ONNX export needs onnxruntime: pip install onnxruntime") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(out)

    return run, session


def _example_input(cfg, model) -> torch.Tensor:
    """A batch of two at the training patch size (a multiple of the network's divisor)."""
    channels = cfg.in_channels
    size = list(cfg.preprocessing.patch_size)
    if not cfg.is_classification:
        divisor = getattr(model.spec, "divisor", 32)
        size = [max(divisor, -(-s // divisor) * divisor) for s in size]
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, channels, *size, generator=generator)


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, *, spatial: bool, opset: int | None):
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise DataError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from None
    from torch.export import Dim

    axes = {0: Dim("batch", min=1, max=4096)}
    if spatial:
        axes.update({d: Dim.AUTO for d in range(2, example.ndim)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on specialised shapes; the check below tells
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({**axes},),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )


def _describe_preset(pre: dict[str, Any]) -> dict[str, Any]:
    preset, window = pre["preset"], pre.get("window")
    if window is None and preset in CT_WINDOWS:
        window = list(CT_WINDOWS[preset])
    steps = []
    if window is not None:
        steps.append(f"clip intensities to [{window[0]:g}, {window[1]:g}] (HU for CT), then scale linearly to [0, 1]")
    elif preset == "mri":
        steps.append("per image: 0.5th and 99.5th percentiles to 0 and 1, linearly, clipped")
    elif preset == "mri_zscore":
        steps.append(
            "per image: clip to the 0.5th..99.5th percentile, then zero mean, unit variance over non-zero voxels"
        )
    elif preset == "xray":
        steps.append("per image: 1st and 99th percentiles to 0 and 1, linearly, clipped")
    if pre.get("equalize"):
        steps.append("histogram equalisation to [0, 1] (MONAI HistogramNormalize, 256 bins)")
    return {"preset": preset, "description": PRESETS.get(preset, preset), "window": window, "steps": steps}


def _preprocessing_record(package, model, input_shape: list) -> dict[str, Any]:
    cfg = package.config
    manifest = package.manifest
    pre = manifest["preprocessing"]
    layout = "N, C, H, W (H, W: an axial slice, y then x)" if cfg.spatial_dims == 2 else "N, C, D, H, W (z, y, x)"
    record: dict[str, Any] = {
        "task": manifest.get("task"),
        "network": manifest["model"]["name"],
        "input": {
            "name": "image",
            "dtype": "float32",
            "layout": layout,
            "channels": cfg.in_channels,
            "channel_meaning": "the slice and its two neighbours" if cfg.in_channels == 3 else "the image",
            "onnx_shape": input_shape,
        },
        "intensity": _describe_preset(pre),
        "resample_to_spacing_zyx_mm": pre.get("spacing"),
        "output": {
            "name": "logits",
            "meaning": (
                "class logits; softmax over axis 1"
                + (" (or one sigmoid per class: multi-label)" if cfg.data.multi_label else "")
                if cfg.is_classification
                else "per-voxel logits over the label values 0..N (axis 1); softmax, then argmax gives the label map"
            ),
            "labels": manifest["labels"],
        },
    }
    if cfg.is_classification:
        record["resize"] = {"size": list(cfg.preprocessing.patch_size), "mode": "area (MONAI Resize)"}
    elif cfg.spatial_dims == 2:
        divisor = getattr(model.spec, "divisor", 32)
        record["slices"] = {
            "pad": f"pad each slice with 0 at the high end of y and x to a multiple of {divisor}, crop the output back",
            "divisor": divisor,
        }
    else:
        record["sliding_window"] = {
            "roi_size": list(cfg.preprocessing.patch_size),
            "overlap": 0.25,
            "mode": "gaussian (MONAI sliding_window_inference)",
        }
    record["weights_sha256"] = manifest.get("files", {}).get("model.safetensors")
    return record


def _check_input(package, image: sitk.Image | None) -> tuple[np.ndarray, str]:
    from medtl.package import preprocess

    cfg = package.config
    if image is not None:
        return preprocess(image, cfg, ndim=cfg.spatial_dims if cfg.is_classification else 3), "the given image"
    rng = np.random.default_rng(0)
    size = list(cfg.preprocessing.patch_size)
    shape = tuple(size) if cfg.spatial_dims == 3 or cfg.is_classification else (4, *size)
    # Smooth blobs rather than white noise, so the label map is not all one class.
    volume = rng.random(shape).astype(np.float32)
    from scipy.ndimage import gaussian_filter

    volume = gaussian_filter(volume, 2.0)
    volume = (volume - volume.min()) / max(float(np.ptp(volume)), 1e-6)
    return volume.astype(np.float32), f"a synthetic smooth-noise input {list(shape)} (pass --image for a real one)"


def _predict(package, model, array: np.ndarray) -> np.ndarray:
    from medtl.infer import predict_class_probabilities, predict_run_volume

    cfg = package.config
    if cfg.is_classification:
        return predict_class_probabilities(
            model, [array], size=cfg.preprocessing.patch_size, multi_label=cfg.data.multi_label
        )[0]
    return predict_run_volume(cfg, model, array)


def parity(package, reference: torch.nn.Module, exported: torch.nn.Module, array: np.ndarray) -> dict[str, Any]:
    """Probabilities of the package's network and of its export on one preprocessed image, through
    the same inference path: the largest absolute difference and the agreement of the decisions."""
    from medtl.train import dice_per_class

    cfg = package.config
    want = _predict(package, reference, array)
    got = _predict(package, exported, array)
    result: dict[str, Any] = {"max_abs_diff": float(np.abs(want - got).max())}
    if cfg.is_classification:
        agree = (
            bool(np.argmax(want) == np.argmax(got))
            if not cfg.data.multi_label
            else bool(np.array_equal(want >= 0.5, got >= 0.5))
        )
        result["decisions_agree"] = agree
        result["passed"] = agree and result["max_abs_diff"] <= MAX_ABS_DIFF
    else:
        a, b = want.argmax(0), got.argmax(0)
        present = [c for c in range(1, cfg.num_classes) if (a == c).any() or (b == c).any()]
        dice = dice_per_class(b, a, present) if present else {}
        result["dice"] = {cfg.data.label_names[c - 1]: float(v) for c, v in dice.items()}
        result["voxels_differing"] = int((a != b).sum())
        result["labels_present"] = [cfg.data.label_names[c - 1] for c in present]
        result["passed"] = result["max_abs_diff"] <= MAX_ABS_DIFF and all(v >= MIN_DICE for v in dice.values())
    return result


def export_package(
    package_path: str | Path,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    image: sitk.Image | None = None,
    domain: str | None = None,
    opset: int | None = None,
    events=None,
) -> dict[str, Any]:
    """Exports a package's network; returns (and writes as ``export_report.json``) the parity report.

    ``out_dir`` must not exist or be empty: it appears whole (built beside it, then renamed).
    Raises :class:`ExportParityError` (after writing everything) when an export disagrees.
    """
    from medtl.any_package import load_package
    from medtl.manifest import versions

    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise DataError(f"export format(s) {', '.join(unknown) or 'none'}: choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not empty; export into a new folder")
    package = load_package(package_path)
    if getattr(package, "manifest", {}).get("ensemble"):
        raise DataError(f"{package_path} is an ensemble; export its members one by one")
    model = package.model.eval()
    array, source = _check_input(package, image)
    example = _example_input(package.config, model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    report: dict[str, Any] = {
        "package": str(package_path),
        "check_input": source,
        "check_shape": list(array.shape),
        "tolerance": {"max_abs_diff": MAX_ABS_DIFF, "min_dice": MIN_DICE},
        "versions": versions(),
        "formats": {},
    }
    try:
        with package.domain_context(domain):
            onnx_shape: list = []
            if "onnx" in formats:
                report["formats"]["onnx"] = _onnx_export(
                    package, model, example, array, tmp, opset=opset, events=events
                )
                onnx_shape = report["formats"]["onnx"]["input_shape"]
            if "torchscript" in formats:
                report["formats"]["torchscript"] = _torchscript_export(package, model, example, array, tmp)
        _write_records(tmp, package, model, report, onnx_shape=onnx_shape, domain=domain)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.chmod(umask_mode(0o777))  # mkdtemp's 0700 would keep colleagues out of a shared export
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _raise_on_disagreement(report, source, out_dir)
    return report


def _onnx_export(package, model, example: torch.Tensor, array, folder: Path, *, opset, events) -> dict[str, Any]:
    """Writes the ONNX file into ``folder``; its parity entry, run in onnxruntime on the CPU."""
    if events is not None:
        events.emit("message", message="exporting to ONNX (torch.export; takes a few seconds)")
    _export_onnx(model, example, folder / ONNX_FILE, spatial=not package.config.is_classification, opset=opset)
    run, session = _onnx_runner(folder / ONNX_FILE)  # says how to install onnxruntime where it is missing
    import onnxruntime

    onnx_shape = [d if isinstance(d, int) else str(d) for d in session.get_inputs()[0].shape]
    entry = parity(package, model, _Exported(run, model.spec), array)
    entry.update(
        file=ONNX_FILE,
        onnxruntime=onnxruntime.__version__,
        provider="CPUExecutionProvider",
        input_shape=onnx_shape,
        dynamic_spatial_axes=all(not isinstance(d, int) for d in onnx_shape[2:]),
    )
    return entry


def _torchscript_export(package, model, example: torch.Tensor, array, folder: Path) -> dict[str, Any]:
    """Writes the traced TorchScript file into ``folder``; its parity entry."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shape checks that are constant here
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(folder / TORCHSCRIPT_FILE))
        # Loaded back from the file, so the check covers what a deployment reads.
        loaded = torch.jit.load(str(folder / TORCHSCRIPT_FILE)).eval()
    entry = parity(package, model, _Exported(loaded, model.spec), array)
    entry.update(file=TORCHSCRIPT_FILE, method="torch.jit.trace")
    return entry


def _write_records(folder: Path, package, model, report: dict[str, Any], *, onnx_shape: list, domain) -> None:
    """``preprocessing.json`` (what a deployment must do to an image, and the files' hashes) and
    ``export_report.json`` (the parity report, with whether every format passed)."""
    record = _preprocessing_record(package, model, onnx_shape)
    if domain or package.domains:
        record["domain"] = domain or package.manifest.get("default_domain")
    record["files"] = {e["file"]: sha256_file(folder / e["file"]) for e in report["formats"].values()}
    atomic_write_text(folder / "preprocessing.json", json.dumps(record, indent=2) + "\n")
    report["passed"] = all(e["passed"] for e in report["formats"].values())
    atomic_write_text(folder / "export_report.json", json.dumps(report, indent=2) + "\n")


def _raise_on_disagreement(report: dict[str, Any], source: str, out_dir: Path) -> None:
    failed = [name for name, e in report["formats"].items() if not e["passed"]]
    if failed:
        detail = "; ".join(
            f"{n}: max |difference| {report['formats'][n]['max_abs_diff']:.2e}"
            + (f", Dice {report['formats'][n].get('dice')}" if "dice" in report["formats"][n] else "")
            for n in failed
        )
        raise ExportParityError(
            f"the {', '.join(failed)} export disagrees with PyTorch on {source} ({detail}); files kept in {out_dir}"
        )
