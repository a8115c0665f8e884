"""``medtl`` end to end in real child processes: train -> predict -> info, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO, synthetic_case, tiny_config
from medtl.data.io import read_segment_names
from medtl.errors import DataError, WeightsError


def medtl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "MedTLTraining")}
    proc = subprocess.run([sys.executable, "-m", "medtl", *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"medtl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_dataset, hub_cache) -> Path:
    out = tmp_path_factory.mktemp("run")
    config = out / "run.json"
    config.write_text(json.dumps(tiny_config(synthetic_dataset, out / "run")))
    medtl("train", str(config), "--quiet")
    return out / "run"


def test_train_writes_a_complete_run(trained_run):
    for name in ("config.json", "checkpoint.pt", "events.jsonl", "metrics.json", "training.png", "model"):
        assert (trained_run / name).exists(), name
    events = [json.loads(line) for line in (trained_run / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["train_cases"] == 3 and metrics["val_cases"] == 1
    assert set(metrics["val_dice"]) == {"disc", "blob"}
    # The disc is easy: even a 12-step run must find most of it on the held-out case.
    assert metrics["val_dice"]["disc"] > 0.5, metrics


def test_predict_keeps_geometry_and_segment_names(trained_run, tmp_path):
    image, truth = synthetic_case(7)
    sitk.WriteImage(image, str(tmp_path / "new.nii.gz"))
    out = tmp_path / "pred.seg.nrrd"
    medtl(
        "predict",
        "--model",
        str(trained_run / "model"),
        "--image",
        str(tmp_path / "new.nii.gz"),
        "--out",
        str(out),
        "--probabilities",
        str(tmp_path / "prob.nrrd"),
        "--quiet",
    )
    pred = sitk.ReadImage(str(out))
    assert pred.GetSize() == image.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(pred.GetDirection(), image.GetDirection(), atol=1e-6)
    assert read_segment_names(out) == {1: "disc", 2: "blob"}
    labels = sitk.GetArrayFromImage(pred)
    assert set(np.unique(labels)) <= {0, 1, 2}
    overlap = ((labels > 0) & (sitk.GetArrayFromImage(truth) > 0)).sum() / (sitk.GetArrayFromImage(truth) > 0).sum()
    assert overlap > 0.5
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "prob.nrrd")))
    assert prob.shape == labels.shape and 0.0 <= prob.min() and prob.max() <= 1.0


def test_predict_streams_json_events(trained_run, tmp_path):
    image, _ = synthetic_case(8)
    sitk.WriteImage(image, str(tmp_path / "x.nrrd"))
    proc = medtl(
        "predict",
        "--model",
        str(trained_run / "model"),
        "--image",
        str(tmp_path / "x.nrrd"),
        "--out",
        str(tmp_path / "y.nrrd"),
        "--events",
        "-",
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[-1] == {**events[-1], "event": "done", "output": str(tmp_path / "y.nrrd")}


def test_info_describes_the_package(trained_run):
    text = medtl("info", str(trained_run / "model")).stdout
    assert "unet_mobilenet_v2" in text and "1=disc" in text and "2=blob" in text and "torch" in text


def test_tampered_package_is_refused(trained_run, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(trained_run / "model", pkg)
    weights = pkg / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = medtl(
        "predict", "--model", str(pkg), "--image", "whatever.nrrd", "--out", str(tmp_path / "o.nrrd"), check=False
    )
    assert proc.returncode == 2
    assert "sha256 does not match" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_config_is_one_clear_line(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"strategy": {"name": "freeze_all"}}))
    proc = medtl("train", str(config), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'strategy.name'" in lines[0] and "full_finetune" in lines[0]


def test_missing_image_names_csv_row(tmp_path, synthetic_dataset):
    csv = tmp_path / "set.csv"
    folder = synthetic_dataset.parent
    csv.write_text(f"image,label\n{folder / 'case0.nrrd'},{folder / 'case0_label.nrrd'}\n{folder / 'gone.nrrd'},x\n")
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_config(csv, tmp_path / "out")))
    proc = medtl("train", str(config), check=False)
    assert proc.returncode == 2
    assert "set.csv: row 3, field 'image': file not found" in proc.stderr and "gone.nrrd" in proc.stderr


def test_interrupted_cli_run_resumes(tmp_path, synthetic_dataset, hub_cache):
    cfg = tiny_config(synthetic_dataset, tmp_path / "run", train={"epochs": 2})
    config = tmp_path / "run.json"
    config.write_text(json.dumps(cfg))
    medtl("train", str(config), "--quiet")
    image = synthetic_dataset.parent / "case1.nii.gz"
    out = tmp_path / "seg.nrrd"
    proc = medtl("train", str(config), "--resume", "--events", "-", "--predict", str(image), "--predict-out", str(out))
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    # Every epoch was already done: resume trains nothing more and still writes the package.
    assert not [e for e in events if e["event"] == "epoch"]
    assert any(e["event"] == "message" and "resuming from epoch 2" in e["message"] for e in events)
    # Then the same process segments the image with the new package.
    kinds = [(e["event"], e.get("label")) for e in events]
    assert kinds.index(("done", None)) < kinds.index(("start", "predict")) < len(kinds) - 1
    assert events[-1]["event"] == "done" and events[-1]["output"] == str(out)
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(image)).GetSize()
    half = medtl("train", str(config), "--predict", str(image), check=False)
    assert half.returncode == 2 and "--predict IMAGE and --predict-out SEG go together" in half.stderr


def test_a_package_is_a_starting_point_for_the_next_run(trained_run, tmp_path):
    from medtl.models.weights import read_state_dict
    from safetensors.torch import load_file

    package = trained_run / "model"
    state = read_state_dict(package)
    reference = load_file(str(package / "model.safetensors"))
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    tampered = tmp_path / "pkg"
    shutil.copytree(package, tampered)
    manifest = json.loads((tampered / "medtl_package.json").read_text())
    manifest["files"]["model.safetensors"] = "0" * 64
    (tampered / "medtl_package.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="sha256 does not match"):
        read_state_dict(tampered)


def test_uncertainty_is_normalised_entropy():
    from medtl.infer import normalised_entropy

    probs = np.array([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]], dtype=np.float32)
    np.testing.assert_allclose(normalised_entropy(probs), [0.0, np.log(2) / np.log(3), 1.0], atol=1e-5)


def test_device_report_says_why_not_the_gpu():
    from medtl.train import device_report

    out = subprocess.run(
        [sys.executable, "-m", "medtl", "device", "--device", "cuda"], capture_output=True, text=True, timeout=120
    )
    report = json.loads(out.stdout.splitlines()[-1])
    assert report == device_report("cuda")
    assert device_report("cpu")["device"] == "cpu" and device_report("cpu")["warning"] is None
    if torch.cuda.is_available():
        assert report["capability"].startswith("sm_") and report["gpu"]
    else:
        assert report["device"] == "cpu" and "no CUDA GPU" in report["warning"]
        assert device_report("auto")["warning"] is None, "no GPU at all: auto means the CPU, silently"


def test_grouped_split_never_puts_a_site_on_both_sides(tmp_path):
    from medtl.data.dataset import Case
    from medtl.pipeline import split_cases

    cases = [Case(image=tmp_path / f"{i}", label=None, row=i + 2, extra={"site": "ABCD"[i % 4]}) for i in range(12)]
    for seed in range(5):
        train, val = split_cases(cases, 0.25, seed, "site")
        assert {c.extra["site"] for c in train}.isdisjoint({c.extra["site"] for c in val})
        assert len(val) == 3 and len(train) == 9
    with pytest.raises(DataError, match="no value in CSV row"):
        split_cases(cases, 0.25, 0, "scanner")
