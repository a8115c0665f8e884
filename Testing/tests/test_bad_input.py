"""Bad input is refused before any computation, with one line naming the file and CSV row, and
nothing is lost: no input changes and no half-made output is left (issue 20)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import synthetic_case, tiny_config
from medtl.cli import main
from medtl.config import RunConfig
from medtl.data.checks import check_free_space, checked_image, checked_label
from medtl.errors import DataError, RunFailure


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by its sha256: equal fingerprints, unchanged files."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """``medtl ARGS`` in this process: the exit status and the lines written to stderr."""
    capsys.readouterr()
    code = main([*args, "--quiet"] if args[0] in ("train", "predict") else list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def write_case(folder: Path, name: str, image: sitk.Image, label: sitk.Image) -> tuple[Path, Path]:
    sitk.WriteImage(image, str(folder / f"{name}.nrrd"))
    sitk.WriteImage(label, str(folder / f"{name}_label.nrrd"))
    return folder / f"{name}.nrrd", folder / f"{name}_label.nrrd"


def dataset(folder: Path, bad_image: sitk.Image | None = None, bad_label: sitk.Image | None = None) -> Path:
    """A CSV of two good cases, then (row 4) a case with the given bad image or label."""
    rows = ["image,label"]
    for i in range(3):
        image, label = synthetic_case(i)
        if i == 2:
            image = bad_image if bad_image is not None else image
            label = bad_label if bad_label is not None else label
        rows.append(",".join(p.name for p in write_case(folder, f"case{i}", image, label)))
    (folder / "set.csv").write_text("\n".join(rows) + "\n")
    return folder / "set.csv"


def like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def train_refused(tmp_path: Path, capsys, csv: Path, **overrides) -> list[str]:
    """``medtl train`` on ``csv``: exit 2 with one line; the data and the output folder are
    unchanged (no run folder made)."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_config(csv, tmp_path / "out", **overrides)))
    before = fingerprint(csv.parent)
    code, lines = cli(capsys, "train", str(config))
    assert code == 2 and len(lines) == 1, lines
    assert fingerprint(csv.parent) == before
    assert not (tmp_path / "out").exists(), "a run refused before training leaves no folder"
    return lines


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_voxels_are_named_by_file_and_row(tmp_path, capsys, value):
    image, _ = synthetic_case(2)
    array = sitk.GetArrayFromImage(image)
    array[3, 10:12, 10:12] = value
    data = tmp_path / "data"
    data.mkdir()
    csv = dataset(data, bad_image=like(array, image))
    (line,) = train_refused(tmp_path, capsys, csv)
    kind = "4 NaN and 0 infinite" if np.isnan(value) else "0 NaN and 4 infinite"
    assert line.startswith("medtl: error: row 4, image ") and "case2.nrrd" in line and kind in line
    assert "preprocessing.nan_policy" in line


def test_nan_policy_zero_reads_non_finite_voxels_as_zero(tmp_path):
    image, label = synthetic_case(0)
    array = sitk.GetArrayFromImage(image)
    array[0, 0, :3] = [np.nan, np.inf, -np.inf]
    fixed = checked_image(like(array, image), "x.nrrd", policy="zero")
    assert np.isfinite(sitk.GetArrayViewFromImage(fixed)).all()
    assert sitk.GetArrayViewFromImage(fixed)[0, 0, :3].tolist() == [0, 0, 0]
    assert np.isnan(array[0, 0, 0]), "the image given is not changed"
    from medtl.data.dataset import Case
    from medtl.pipeline import load_case_arrays

    paths = write_case(tmp_path, "nan", like(array, image), label)
    cfg = RunConfig.from_dict(tiny_config("x.csv", tmp_path / "out", preprocessing={"nan_policy": "zero"}))
    volume, _ = load_case_arrays(Case(image=paths[0], label=paths[1], row=2), cfg)
    assert np.isfinite(volume).all()


def test_a_fractional_label_is_refused_not_truncated(tmp_path, capsys):
    image, label = synthetic_case(2)
    halves = sitk.GetArrayFromImage(label).astype(np.float32) / 2  # 0 / 0.5 / 1.0: liver became background
    data = tmp_path / "data"
    data.mkdir()
    csv = dataset(data, bad_label=like(halves, image))
    (line,) = train_refused(tmp_path, capsys, csv)
    assert line.startswith("medtl: error: row 4, label ") and "case2_label.nrrd" in line
    assert "not whole-number label values (e.g. 0.5)" in line


