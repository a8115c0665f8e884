"""The training panel's library headless on slicer-core, against the real engine: a data set from
scene pairs (or a folder), a run with live curves, cancel, resume and a metrics table."""

from __future__ import annotations

import time
import typing

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer", reason="the Slicer-side tests need slicer-core")

from conftest import synthetic_case  # noqa: E402
from MedTLExtensionLib import mrml_bridge, training_run  # noqa: E402
from MedTLExtensionLib.headless_scene import create_headless_scene  # noqa: E402
from MedTLExtensionLib.training_run import (  # noqa: E402
    TrainingRun,
    dataset_csv_from_folder,
    export_scene_dataset,
    metrics_table,
    scene_training_pairs,
    training_config,
)

SITES = ("A", "A", "B", "B")


def add_case(headless, seed: int, reverse_segments: bool):
    """A synthetic case as a volume + segmentation, optionally with its segments in the other order
    and other label values, as two users would paint them."""
    image, label = synthetic_case(seed)
    array = sitk.GetArrayFromImage(image)
    labels = sitk.GetArrayFromImage(label)
    volume = mrml_bridge.array_to_volume(headless.scene, array, _ijk_to_ras(image), f"case {seed}")
    segments = [(1, "disc", (0.9, 0.4, 0.3)), (2, "blob", (0.3, 0.9, 0.3))]
    if reverse_segments:
        labels = np.select([labels == 1, labels == 2], [7, 3], 0).astype(np.uint8)
        segments = [(3, "blob", (0.3, 0.9, 0.3)), (7, "disc", (0.9, 0.4, 0.3))]
    segmentation = mrml_bridge.labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        labels,
        _ijk_to_ras(image),
        segments,
        reference_volume=volume,
        name=f"case {seed} segmentation",
    )
    return volume, segmentation, sitk.GetArrayFromImage(label)


def _ijk_to_ras(image: sitk.Image) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    return matrix


@pytest.fixture(scope="module")
def scene_dataset(tmp_path_factory):
    headless = create_headless_scene()
    truths = []
    for seed in range(4):
        _volume, _segmentation, truth = add_case(headless, seed, reverse_segments=seed % 2 == 1)
        truths.append(truth)
    # A segmentation without a reference volume is not a training pair.
    headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loose").GetSegmentation().AddEmptySegment("x")
    pairs = scene_training_pairs(headless.scene)
    folder = tmp_path_factory.mktemp("scene-data")
    csv, names = export_scene_dataset(
        headless.scene,
        headless.segmentations_logic,
        [(v, s, site) for (v, s), site in zip(pairs, SITES, strict=True)],
        folder,
    )
    return headless, pairs, csv, names, truths


def test_scene_pairs_export_as_a_data_set_matched_by_segment_name(scene_dataset):
    _headless, pairs, csv, names, truths = scene_dataset
    assert [v.GetName() for v, _s in pairs] == ["case 0", "case 1", "case 2", "case 3"]
    assert names == ["disc", "blob"]
    lines = csv.read_text().splitlines()
    assert lines[0] == "image,label,site,name"
    assert [line.split(",")[2] for line in lines[1:]] == list(SITES)
    for number, truth in enumerate(truths, start=1):
        written = sitk.ReadImage(str(csv.parent / f"case{number:03d}_label.nrrd"))
        # Case 2 and 4 were painted with other values and segment order: same classes on disk.
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), truth)
        image = sitk.ReadImage(str(csv.parent / f"case{number:03d}.nrrd"))
        assert written.GetSize() == image.GetSize()
        np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)


