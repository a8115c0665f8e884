import numpy as np
import pytest
import torch
from medtl.config import RunConfig, StrategyConfig
from medtl.events import EventSink
from medtl.models.registry import build_model
from medtl.strategies import param_groups, set_encoder_trainable, set_trainable_stages, unfrozen_stages
from medtl.train import BEST, fit


def _items(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        label = np.zeros((1, size, size), np.int64)
        label[0, 8:20, 10:24] = 1
        image = (rng.random((1, size, size)) * 0.2 + 0.6 * label).astype(np.float32)
        items.append({"image": image, "label": label})
    return items


def _cfg(strategy: str, epochs=2, fe_epochs=1, **strategy_fields):
    return RunConfig.from_dict(
        {
            "model": {"name": "unet_resnet18", "pretrained": "none"},
            "preprocessing": {"patch_size": [32, 32]},
            "strategy": {
                "name": strategy,
                "feature_extraction_epochs": fe_epochs,
                "encoder_lr_factor": 0.1,
                **strategy_fields,
            },
            "train": {"epochs": epochs, "steps_per_epoch": 2, "batch_size": 2, "device": "cpu"},
            "augmentation": "none",
        }
    )


def _stage_ids(model):
    return [{id(p) for p in stage.parameters()} for stage in model.encoder_stages()]


def test_param_groups_cover_every_parameter_once_with_the_strategy_rates():
    model = build_model("unet_resnet18", num_classes=2)
    groups = param_groups(model, StrategyConfig(name="full_finetune", encoder_lr_factor=0.1), lr=1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [g["name"] for g in groups] == ["head", "encoder.0", "encoder.1", "encoder.2", "encoder.3", "encoder.4"]
    for group, stage in zip(groups[1:], _stage_ids(model), strict=True):
        assert {id(p) for p in group["params"]} == stage
        assert group["lr"] == pytest.approx(1e-4)
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    assert set().union(*_stage_ids(model)) == encoder_ids, "the stages are the whole encoder"
    assert not encoder_ids & {id(p) for p in groups[0]["params"]}


def test_discriminative_rates_decay_towards_the_input():
    model = build_model("unet_resnet18", num_classes=2)
    groups = param_groups(model, StrategyConfig(name="discriminative_lr", lr_decay=0.3), lr=1e-2)
    rates = [g["lr"] for g in groups]
    assert rates[0] == 1e-2
    assert rates[1:] == pytest.approx([1e-2 * 0.3**k for k in (5, 4, 3, 2, 1)])


@pytest.mark.parametrize(
    ("name", "fields", "per_epoch"),
    [
        ("feature_extraction", {}, [0, 0, 0, 0, 0]),
        ("full_finetune", {}, [5, 5, 5, 5, 5]),
        ("discriminative_lr", {}, [5, 5, 5, 5, 5]),
        ("feature_extraction_then_finetune", {"feature_extraction_epochs": 2}, [0, 0, 5, 5, 5]),
        ("gradual_unfreezing", {"unfreeze_every": 1}, [0, 1, 2, 3, 4]),
        ("gradual_unfreezing", {"unfreeze_every": 2}, [0, 0, 1, 1, 2]),
    ],
)
def test_schedule_of_each_strategy(name, fields, per_epoch):
    strategy = StrategyConfig(name=name, **fields)
    assert [unfrozen_stages(strategy, e, 5) for e in range(5)] == per_epoch


def test_plateau_schedule_follows_the_count_the_loop_keeps():
    strategy = StrategyConfig(name="gradual_unfreezing", unfreeze_on_plateau=True)
    assert [unfrozen_stages(strategy, 9, 5, plateau_unfrozen=k) for k in (0, 2, 7)] == [0, 2, 5]


def test_partial_unfreezing_freezes_exactly_the_lower_stages_and_their_batchnorm():
    model = build_model("unet_resnet18", num_classes=2)
    set_trainable_stages(model, 2)
    model.train()
    stages = model.encoder_stages()
    for index, stage in enumerate(stages):
        trainable = index >= 3
        assert all(p.requires_grad == trainable for p in stage.parameters()), index
        bns = [m for m in stage.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all(m.training == trainable for m in bns), index
    assert all(p.requires_grad for p in model.core.decoder.parameters())
    set_encoder_trainable(model, True)
    assert all(p.requires_grad for p in model.encoder.parameters()) and not model.frozen_stages


def test_feature_extraction_changes_nothing_in_the_encoder(tmp_path):
    model = build_model("unet_resnet18", num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(_cfg("feature_extraction"), _items(), run_dir=tmp_path, model=model)
    after = model.state_dict()
    enc_keys = [k for k in before if k.startswith("core.encoder.")]
    assert any("running_mean" in k for k in enc_keys)
    for key in enc_keys:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=f"{key} moved")
    moved = [k for k in before if k.startswith("core.decoder.") and not torch.equal(before[k], after[k])]
    assert moved, "the decoder did not train"


def test_gradual_unfreezing_moves_only_the_unfrozen_stages(tmp_path):
    model = build_model("unet_resnet18", num_classes=2)
    names = {id(p): n for n, p in model.named_parameters()}
    stage_keys = [{names[i] for i in ids} for ids in _stage_ids(model)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(_cfg("gradual_unfreezing", epochs=3, unfreeze_every=1), _items(), run_dir=tmp_path, model=model)
    assert [h["unfrozen_stages"] for h in result.history] == [0, 1, 2]
    after = model.state_dict()
    for index, keys in enumerate(stage_keys):
        moved = any(not torch.equal(before[k], after[k]) for k in keys)
        assert moved == (index >= 3), f"stage {index} moved={moved}"
    # BatchNorm statistics of the stages that never trained are the pretrained ones.
    stats = [k for k in before if k.startswith("core.encoder.stages.0.") and "running" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)


def test_feature_extraction_then_finetune_unfreezes_on_schedule(tmp_path):
    model = build_model("unet_resnet18", num_classes=2)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    result = fit(
        _cfg("feature_extraction_then_finetune", epochs=2, fe_epochs=1), _items(), run_dir=tmp_path, model=model
    )
    assert [h["encoder_trainable"] for h in result.history] == [False, True]
    assert any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert all(p.requires_grad for p in model.encoder.parameters())


def _scripted_validation(scores):
    calls = iter(scores)

    def validate(model):
        return {"foreground": next(calls)}

    return validate


def test_plateau_unfreezes_the_next_stage_when_validation_stalls(tmp_path):
    cfg = _cfg("gradual_unfreezing", epochs=5, unfreeze_on_plateau=True, plateau_patience=1)
    result = fit(cfg, _items(), run_dir=tmp_path, validate=_scripted_validation([0.5, 0.6, 0.6, 0.7, 0.7]))
    # Epoch 3 stalls -> one stage from epoch 4 on; epoch 5 stalls again, after the last epoch.
    assert [h["unfrozen_stages"] for h in result.history] == [0, 0, 0, 1, 1]


def test_early_stopping_and_best_checkpoint(tmp_path):
    cfg = _cfg("full_finetune", epochs=8)
    cfg.train.early_stopping_patience = 2
    lines = []
    sink = EventSink(listeners=[lines.append])
    seen = {}
    scores = iter([0.2, 0.8, 0.5, 0.4, 0.9, 0.9, 0.9, 0.9])

    def validate(model):
        seen[len(seen) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"foreground": next(scores)}

    result = fit(cfg, _items(), run_dir=tmp_path, validate=validate, events=sink)
    assert len(result.history) == 4 and result.stopped_early
    assert result.best_epoch == 2
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, seen[2][key], rtol=0, atol=0)
    assert (tmp_path / BEST).is_file()
    messages = [event.get("message", "") for event in lines]
    assert any("early stop after epoch 4" in m for m in messages)
    assert any("keeping epoch 2's weights" in m for m in messages)


def test_keep_best_off_keeps_the_last_weights(tmp_path):
    cfg = _cfg("full_finetune", epochs=3)
    cfg.train.keep_best = False
    last = {}
    scores = iter([0.9, 0.5, 0.1])

    def validate(model):
        last.update({k: v.clone() for k, v in model.state_dict().items()})
        return {"foreground": next(scores)}

    result = fit(cfg, _items(), run_dir=tmp_path, validate=validate)
    assert result.best_epoch is None and not result.stopped_early
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, last[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"strategy": {"name": "gradual_unfreezing", "unfreeze_every": 0}}, "strategy.unfreeze_every"),
        ({"strategy": {"name": "discriminative_lr", "lr_decay": 1.5}}, "strategy.lr_decay"),
        ({"train": {"early_stopping_patience": -1}}, "train.early_stopping_patience"),
        (
            {
                "model": {"name": "unet3d"},
                "task": "segmentation_3d",
                "preprocessing": {"patch_size": [32, 32, 32]},
                "strategy": {"name": "gradual_unfreezing"},
            },
            "no separate pretrained encoder",
        ),
    ],
)
def test_bad_strategy_settings_name_the_field(fields, message):
    from medtl.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"}, **fields})


