"""Classification end to end: CSV of images and class names -> training -> AUROC -> package -> predict."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from medtl.cli import main
from medtl.config import RunConfig
from medtl.data.dataset import load_cases
from medtl.errors import ConfigError, DataError
from medtl.events import EventSink
from medtl.pipeline import class_target, run_training


def _write_classification_set(folder, n=24, dims=2, multi_label=False):
    """Noisy X-ray-like images; 'lesion' images hold a bright disc, 'calcification' a small dot."""
    rng = np.random.default_rng(5)
    rows = ["image,label,site"]
    shape = (64, 64) if dims == 2 else (24, 32, 32)
    for i in range(n):
        image = rng.normal(1000, 60, shape).astype(np.float32)
        grid = np.indices(shape)
        centre = [rng.uniform(s / 3, 2 * s / 3) for s in shape]
        names = []
        if i % 2:
            disc = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) < (shape[-1] / 6) ** 2
            image[disc] += 500
            names.append("lesion")
        if multi_label and i % 3 == 0:
            image[(slice(None),) * (dims - 1) + (slice(2, 5),)] += 900
            names.append("calcification")
        if not multi_label and not names:
            names.append("normal")
        path = folder / f"img{i:02d}.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
        rows.append(f"{path.name},{'|'.join(names)},{'AB'[i % 2]}{i // 8}")
    (folder / "set.csv").write_text("\n".join(rows) + "\n")
    return folder / "set.csv"


def _config(csv, out, **overrides):
    data = {
        "task": "classification_2d",
        "data": {"csv": str(csv), "label_names": ["normal", "lesion"], "val_fraction": 0.25},
        "preprocessing": {"preset": "xray", "patch_size": [64, 64]},
        "model": {"name": "cls_mobilenet_v2", "pretrained": "imagenet"},
        "strategy": {"name": "gradual_unfreezing", "unfreeze_every": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"epochs": 4, "steps_per_epoch": 6, "batch_size": 8, "device": "cpu"},
        "augmentation": "light",
        "loss": "ce",
        "output_dir": str(out),
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return RunConfig.from_dict(data)


def test_imagenet_classifier_learns_to_find_the_lesion(tmp_path, hub_cache, capsys):
    csv = _write_classification_set(tmp_path)
    cfg = _config(csv, tmp_path / "run")
    seen = []
    metrics = run_training(cfg, events=EventSink(listeners=[seen.append]))
    assert metrics["val_cases"] == 6
    assert metrics["val_auroc"]["lesion"] >= 0.9, metrics
    assert [e["val_auroc"]["lesion"] for e in seen if e["event"] == "epoch"], "AUROC after every epoch"
    phases = [e["name"] for e in seen if e["event"] == "phase"]
    assert phases[0].startswith("feature extraction") and "top 1 of 5" in phases[1]
    assert len(metrics["val_cases_auroc"]) == 6

    out = tmp_path / "pred.json"
    lesion_image = tmp_path / "img01.nrrd"
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "run" / "model"),
                "--image",
                str(lesion_image),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    probabilities = json.loads(out.read_text())["probabilities"]
    assert set(probabilities) == {"normal", "lesion"}
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert probabilities["lesion"] > 0.5
    capsys.readouterr()
    assert main(["info", str(tmp_path / "run" / "model")]) == 0
    text = capsys.readouterr().out
    assert "classification_2d" in text and "0=normal, 1=lesion" in text


def test_multi_label_targets_and_training(tmp_path):
    csv = _write_classification_set(tmp_path, n=12, multi_label=True)
    cfg = _config(
        csv,
        tmp_path / "run",
        data={"label_names": ["lesion", "calcification"], "multi_label": True, "val_fraction": 0.0},
        model={"pretrained": "none"},
        loss="bce",
        train={"epochs": 1, "steps_per_epoch": 2},
    )
    cases = load_cases(csv, label_files=False)
    targets = [class_target(c, cfg).tolist() for c in cases[:4]]
    assert targets == [[0, 1], [1, 0], [0, 0], [1, 1]]
    metrics = run_training(cfg, events=EventSink())
    assert metrics["epochs_trained"] == 1 and np.isfinite(metrics["final_loss"])


def test_unknown_class_names_the_row(tmp_path):
    (tmp_path / "a.nrrd").write_bytes(b"")
    (tmp_path / "set.csv").write_text("image,label\na.nrrd,normal\na.nrrd,tumor\n")
    cfg = _config(tmp_path / "set.csv", tmp_path / "run")
    cases = load_cases(tmp_path / "set.csv", label_files=False)
    with pytest.raises(DataError, match=r"row 3, field 'label': 'tumor' is not one of"):
        class_target(cases[1], cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss": "dice_ce"}, "does not apply to classification_2d"),
        ({"loss": "bce"}, "multi-label"),
        ({"model": {"name": "unet_resnet18"}}, "segmentation network but task is classification_2d"),
        ({"model": {"name": "cls_vit_b_16"}}, "224 pixels a side"),
        ({"model": {"name": "cls_inception_v3"}}, "at least 75"),
        ({"data": {"label_names": ["lesion"]}}, "at least two classes"),
    ],
)
def test_classification_config_mistakes_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path / "set.csv", tmp_path, **overrides)


def test_3d_classifier_trains_and_predicts(tmp_path):
    csv = _write_classification_set(tmp_path, n=8, dims=3)
    cfg = _config(
        csv,
        tmp_path / "run",
        task="classification_3d",
        model={"name": "cls3d_resnet10", "pretrained": "none"},
        preprocessing={"patch_size": [16, 32, 32]},
        strategy={"name": "full_finetune"},
        train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 2},
    )
    metrics = run_training(cfg, events=EventSink())
    assert set(metrics["val_auroc"]) == {"normal", "lesion"}
    out = tmp_path / "pred.json"
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "run" / "model"),
                "--image",
                str(tmp_path / "img00.nrrd"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert sum(json.loads(out.read_text())["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_radiographs_as_single_slice_volumes_and_colour_exports_read_as_2d(tmp_path):
    from medtl.package import preprocess

    cfg = _config(tmp_path / "set.csv", tmp_path)
    single = sitk.GetImageFromArray(np.arange(64 * 48, dtype=np.float32).reshape(1, 64, 48))  # x × y × 1, as DICOM CR
    assert preprocess(single, cfg, ndim=2).shape == (64, 48)
    rgb = sitk.GetImageFromArray(np.random.rand(64, 48, 3).astype(np.float32), isVector=True)
    grey = preprocess(rgb, cfg, ndim=2)
    assert grey.shape == (64, 48) and 0.0 <= grey.min() and grey.max() <= 1.0
    with pytest.raises(DataError, match="2D scalar image"):
        preprocess(sitk.Image(8, 8, 4, sitk.sitkFloat32), cfg, ndim=2)


def test_classifier_refuses_segmentation_outputs(tmp_path, capsys):
    csv = _write_classification_set(tmp_path, n=8)
    cfg = _config(csv, tmp_path / "run", model={"pretrained": "none"}, train={"epochs": 1, "steps_per_epoch": 1})
    run_training(cfg, events=EventSink())
    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "run" / "model"),
            "--image",
            str(tmp_path / "img00.nrrd"),
            "--out",
            str(tmp_path / "p.json"),
            "--probabilities",
            str(tmp_path / "p.nrrd"),
            "--quiet",
        ]
    )
    assert code == 2 and "segmentation model" in capsys.readouterr().err
