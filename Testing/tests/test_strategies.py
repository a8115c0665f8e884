import numpy as np
import pytest
import torch
from medtl.config import RunConfig, StrategyConfig
from medtl.models.registry import build_model
from medtl.strategies import encoder_trainable, param_groups, set_encoder_trainable
from medtl.train import fit


def _items(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        label = np.zeros((1, size, size), np.int64)
        label[0, 8:20, 10:24] = 1
        image = (rng.random((1, size, size)) * 0.2 + 0.6 * label).astype(np.float32)
        items.append({"image": image, "label": label})
    return items


def _cfg(strategy: str, epochs=2, fe_epochs=1):
    return RunConfig.from_dict(
        {
            "model": {"name": "unet_resnet18", "pretrained": "none"},
            "preprocessing": {"patch_size": [32, 32]},
            "strategy": {"name": strategy, "feature_extraction_epochs": fe_epochs, "encoder_lr_factor": 0.1},
            "train": {"epochs": epochs, "steps_per_epoch": 2, "batch_size": 2, "device": "cpu"},
            "augmentation": "none",
        }
    )


def test_param_groups_split_encoder_and_decoder_exactly():
    model = build_model("unet_resnet18", num_classes=2)
    groups = param_groups(model, lr=1e-3, encoder_lr_factor=0.1)
    enc = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups[1]["params"]} == enc
    assert not enc & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    assert groups[1]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("name", "epochs_trainable"),
    [
        ("feature_extraction", [False, False, False]),
        ("full_finetune", [True, True, True]),
        ("feature_extraction_then_finetune", [False, False, True]),
    ],
)
def test_schedule_of_each_strategy(name, epochs_trainable):
    strategy = StrategyConfig(name=name, feature_extraction_epochs=2)
    assert [encoder_trainable(strategy, e) for e in range(3)] == epochs_trainable


def test_frozen_encoder_keeps_batchnorm_in_eval_mode():
    model = build_model("unet_resnet18", num_classes=2)
    set_encoder_trainable(model, False)
    model.train()
    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    decoder_bns = [m for m in model.core.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training for m in decoder_bns)
    set_encoder_trainable(model, True)
    assert all(m.training for m in bns) and all(p.requires_grad for p in model.encoder.parameters())


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


def test_feature_extraction_then_finetune_unfreezes_on_schedule(tmp_path):
    model = build_model("unet_resnet18", num_classes=2)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    result = fit(
        _cfg("feature_extraction_then_finetune", epochs=2, fe_epochs=1), _items(), run_dir=tmp_path, model=model
    )
    assert [h["encoder_trainable"] for h in result.history] == [False, True]
    assert any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert all(p.requires_grad for p in model.encoder.parameters())