def test_a_run_draws_curves_and_fills_a_metrics_table(scene_dataset, tmp_path, hub_cache):
    headless, _pairs, csv, names, _truths = scene_dataset
    config = training_config(
        csv=csv,
        output_dir=tmp_path / "run",
        label_names=names,
        preset="ct_abdomen",
        epochs=3,
        device="cpu",
        val_fraction=0.5,
        group_column="site",
        early_stopping_patience=5,
        strategy="gradual_unfreezing",
    )
    assert config["data"]["label_names"] == names and config["data"]["group_column"] == "site"
    assert config["train"]["early_stopping_patience"] == 5 and config["strategy"]["unfreeze_every"] == 1
    config["preprocessing"]["patch_size"] = [32, 32]
    config["train"].update(steps_per_epoch=4, batch_size=4)
    run = TrainingRun(headless.scene)
    run.start(config)
    events = []
    seen_epochs = []
    while run.is_running:
        time.sleep(0.05)
        for event in run.poll():
            events.append(event)
            if event["event"] == "epoch":
                # Live: the table has the row as soon as the event is in.
                seen_epochs.append(run.curves.values("epoch")[-1])
    assert seen_epochs == [1.0, 2.0, 3.0]
    assert all(np.isfinite(run.curves.values("loss")))
    for name in names:
        dice = run.curves.values(f"val Dice {name}")
        assert len(dice) == 3 and all(0.0 <= d <= 1.0 for d in dice)
    assert run.curves.chart.GetNumberOfPlotSeriesNodes() == 1 + len(names)

    metrics = run.result["metrics"]
    # Grouped by site: the two held-out cases are one site's.
    assert metrics["val_cases"] == 2 and metrics["train_cases"] == 2
    assert [c["row"] for c in metrics["val_cases_dice"]] in ([2, 3], [4, 5])
    # The package holds the best epoch's weights, and the metrics are that network's.
    epoch_events = [e for e in events if e["event"] == "epoch"]
    best = max(epoch_events, key=lambda e: np.nanmean(list(e["val_dice"].values())))
    assert metrics["best_epoch"] == best["epoch"] and metrics["epochs_trained"] == 3
    assert metrics["val_dice"] == pytest.approx(best["val_dice"])
    table = metrics_table(headless.scene, metrics)
    assert table.GetCellText(0, 0) == "validation Dice: disc"
    assert float(table.GetCellText(0, 1)) == pytest.approx(metrics["val_dice"]["disc"], abs=1e-4)


def test_cancel_then_resume_continues_the_curves(scene_dataset, tmp_path, hub_cache):
    headless, _pairs, csv, _names, _truths = scene_dataset
    config = training_config(csv=csv, output_dir=tmp_path / "run", epochs=4, device="cpu", val_fraction=0.0)
    config["preprocessing"]["patch_size"] = [32, 32]
    config["train"].update(steps_per_epoch=3, batch_size=2)
    run = TrainingRun(headless.scene)
    run.start(config)
    events = []
    while run.is_running and not any(e["event"] == "checkpoint" for e in events):
        events += run.poll()
        time.sleep(0.05)
    run.cancel()
    while run.is_running:
        events += run.poll()
        time.sleep(0.05)
    assert events[-1] == {"event": "cancelled"} and run.result is None
    assert training_run.can_resume(tmp_path / "run")
    done_before = len(run.curves.values("epoch"))
    assert 1 <= done_before < 4

    run.resume(tmp_path / "run", device="cpu")
    while run.is_running:
        run.poll()
        time.sleep(0.05)
    assert run.curves.values("epoch") == [float(e) for e in range(1, 5)], "resume continues the same curves"
    assert run.result is not None and (tmp_path / "run" / "model" / "medtl_package.json").is_file()


def test_engine_errors_reach_the_panel_as_one_message(scene_dataset, tmp_path):
    headless, _pairs, csv, _names, _truths = scene_dataset
    config = training_config(csv=csv, output_dir=tmp_path / "run", device="cpu", group_column="scanner")
    run = TrainingRun(headless.scene)
    run.start(config)
    with pytest.raises(RuntimeError, match="group_column 'scanner': no value in CSV row"):
        while run.is_running:
            run.poll()
            time.sleep(0.05)
    assert not run.is_running and "scanner" in run.last_log