def test_plateau_without_validation_falls_back_to_the_schedule(tmp_path):
    cfg = _cfg("gradual_unfreezing", epochs=3, unfreeze_every=1, unfreeze_on_plateau=True)
    warnings = []
    result = fit(cfg, _items(), run_dir=tmp_path, events=EventSink(listeners=[warnings.append]))
    assert [h["unfrozen_stages"] for h in result.history] == [0, 1, 2]
    assert any("needs validation" in e.get("message", "") for e in warnings if e["event"] == "warning")


def test_an_unscorable_epoch_is_not_a_stall(tmp_path):
    cfg = _cfg("full_finetune", epochs=4)
    cfg.train.early_stopping_patience = 1
    result = fit(cfg, _items(), run_dir=tmp_path, validate=_scripted_validation([0.5, float("nan"), float("nan"), 0.6]))
    assert len(result.history) == 4 and not result.stopped_early and result.best_epoch == 4


def test_resuming_a_run_that_stopped_early_trains_no_further(tmp_path):
    cfg = _cfg("full_finetune", epochs=5)
    cfg.train.early_stopping_patience = 1
    first = fit(cfg, _items(), run_dir=tmp_path, validate=_scripted_validation([0.5, 0.4, 0.9, 0.9, 0.9]))
    assert len(first.history) == 2 and first.stopped_early and first.best_epoch == 1
    events = []
    again = fit(
        cfg,
        _items(),
        run_dir=tmp_path,
        resume=True,
        validate=_scripted_validation([]),
        events=EventSink(listeners=[events.append]),
    )
    assert len(again.history) == 2 and again.best_epoch == 1
    assert any("stopped early" in e.get("message", "") for e in events)
    for key, value in again.model.state_dict().items():
        torch.testing.assert_close(value, first.model.state_dict()[key])