def test_float_labels_holding_whole_numbers_are_fine_including_unknown_255():
    image, label = synthetic_case(0)
    array = sitk.GetArrayFromImage(label).astype(np.float32)
    array[0] = 255.0  # the reserved "unknown" value of partial labels
    checked_label(like(array, image), "l.nrrd", row=2)


@pytest.mark.parametrize("kind", ["2D", "4D", "vector"])
def test_images_that_are_not_scalar_volumes_are_named(tmp_path, capsys, kind):
    image, _ = synthetic_case(2)
    array = sitk.GetArrayFromImage(image)
    if kind == "2D":
        bad = sitk.GetImageFromArray(array[0])
    elif kind == "4D":
        bad = sitk.JoinSeries([image, image])
    else:
        bad = sitk.GetImageFromArray(np.stack([array] * 3, axis=-1), isVector=True)
    data = tmp_path / "data"
    data.mkdir()
    csv = dataset(data, bad_image=bad)
    (line,) = train_refused(tmp_path, capsys, csv)
    assert line.startswith("medtl: error: row 4, image ") and "case2.nrrd" in line
    expected = {"2D": "a 2D image", "4D": "a 4D image", "vector": "3 values per voxel"}[kind]
    assert expected in line


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """An untrained package (predicting needs no training to test its checks)."""
    from medtl.models.registry import build_model
    from medtl.package import save_package

    folder = tmp_path_factory.mktemp("pkg")
    cfg = RunConfig.from_dict(
        tiny_config("x.csv", folder / "run", model={"name": "unet_resnet18", "pretrained": "none"})
    )
    return save_package(folder / "model", build_model("unet_resnet18", num_classes=3), cfg)


@pytest.fixture
def ct(tmp_path) -> Path:
    image, _ = synthetic_case(5)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    return tmp_path / "ct.nrrd"


def test_predict_onto_its_own_input_is_refused_and_the_input_kept(package, ct, capsys):
    before = fingerprint(ct.parent)
    code, lines = cli(capsys, "predict", "--model", str(package), "--image", str(ct), "--out", str(ct))
    assert code == 2 and lines == [
        f"medtl: error: --out {ct}: is an input of this command; writing it would destroy it"
    ]
    assert fingerprint(ct.parent) == before
    code, lines = cli(
        capsys, "predict", "--model", str(package), "--image", str(ct), "--out", str(ct.parent / "a.nrrd"),
        "--probabilities", str(ct.parent / "a.nrrd"),
    )  # fmt: skip
    assert code == 2 and "name the same file" in lines[0] and fingerprint(ct.parent) == before


def test_an_output_no_writer_knows_is_refused_before_inference(package, ct, capsys, monkeypatch):
    import medtl.any_package

    def never(*args, **kwargs):
        raise AssertionError("inference ran before the output was checked")

    monkeypatch.setattr(medtl.any_package, "segment_image", never)
    before = fingerprint(ct.parent)
    out = ct.parent / "seg.xyz"
    code, lines = cli(capsys, "predict", "--model", str(package), "--image", str(ct), "--out", str(out))
    assert code == 2 and len(lines) == 1 and "--out" in lines[0] and "no image writer for this file name" in lines[0]
    code, lines = cli(capsys, "predict", "--model", str(package), "--image", str(ct), "--out", str(ct.parent))
    assert code == 2 and "is a folder" in lines[0]
    assert fingerprint(ct.parent) == before


def test_predict_refuses_a_nan_image(package, tmp_path, capsys):
    image, _ = synthetic_case(5)
    array = sitk.GetArrayFromImage(image)
    array[:] = np.nan
    sitk.WriteImage(like(array, image), str(tmp_path / "nan.nrrd"))
    code, lines = cli(
        capsys,
        "predict",
        "--model",
        str(package),
        "--image",
        str(tmp_path / "nan.nrrd"),
        "--out",
        str(tmp_path / "s.nrrd"),
    )
    assert code == 2 and len(lines) == 1 and "nan.nrrd: 18432 NaN and 0 infinite voxel(s)" in lines[0]
    assert not (tmp_path / "s.nrrd").exists()


def test_too_little_free_space_is_a_run_failure(tmp_path):
    free = __import__("shutil").disk_usage(tmp_path).free
    with pytest.raises(RunFailure, match="MB free on its disk, the prediction needs about") as err:
        check_free_space(tmp_path / "seg.nrrd", free + (1 << 30), what="the prediction")
    assert err.value.exit_code == 1
    check_free_space(tmp_path / "deeper" / "seg.nrrd", 1000, what="the prediction")  # a folder not made yet