def test_folder_layouts_become_a_data_set(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.nii.gz", "a_label.nii.gz", "b.nrrd", "b.seg.nrrd", "c.nrrd", "notes.txt"):
        (flat / name).write_bytes(b"")
    rows = dataset_csv_from_folder(flat, tmp_path / "flat.csv").read_text().splitlines()
    assert rows[0] == "image,label"
    assert [tuple(p.rsplit("/", 1)[1] for p in r.split(",")) for r in rows[1:]] == [
        ("a.nii.gz", "a_label.nii.gz"),
        ("b.nrrd", "b.seg.nrrd"),
    ]
    nnunet = tmp_path / "Dataset001"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    for case in ("liver_001", "liver_002"):
        (nnunet / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"")
        (nnunet / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    rows = dataset_csv_from_folder(nnunet, tmp_path / "nnunet.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].endswith("labelsTr/liver_001.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No image/label pairs"):
        dataset_csv_from_folder(tmp_path / "empty", tmp_path / "x.csv")


def test_bad_choices_are_named(scene_dataset, tmp_path):
    _headless, _pairs, csv, _names, _truths = scene_dataset
    with pytest.raises(ValueError, match="3D network: ImageNet"):
        training_config(csv=csv, output_dir=tmp_path, network="unet3d_resnet18")
    with pytest.raises(ValueError, match="weight file"):
        training_config(csv=csv, output_dir=tmp_path, pretrained="file", weights_file=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="Unknown loss 'l2'"):
        training_config(csv=csv, output_dir=tmp_path, loss="l2")
    with pytest.raises(ValueError, match="cannot hold whole sites out"):
        training_config(csv=csv, output_dir=tmp_path, domain_specific_batchnorm=True, group_column="site")


def test_one_batchnorm_per_site_reaches_the_engine(scene_dataset, tmp_path):
    from medtl.config import RunConfig

    _headless, _pairs, csv, names, _truths = scene_dataset
    config = training_config(csv=csv, output_dir=tmp_path, label_names=names, domain_specific_batchnorm=True)
    cfg = RunConfig.from_dict(config)
    assert cfg.adaptation.method == "dsbn" and cfg.adaptation.domain_column == "site"
    assert RunConfig.from_dict(training_config(csv=csv, output_dir=tmp_path, label_names=names)).adaptation.method == (
        "none"
    )


def test_panel_choices_are_the_engines():
    from medtl import config
    from medtl.models.registry import MODELS

    # The panel trains segmentations (scene pairs, label maps); classifiers train from the command line.
    segmentation = {name for name, spec in MODELS.items() if spec.task == "segmentation"}
    assert set(training_run.NETWORKS_2D + training_run.NETWORKS_3D) == segmentation
    assert all(MODELS[n].spatial_dims == 2 for n in training_run.NETWORKS_2D)
    assert set(training_run.NO_ENCODER) == {n for n in segmentation if not MODELS[n].has_encoder}
    assert set(training_run.STRATEGIES) == set(typing.get_args(config.Strategy))
    assert set(training_run.PRESETS) - {"auto"} == set(typing.get_args(config.Preset))
    assert set(training_run.AUGMENTATIONS) == set(typing.get_args(config.Augmentation))
    assert set(training_run.LOSSES) == set(config.SEGMENTATION_LOSSES)
    assert set(training_run.DEVICES) == set(typing.get_args(config.Device))


def test_an_estimate_says_how_long_before_anything_trains(scene_dataset, tmp_path, hub_cache):
    headless, _pairs, csv, names, _truths = scene_dataset
    config = training_config(csv=csv, output_dir=tmp_path / "run", label_names=names, epochs=3, device="cpu")
    config["preprocessing"]["patch_size"] = [32, 32]
    config["train"].update(steps_per_epoch=4, batch_size=4)
    run = TrainingRun(headless.scene)
    run.estimate(config)
    events = []
    while run.is_running:
        time.sleep(0.05)
        events += run.poll()
    assert run.plan is not None and run.plan["steps"] == 12 and run.plan["message"].startswith("about ")
    assert run.curves is None and run.result is None  # nothing trained, no curves
    assert not (tmp_path / "run").exists()
    from MedTLExtensionLib.engine_process import describe_event

    assert describe_event(run.plan)[1].startswith("Estimate: about ")
