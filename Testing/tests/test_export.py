"""ONNX and TorchScript export: parity with PyTorch through the package's own inference path,
dynamic axes, the preprocessing record, and a failed parity that keeps the files and says why."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import synthetic_case
from medtl import export
from medtl.cli import main
from medtl.config import RunConfig
from medtl.data.io import sha256_file
from medtl.errors import DataError
from medtl.models.registry import build_model
from medtl.package import save_package


def _package(tmp_path, name="unet_resnet18", task="segmentation_2d", patch=(32, 32), labels=("disc", "blob")):
    cfg = RunConfig.from_dict(
        {
            "task": task,
            "model": {"name": name, "pretrained": "none"},
            "data": {"label_names": list(labels)},
            "preprocessing": {"patch_size": list(patch), "preset": "ct_abdomen"},
            "strategy": {"name": "full_finetune"},
            "loss": "ce" if task.startswith("classification") else "dice_ce",
        }
    )
    torch.manual_seed(0)
    net = build_model(name, num_classes=cfg.num_classes)
    # Random BatchNorm statistics, so the exported graph has something to get wrong.
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return save_package(tmp_path / "pkg", net, cfg), net


def test_2d_segmentation_exports_with_parity_and_dynamic_axes(tmp_path, capsys):
    package, net = _package(tmp_path)
    image, _ = synthetic_case(0)
    from medtl.data.io import write_image

    write_image(image, tmp_path / "ct.nrrd")
    out = tmp_path / "export"
    code = main(["export", "--model", str(package), "--out", str(out), "--image", str(tmp_path / "ct.nrrd"), "--quiet"])
    assert code == 0
    assert "parity" in capsys.readouterr().out
    report = json.loads((out / "export_report.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["check_input"] == "the given image" and report["check_shape"] == [8, 48, 48]
    onnx_entry = report["formats"]["onnx"]
    assert onnx_entry["max_abs_diff"] < 1e-4 and onnx_entry["voxels_differing"] == 0
    assert onnx_entry["labels_present"] and all(d == 1.0 for d in onnx_entry["dice"].values())
    assert onnx_entry["dynamic_spatial_axes"] and report["formats"]["torchscript"]["max_abs_diff"] < 1e-5

    # ONNX Runtime at sizes the export never saw, batch 3: the same logits as PyTorch.
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 96, 64)
    with torch.no_grad():
        want = net.eval()(x).numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - want).max() < 1e-4
    with pytest.warns(FutureWarning):  # torch 2.14 deprecates TorchScript; the file still loads
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(x), torch.from_numpy(want), atol=1e-5)

    record = json.loads((out / "preprocessing.json").read_text(encoding="utf-8"))
    assert record["intensity"]["window"] == [-200.0, 250.0] and record["slices"]["divisor"] == 32
    assert [e["name"] for e in record["output"]["labels"]] == ["background", "disc", "blob"]
    assert record["files"]["model.onnx"] == sha256_file(out / "model.onnx")
    assert record["input"]["onnx_shape"][:2] == ["batch", 1]

    # Nothing overwritten: a second export into the same folder is refused.
    assert main(["export", "--model", str(package), "--out", str(out), "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_3d_network_and_classifier_export_with_parity(tmp_path):
    package, _ = _package(tmp_path / "a", name="unet3d", task="segmentation_3d", patch=(16, 32, 32))
    image, _ = synthetic_case(1, shape=(20, 40, 40))
    report = export.export_package(package, tmp_path / "a" / "out", image=image, formats=["onnx"])
    entry = report["formats"]["onnx"]
    assert report["passed"] and entry["max_abs_diff"] < 1e-4 and "torchscript" not in report["formats"]
    record = json.loads((tmp_path / "a" / "out" / "preprocessing.json").read_text(encoding="utf-8"))
    assert record["sliding_window"]["roi_size"] == [16, 32, 32]

    package, net = _package(
        tmp_path / "b", name="cls_mobilenet_v2", task="classification_2d", patch=(64, 64), labels=("normal", "lesion")
    )
    report = export.export_package(package, tmp_path / "b" / "out")  # no image: the synthetic check input
    assert report["passed"] and "synthetic" in report["check_input"]
    assert report["formats"]["onnx"]["decisions_agree"] and report["formats"]["onnx"]["input_shape"][0] == "batch"
    session = ort.InferenceSession(str(tmp_path / "b" / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, 64, 64)
    with torch.no_grad():
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - net.eval()(x).numpy()).max() < 1e-4


def test_a_disagreeing_export_fails_with_the_numbers_and_keeps_its_files(tmp_path, monkeypatch):
    package, _ = _package(tmp_path)
    real = export._onnx_runner

    def noisy(path):
        run, session = real(path)
        return (lambda x: run(x) + 0.5 * torch.randn_like(run(x))), session

    monkeypatch.setattr(export, "_onnx_runner", noisy)
    with pytest.raises(export.ExportParityError, match=r"onnx export disagrees with PyTorch .*max \|difference\|"):
        export.export_package(package, tmp_path / "out", formats=["onnx"])
    report = json.loads((tmp_path / "out" / "export_report.json").read_text(encoding="utf-8"))
    assert not report["passed"] and report["formats"]["onnx"]["max_abs_diff"] > 1e-2
    assert (tmp_path / "out" / "model.onnx").is_file()
    with pytest.raises(DataError, match="choose from onnx, torchscript"):
        export.export_package(package, tmp_path / "x", formats=["tflite"])
