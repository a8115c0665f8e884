"""Validation: metrics against hand-computed values, bootstrap intervals, grouped folds that never
leak a group, fairness tables, and `medtl evaluate` / `medtl cv` end to end with their reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import synthetic_case, tiny_config
from medtl.cli import main
from medtl.data.dataset import Case
from medtl.errors import DataError
from medtl.evaluate import (
    _auroc_of,
    bootstrap_interval,
    classification_metrics,
    fairness_classification,
    fairness_segmentation,
    mean_with_interval,
    segmentation_case_metrics,
    voxel_confusion,
)
from medtl.report import SECTIONS
from medtl.validation import fold_splits


def test_segmentation_metrics_match_hand_computed_values():
    truth = np.zeros((1, 6, 8), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 1:3, 1:3] = 1  # 4 voxels
    pred[0, 1:3, 1:4] = 1  # 6 voxels, the 4 above among them
    truth[0, 5, 0] = 2  # one voxel each, 3 voxels (1.5 mm) apart along x
    pred[0, 5, 3] = 2
    spacing = (2.0, 1.0, 0.5)  # (z, y, x) mm: a voxel is 1 mm³
    m = segmentation_case_metrics(pred, truth, spacing=spacing, classes=[1, 2], tolerance_mm=2.0)
    assert m[1]["dice"] == pytest.approx(2 * 4 / 10)
    assert m[1]["volume_ml"] == pytest.approx(0.006) and m[1]["truth_volume_ml"] == pytest.approx(0.004)
    assert m[1]["volume_error_ml"] == pytest.approx(0.002) and m[1]["relative_volume_error"] == pytest.approx(0.5)
    assert m[2]["dice"] == 0.0
    assert m[2]["hd95_mm"] == pytest.approx(1.5)  # spacing counts: 3 voxels of 0.5 mm
    assert m[2]["surface_dice"] == pytest.approx(1.0)  # within the 2 mm tolerance
    strict = segmentation_case_metrics(pred, truth, spacing=spacing, classes=[2], tolerance_mm=1.0)
    assert strict[2]["surface_dice"] == pytest.approx(0.0)
    same = segmentation_case_metrics(truth, truth, spacing=spacing, classes=[1, 2])
    assert same[1]["dice"] == 1.0 and same[1]["hd95_mm"] == 0.0 and same[1]["surface_dice"] == 1.0
    # A label absent on both sides: nothing to find, nothing found; no surface to measure.
    empty = segmentation_case_metrics(np.zeros_like(truth), np.zeros_like(truth), spacing=spacing, classes=[1])
    assert empty[1]["dice"] == 1.0 and np.isnan(empty[1]["hd95_mm"])
    cm = voxel_confusion(pred, truth, 3)
    assert cm[0, 1] == 2 and cm[1, 1] == 4 and cm[2, 0] == 1 and cm[0, 2] == 1 and cm.sum() == truth.size


def test_classification_metrics_match_hand_computed_values():
    targets = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(targets, probs, ["no", "yes"], n_resamples=200)
    yes = m["classes"]["yes"]
    assert yes["auroc"]["value"] == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs ordered
    # The bootstrap's vectorised AUROC (Mann-Whitney U) is the same number, ties counting half.
    assert _auroc_of(p1[targets == 1], p1[targets == 0]) == pytest.approx(0.75)
    assert _auroc_of(np.array([0.5, 0.9]), np.array([0.5, 0.1])) == pytest.approx(0.875)
    # argmax decides: only case 4 is called 'yes'.
    assert yes["sensitivity"]["value"] == pytest.approx(0.5) and yes["specificity"]["value"] == pytest.approx(1.0)
    assert yes["f1"]["value"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[2, 0], [1, 1]] and m["accuracy"] == pytest.approx(0.75)
    assert yes["roc"]["fpr"][0] == 0 and yes["roc"]["tpr"][-1] == 1
    # Calibration: every case at 0.8 and half of them positive -> ECE |0.8 - 0.5| in one bin.
    flat = np.tile([0.2, 0.8], (4, 1))
    calib = classification_metrics(targets, flat, ["no", "yes"], n_resamples=0)
    assert calib["classes"]["yes"]["ece"] == pytest.approx(0.3, abs=1e-6)
    reliability = calib["classes"]["yes"]["reliability"]
    full = reliability["count"].index(4)  # one bin holds every case
    assert reliability["mean_probability"][full] == pytest.approx(0.8)
    assert reliability["fraction_positive"][full] == pytest.approx(0.5)
    assert calib["classes"]["yes"]["auroc"]["ci95"] is None


def test_bootstrap_intervals_contain_the_point_estimate():
    rng = np.random.default_rng(3)
    values = rng.uniform(0.6, 0.95, 15)
    summary = mean_with_interval(values, n_resamples=500)
    low, high = summary["ci95"]
    assert low < summary["mean"] < high and high - low < 0.2
    assert mean_with_interval([0.7] * 5)["ci95"] == [pytest.approx(0.7), pytest.approx(0.7)]
    assert mean_with_interval([0.7, float("nan")])["n"] == 1
    targets = rng.integers(0, 2, 40)
    p = np.clip(targets * 0.3 + rng.uniform(0, 0.7, 40), 0, 1)
    m = classification_metrics(targets, np.stack([1 - p, p], 1), ["a", "b"], n_resamples=300)
    for metric in ("auroc", "sensitivity", "specificity", "f1"):
        entry = m["classes"]["b"][metric]
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1], metric
    assert bootstrap_interval([np.arange(2.0)], np.mean) is None  # too few cases to resample
    # A held-out split with one positive case: no stratified interval (SciPy refused it before).
    one_positive = classification_metrics(
        np.array([0, 0, 1]), np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]), ["a", "b"]
    )
    assert one_positive["classes"]["b"]["auroc"]["value"] == 1.0
    assert one_positive["classes"]["b"]["auroc"]["ci95"] is None


def _cases(groups: list[str], column: str = "patient") -> list[Case]:
    return [Case(Path(f"{i}.nrrd"), None, i + 2, {column: g}) for i, g in enumerate(groups)]


@pytest.mark.parametrize("stratify", [False, True])
def test_grouped_folds_never_leak_a_group(stratify):
    rng = np.random.default_rng(0)
    groups = [f"p{rng.integers(0, 9)}" for _ in range(40)]
    cases = _cases(groups)
    labels = [i % 2 for i in range(40)] if stratify else None
    folds = fold_splits(cases, folds=4, group_column="patient", stratify=labels, seed=1)
    seen = []
    for train, test in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in test}
        assert sorted(train + test) == list(range(40))
        seen += test
    assert sorted(seen) == list(range(40))  # every case tested exactly once
    with pytest.raises(DataError, match="5 folds need at least 5 values of 'patient'"):
        fold_splits(_cases(["a", "b", "a", "c"]), folds=5, group_column="patient")
    with pytest.raises(DataError, match=r"no value in CSV row\(s\) \[3\]"):
        fold_splits(_cases(["a", "", "b"]), folds=2, group_column="patient")


def test_fairness_tables_use_fairlearn_and_warn_for_small_groups():
    # Group A: perfect decisions. Group B: everything called positive.
    records = []
    for i, (group, target) in enumerate([("A", 0), ("A", 1)] * 6 + [("B", 0), ("B", 1)] * 2):
        p = float(target) if group == "A" else 0.9
        records.append({"row": i, "groups": {"site": group}, "target": target, "probabilities": [1 - p, p]})
    table = fairness_classification(records, "site", ["neg", "pos"], min_group=10)
    pos = table["classes"]["pos"]
    assert pos["by_group"]["A"]["sensitivity"] == 1.0 and pos["by_group"]["A"]["specificity"] == 1.0
    assert pos["by_group"]["B"]["specificity"] == 0.0 and pos["by_group"]["B"]["selection_rate"] == 1.0
    assert pos["equalized_odds_difference"] == pytest.approx(1.0)  # false-positive rates 0 and 1
    assert pos["demographic_parity_difference"] == pytest.approx(0.5)  # selection rates 0.5 and 1
    assert table["cases"] == {"A": 12, "B": 4}
    assert any("site=B: only 4 case(s)" in w for w in table["warnings"])
    assert not any("site=A" in w for w in table["warnings"])

    seg = [
        {"groups": {"sex": s}, "metrics": {"liver": {"dice": d, "hd95_mm": 1.0, "volume_error_ml": 0.0}}}
        for s, d in [("F", 0.9), ("F", 0.8), ("M", 0.5)]
    ]
    table = fairness_segmentation(seg, "sex", ["liver"], min_group=2)
    assert table["groups"]["F"]["liver"]["dice"]["mean"] == pytest.approx(0.85)
    assert table["dice_gap"]["liver"] == pytest.approx(0.35)
    assert table["warnings"] == ["sex=M: only 1 case(s); below 2 its metrics say little (see the interval's width)"]


@pytest.fixture(scope="module")
def grouped_dataset(tmp_path_factory) -> Path:
    """Six cases: three patients (two scans each), two sites, with a patient-name-like file name."""
    folder = tmp_path_factory.mktemp("grouped")
    rows = ["image,label,patient_id,site,sex"]
    for i in range(6):
        image, labels = synthetic_case(10 + i)
        name = f"Doe_Jane_{i}"
        sitk.WriteImage(image, str(folder / f"{name}.nrrd"))
        sitk.WriteImage(labels, str(folder / f"{name}_seg.nrrd"))
        rows.append(f"{name}.nrrd,{name}_seg.nrrd,P{i // 2},{'AB'[i % 2]},{'FM'[i // 3]}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def _fast_config(csv: Path, out: Path, **overrides) -> Path:
    cfg = tiny_config(
        csv,
        out,
        model={"name": "unet_resnet18", "pretrained": "none"},
        train={"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "seed": 0, "device": "cpu"},
        **overrides,
    )
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _check_report(folder: Path, *, forbidden: str = "Doe_Jane") -> dict:
    html = (folder / "report.html").read_text(encoding="utf-8")
    for section_id, title in SECTIONS:
        assert f'id="{section_id}"' in html and title in html
    assert html.count("data:image/png;base64,") >= 2
    card_text = (folder / "model_card.json").read_text(encoding="utf-8")
    assert forbidden not in html and forbidden not in card_text
    assert "P0" not in re.sub(r"base64,[^\"]+", "", html)  # the identifier column is not summarised
    card = json.loads(card_text)
    for key in ("intended_use", "training_data", "configuration", "software", "metrics", "fairness", "limitations"):
        assert key in card
    return card


def test_evaluate_writes_metrics_fairness_card_and_report(tmp_path, grouped_dataset, capsys):
    config = _fast_config(grouped_dataset, tmp_path / "run", data={"val_fraction": 0.34, "group_column": "patient_id"})
    assert main(["train", str(config), "--quiet"]) == 0
    run = tmp_path / "run"
    card = _check_report(run)  # every training run has its report
    assert card["kind"] == "training" and card["metrics"]["cases"] == 2
    manifest = json.loads((run / "model" / "medtl_package.json").read_text(encoding="utf-8"))
    assert "Doe_Jane" not in json.dumps(manifest)
    assert manifest["provenance"]["groups"]["site"] and "patient_id" not in manifest["provenance"]["groups"]
    capsys.readouterr()
    assert main(["info", str(run / "model")]) == 0
    info = capsys.readouterr().out
    assert "provenance:    4 case(s) (sex: " in info and "drift profile" in info and "Doe_Jane" not in info

    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--model",
            str(run / "model"),
            "--data",
            str(grouped_dataset),
            "--out",
            str(out),
            "--group-by",
            "site",
            "--bootstrap",
            "200",
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 case(s)" in printed and "Dice" in printed and "site=A: only 3 case(s)" in printed
    result = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert [c["row"] for c in result["cases"]] == [2, 3, 4, 5, 6, 7]
    disc = result["summary"]["metrics"]["disc"]["dice"]
    assert disc["n"] == 6 and disc["ci95"][0] <= disc["mean"] <= disc["ci95"][1]
    per_case = [c["metrics"]["disc"]["dice"] for c in result["cases"]]
    assert disc["mean"] == pytest.approx(np.mean(per_case))
    assert set(result["summary"]["fairness"][0]["groups"]) == {"A", "B"}
    card = _check_report(out)
    assert card["kind"] == "evaluation" and card["evaluation_data"]["cases"] == 6
    # Four of the six images trained the model: the card says these numbers are optimistic.
    assert any("4 of the 6 evaluated images were training images" in item for item in card["limitations"])

    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(run / "model")])
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run / "model"),
                "--data",
                str(grouped_dataset),
                "--out",
                str(tmp_path / "e2"),
                "--group-by",
                "scanner",
                "--quiet",
            ]
        )
        == 2
    )
    assert "no column 'scanner' to group by" in capsys.readouterr().err


def test_cross_validation_keeps_patients_whole_and_resumes(tmp_path, grouped_dataset, capsys):
    config = _fast_config(grouped_dataset, tmp_path / "cv", data={"val_fraction": 0.0})
    args = [
        "cv",
        str(config),
        "--folds",
        "3",
        "--group-column",
        "patient_id",
        "--group-by",
        "sex",
        "--bootstrap",
        "100",
        "--ensemble",
        "--quiet",
    ]
    assert main(args) == 0
    out = tmp_path / "cv"
    result = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    rows = [c["row"] for c in result["cases"]]
    assert sorted(rows) == [2, 3, 4, 5, 6, 7]  # every case scored once, by the fold that did not train on it
    folds = json.loads((out / "folds.json").read_text(encoding="utf-8"))["test_rows"]
    for test_rows in folds:
        patients = {(r - 2) // 2 for r in test_rows}
        assert len(patients) == 1 and len(test_rows) == 2  # a patient's two scans stay together
    for k in range(3):
        assert (out / f"fold_{k}" / "model" / "medtl_package.json").is_file()
        assert (out / f"fold_{k}" / "report.html").is_file()
        fold_card = json.loads((out / f"fold_{k}" / "test" / "model_card.json").read_text(encoding="utf-8"))
        assert fold_card["evaluation_data"]["cases"] == 2 and fold_card["metrics"]["cases"] == 2
    assert [f["test_cases"] for f in result["per_fold"]] == [2, 2, 2]
    # The three fold models, joined: one package that predicts on an unseen image.
    from medtl.any_package import load_package, segment_image

    ensemble = load_package(out / "ensemble")
    assert len(ensemble.members) == 3 and result["ensemble"] == str(out / "ensemble")
    labels, _ = segment_image(ensemble, synthetic_case(30)[0])
    assert labels.GetSize() == (48, 48, 8)
    card = _check_report(out)
    assert card["kind"] == "cross-validation" and card["cross_validation"]["folds"] == 3
    assert card["training_data"]["cases"] == 6

    stamp = (out / "fold_1" / "model" / "medtl_package.json").stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0
    assert (out / "fold_1" / "model" / "medtl_package.json").stat().st_mtime_ns == stamp  # nothing retrained
    assert main(args) == 2  # the same folds again, unasked, would overwrite every fold's model
    assert "holds a cross-validation already; continue it with --resume" in capsys.readouterr().err
    assert (out / "fold_1" / "model" / "medtl_package.json").stat().st_mtime_ns == stamp
    assert main([*args[:3], "2", *args[4:]]) == 2  # other folds in the same folder would mix two plans
    assert "holds a cross-validation with other folds" in capsys.readouterr().err


def test_evaluate_a_classifier_with_roc_calibration_and_fairness(tmp_path, capsys):
    from medtl.events import EventSink
    from medtl.pipeline import run_training
    from sklearn.metrics import roc_auc_score
    from test_classification import _config, _write_classification_set

    csv = _write_classification_set(tmp_path, n=16)
    cfg = _config(
        csv,
        tmp_path / "run",
        model={"name": "cls_mobilenet_v2", "pretrained": "none"},
        strategy={"name": "full_finetune"},
        train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 4},
    )
    run_training(cfg, events=EventSink())
    # Sites are A0, B0, A1, B1: one letter per class in this set, so group by the letter's column.
    rows = (tmp_path / "set.csv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "grouped.csv").write_text(
        "\n".join([rows[0] + ",scanner"] + [f"{r},{'XY'[i % 3 == 0]}" for i, r in enumerate(rows[1:])]) + "\n"
    )
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "grouped.csv")]
    assert main([*args, "--out", str(out), "--group-by", "scanner", "--bootstrap", "200", "--quiet"]) == 0
    assert "AUROC" in capsys.readouterr().out
    result = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    summary = result["summary"]
    targets = np.array([c["target"] for c in result["cases"]])
    probs = np.array([c["probabilities"] for c in result["cases"]])
    lesion = summary["metrics"]["classes"]["lesion"]
    assert lesion["auroc"]["value"] == pytest.approx(roc_auc_score(targets == 1, probs[:, 1]))
    assert np.sum(summary["metrics"]["confusion_matrix"]) == 16
    assert 0 <= lesion["ece"] <= 1 and "roc" in lesion
    fair = summary["fairness"][0]
    assert fair["column"] == "scanner" and set(fair["cases"]) == {"X", "Y"}
    assert fair["classes"]["lesion"]["equalized_odds_difference"] is not None
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "ROC curves and reliability diagram" in html and "equalised-odds difference" in html
    assert "img0" not in html  # file names stay out
