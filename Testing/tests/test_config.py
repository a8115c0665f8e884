import json

import pytest
from medtl.config import RunConfig
from medtl.data.dataset import load_cases
from medtl.errors import ConfigError, DataError


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = RunConfig.from_dict({})
    path = tmp_path / "c.json"
    cfg.save(path)
    loaded = RunConfig.load(path)
    # The default output_dir is relative: a config file puts it beside itself.
    assert loaded.output_dir == str(tmp_path / "runs" / "latest")
    loaded.output_dir = cfg.output_dir
    assert loaded == cfg


def test_unknown_field_is_named_with_suggestion():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"model": {"nmae": "unet_resnet18"}})
    assert "'model.nmae' is unknown" in str(err.value)
    assert "did you mean 'name'" in str(err.value)


def test_invalid_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"strategy": {"name": "freeze_everything"}})
    message = str(err.value)
    assert "'strategy.name'" in message
    for allowed in ("feature_extraction", "full_finetune", "feature_extraction_then_finetune"):
        assert allowed in message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"amp": 1}}, "train.amp"),
        ({"optim": {"lr": -1.0}}, "optim.lr"),
        ({"preprocessing": {"patch_size": [64, 64, 64]}}, "preprocessing.patch_size"),
        ({"preprocessing": {"window": [300, -100]}}, "preprocessing.window"),
        ({"model": {"name": "unet_vgg"}}, "model.name"),
        (
            {
                "task": "segmentation_3d",
                "model": {"name": "unet3d", "pretrained": "imagenet"},
                "strategy": {"name": "full_finetune"},
                "preprocessing": {"patch_size": [32, 32, 32]},
            },
            "model.pretrained",
        ),
        (
            {
                "task": "segmentation_3d",
                "model": {"name": "unet3d", "pretrained": "none"},
                "preprocessing": {"patch_size": [32, 32, 32]},
            },
            "strategy.name",
        ),
        ({"task": "segmentation_3d", "preprocessing": {"patch_size": [32, 32, 32]}}, "model.name"),
    ],
)
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        RunConfig.from_dict(data)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"train": {')
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        RunConfig.load(path)


def test_config_csv_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.json"
    path.write_text(json.dumps({"data": {"csv": "cases.csv"}}))
    assert RunConfig.load(path).data.csv == str(tmp_path / "sub" / "cases.csv")


def test_missing_file_names_file_and_row(tmp_path):
    (tmp_path / "a.nrrd").write_bytes(b"x")
    (tmp_path / "a_label.nrrd").write_bytes(b"x")
    (tmp_path / "set.csv").write_text("image,label,site\na.nrrd,a_label.nrrd,A\nb.nrrd,a_label.nrrd,B\n")
    with pytest.raises(DataError) as err:
        load_cases(tmp_path / "set.csv")
    message = str(err.value)
    assert "set.csv: row 3, field 'image'" in message and "b.nrrd" in message


def test_csv_keeps_free_columns_and_needs_image_column(tmp_path):
    (tmp_path / "a.nrrd").write_bytes(b"x")
    (tmp_path / "ok.csv").write_text("image,label,site,sex\na.nrrd,a.nrrd,H1,F\n")
    case = load_cases(tmp_path / "ok.csv")[0]
    assert case.extra == {"site": "H1", "sex": "F"} and case.row == 2
    (tmp_path / "bad.csv").write_text("img,label\na.nrrd,a.nrrd\n")
    with pytest.raises(DataError, match="needs an 'image' column"):
        load_cases(tmp_path / "bad.csv")


@pytest.mark.parametrize("text", ['{"optim": {"lr": NaN}}', '{"optim": {"lr": Infinity}}'])
def test_non_finite_numbers_are_refused(tmp_path, text):
    # Python's JSON reader takes NaN and Infinity; a NaN learning rate trained a NaN package.
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="'optim.lr': .* is not a finite number"):
        RunConfig.load(path)


def test_duplicate_label_names_are_refused():
    with pytest.raises(ConfigError, match="'data.label_names': 'liver' appears twice"):
        RunConfig.from_dict({"data": {"label_names": ["liver", "tumour", "liver"]}})


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"train": {"epochs": 3}}).encode())
    assert RunConfig.load(path).train.epochs == 3


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="'unet_resnet43' is unknown \\(did you mean 'unet_resnet34'\\?\\)"):
        RunConfig.from_dict({"model": {"name": "unet_resnet43"}})


def test_every_relative_path_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.json"
    raw = {
        "data": {"csv": "cases.csv", "cache_dir": "cache"},
        "adaptation": {"method": "adabn", "target_csv": "../target.csv"},
        "model": {"pretrained": "weights/encoder.pt"},
        "output_dir": "runs/a",
    }
    path.write_text(json.dumps(raw))
    cfg = RunConfig.load(path)
    sub = tmp_path / "sub"
    assert cfg.data.csv == str(sub / "cases.csv") and cfg.data.cache_dir == str(sub / "cache")
    assert cfg.adaptation.target_csv == str(tmp_path / "target.csv")
    assert cfg.model.pretrained == str(sub / "weights" / "encoder.pt") and cfg.output_dir == str(sub / "runs" / "a")
    absolute = {**raw, "output_dir": str(tmp_path / "elsewhere"), "model": {"pretrained": "imagenet"}}
    path.write_text(json.dumps(absolute))
    cfg = RunConfig.load(path)
    assert cfg.output_dir == str(tmp_path / "elsewhere") and cfg.model.pretrained == "imagenet"