def test_a_diverging_training_stops_with_an_error_and_writes_no_package(tmp_path, capsys, synthetic_dataset):
    # Values near float32's largest overflow the network's first layers: the loss is not finite.
    data = tmp_path / "data"
    data.mkdir()
    image, _ = synthetic_case(0)
    csv_rows = ["image,label"]
    for i in range(2):
        huge = like(np.full(sitk.GetArrayFromImage(image).shape, 3e38, np.float32), image)
        paths = write_case(data, f"huge{i}", huge, synthetic_case(i)[1])
        csv_rows.append(",".join(p.name for p in paths))
    (data / "set.csv").write_text("\n".join(csv_rows) + "\n")
    cfg = tiny_config(
        data / "set.csv",
        tmp_path / "out",
        data={"val_fraction": 0.0},
        preprocessing={"preset": "none"},
        model={"name": "unet_resnet18", "pretrained": "none"},
        train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 2},
    )
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    code, lines = cli(capsys, "train", str(tmp_path / "run.json"))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("medtl: error: training loss became nan at epoch 1, step 1; no package written")
    assert not (tmp_path / "out").exists(), "a run that failed before its first checkpoint leaves nothing"


def test_permissions_follow_the_umask(tmp_path, package):
    from medtl.data.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
        assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        atomic_write_text(tmp_path / "group.txt", "x")
        assert (tmp_path / "group.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert package.stat().st_mode & 0o777 == 0o777 & ~old


def test_errors_are_one_line_with_the_right_status(tmp_path, capsys, monkeypatch):
    from medtl import cli as cli_module

    def fail(error):
        def dispatch(*args):
            raise error

        monkeypatch.setattr(cli_module, "_dispatch", dispatch)
        capsys.readouterr()
        code = main(["info", "x"])
        return code, capsys.readouterr().err.strip().splitlines()

    code, lines = fail(OSError(28, "No space left on device", str(tmp_path / "ckpt.pt")))
    assert code == 1 and lines == [f"medtl: error: no space left on the device writing {tmp_path / 'ckpt.pt'}"]
    code, lines = fail(PermissionError(13, "Permission denied", "/srv/out.nrrd"))
    assert code == 1 and lines == ["medtl: error: Permission denied: /srv/out.nrrd"]
    code, lines = fail(MemoryError())
    assert code == 1 and lines[0].startswith("medtl: error: out of memory")
    code, lines = fail(ValueError("something unforeseen\nsecond line"))
    assert code == 1 and lines == [
        "medtl: error: internal error: ValueError: something unforeseen (run with --debug for the traceback)"
    ]
    code, lines = fail(DataError("row 2: bad"))
    assert code == 2 and lines == ["medtl: error: row 2: bad"]
    with pytest.raises(DataError):  # --debug: the traceback instead of the line
        main(["--debug", "info", "x"])


@pytest.mark.parametrize("kind", ["text as image", "truncated image", "binary csv"])
def test_damaged_and_disguised_files_are_one_line(tmp_path, capsys, kind):
    data = tmp_path / "data"
    data.mkdir()
    csv = dataset(data)
    if kind == "text as image":
        (data / "case2.nrrd").write_text("this is not an image\n")
    elif kind == "truncated image":
        raw = (data / "case2_label.nrrd").read_bytes()
        (data / "case2_label.nrrd").write_bytes(raw[: len(raw) // 2])
    else:
        csv.write_bytes(bytes(range(256)) * 4)
    (line,) = train_refused(tmp_path, capsys, csv)
    expected = {
        "text as image": "medtl: error: row 4, image: ",
        "truncated image": "medtl: error: row 4, label: ",
        "binary csv": f"medtl: error: {csv}: not a UTF-8 text CSV",
    }[kind]
    assert line.startswith(expected), line
    if kind != "binary csv":
        assert "cannot read image" in line and "case2" in line


def test_the_checks_import_without_torch():
    """The Slicer side may use them: like the other protocol modules they need no torch or MONAI."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys\n"
        "sys.modules['torch'] = sys.modules['monai'] = None\n"
        "import medtl.data.checks, medtl.signing, medtl.run_folder, medtl.errors\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "MedTLTraining")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unlabelled_target_images_are_checked_too(tmp_path):
    """AdaBN and DANN read images without labels: a NaN there is named like anywhere else."""
    from medtl.adaptation.adapt_package import target_images
    from medtl.config import RunConfig
    from medtl.errors import DataError

    array = np.zeros((4, 16, 16), np.float32)
    array[1, 2, 3] = np.nan
    path = tmp_path / "target.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    cfg = RunConfig.from_dict({"model": {"pretrained": "none"}})
    with pytest.raises(DataError, match="target.nrrd"):
        target_images([path], cfg)
