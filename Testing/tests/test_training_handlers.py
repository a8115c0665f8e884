"""The trainer's handlers, each on its own (early stopping, plateau unfreezing, keep-best), the
state they share, and the hooks a handler of one's own is called at."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from medtl.config import RunConfig
from medtl.distributed import World
from medtl.events import EventSink
from medtl.training import EarlyStopping, Handler, KeepBest, PlateauUnfreezing, Trainer, TrainState


def _trainer(state: TrainState, **fields):
    """What a handler reads of a trainer, and the events it emitted."""
    seen: list[dict] = []
    fields.setdefault("world", World(0, 1, 0))
    return SimpleNamespace(state=state, events=EventSink(listeners=[seen.append]), seen=seen, **fields)


def _scores(state: TrainState, scores, handlers, epochs=10):
    """Runs the validation part of each epoch: the score into the state, then the handlers."""
    trainer = _trainer(state)
    for epoch, score in enumerate(scores, start=1):
        state.record_score(score, epoch=epoch)
        for handler in handlers:
            handler.on_validation_end(trainer, {"epoch": epoch})
        if state.stopped_early:
            return epoch, trainer
    return None, trainer


def test_the_state_counts_epochs_since_the_best_score_and_ignores_unscorable_ones():
    state = TrainState()
    assert [state.record_score(s, epoch=e) for e, s in enumerate([0.5, 0.4, None, 0.5, 0.6], start=1)] == [
        True,
        False,
        False,
        False,  # equal is not better
        True,
    ]
    assert (state.best_score, state.best_epoch, state.stall) == (0.6, 5, 0)


def test_early_stopping_after_patience_epochs_without_a_better_score():
    stopped, trainer = _scores(TrainState(), [0.5, 0.6, 0.55, 0.58, 0.59], [EarlyStopping(patience=3, epochs=10)])
    assert stopped == 5
    assert "early stop after epoch 5: no better validation score for 3 epoch(s)" in trainer.seen[-1]["message"]


@pytest.mark.parametrize(("patience", "epochs"), [(0, 10), (3, 5)])
def test_early_stopping_off_or_at_the_last_epoch_does_not_stop(patience, epochs):
    # patience 0 is "never"; a stall reached at the last epoch is the end of the run, not an early stop.
    scores = [0.5, 0.6, 0.4, 0.4, 0.4]  # the third epoch without a better score is the fifth, the last
    stopped, trainer = _scores(TrainState(), scores, [EarlyStopping(patience=patience, epochs=epochs)])
    assert stopped is None and not trainer.seen


def test_plateau_unfreezes_one_stage_per_stall_and_gives_each_its_own_chance():
    state = TrainState()
    plateau = PlateauUnfreezing(patience=2, n_stages=2)
    stopped, _ = _scores(state, [0.5, 0.4, 0.4], [plateau])
    assert state.plateau_unfrozen == 1 and state.stall == 0
    _scores(state, [0.4, 0.4, 0.4, 0.4, 0.4, 0.4], [plateau])
    assert state.plateau_unfrozen == 2, "no more stages than the encoder has"
    assert state.stall == 4


def test_plateau_before_early_stopping_unfreezes_everything_before_the_run_stops():
    state = TrainState()
    stopped, _ = _scores(
        state, [0.5] + [0.4] * 9, [PlateauUnfreezing(patience=2, n_stages=2), EarlyStopping(patience=2, epochs=20)]
    )
    # Epochs 3 and 5 unfreeze a stage each (the stall starts again); only then does the stall of 2 stop.
    assert state.plateau_unfrozen == 2 and stopped == 7


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def test_keep_best_writes_the_best_epoch_and_restores_it(tmp_path):
    path = tmp_path / "best.pt"
    state = TrainState()
    trainer = _trainer(state, model=_net(0), device=torch.device("cpu"), kept_epoch=None)
    keep = KeepBest(path, restore=True)
    best_weights = None
    for epoch, score in enumerate([0.5, 0.7, 0.6], start=1):
        trainer.model = _net(epoch)  # each epoch's weights differ
        state.record_score(score, epoch=epoch)
        state.history.append({"epoch": epoch})
        keep.on_epoch_end(trainer, {"epoch": epoch})
        if epoch == 2:
            best_weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        assert torch.load(path, weights_only=True)["epoch"] == state.best_epoch
    keep.on_train_end(trainer)
    assert trainer.kept_epoch == 2
    for key, value in best_weights.items():
        torch.testing.assert_close(trainer.model.state_dict()[key], value)
    assert "keeping epoch 2's weights (best validation score 0.7000), not epoch 3's" in trainer.seen[-1]["message"]


def test_keep_best_off_a_stale_file_or_another_rank_keeps_the_last_weights(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"epoch": 1, "model": _net(1).state_dict()}, path)
    last = _net(3).state_dict()

    def ended(restore: bool, rank: int = 0):
        state = TrainState(best_epoch=2, best_score=0.7, history=[{"epoch": 1}, {"epoch": 2}, {"epoch": 3}])
        trainer = _trainer(state, model=_net(3), device=torch.device("cpu"), kept_epoch=None, world=World(rank, 2, 0))
        KeepBest(path, restore=restore).on_train_end(trainer)
        for key, value in last.items():
            torch.testing.assert_close(trainer.model.state_dict()[key], value)
        return trainer

    assert ended(restore=False).kept_epoch is None
    assert ended(restore=True, rank=1).kept_epoch is None
    stale = ended(restore=True)  # the file holds epoch 1, the history says 2 was best
    assert stale.kept_epoch is None and "does not hold epoch 2" in stale.seen[-1]["message"]

    state = TrainState(best_epoch=3, history=[{"epoch": 3}])
    trainer = _trainer(state, model=_net(3), device=torch.device("cpu"), kept_epoch=None)
    KeepBest(tmp_path / "absent.pt", restore=True).on_train_end(trainer)
    assert trainer.kept_epoch == 3, "the last epoch was the best: nothing to load"


def test_keep_best_writes_only_on_rank_0_and_only_for_a_new_best(tmp_path):
    path = tmp_path / "best.pt"
    state = TrainState(best_epoch=1)
    KeepBest(path, restore=True).on_epoch_end(_trainer(state, model=_net(0), world=World(1, 2, 0)), {"epoch": 1})
    assert not path.exists()
    KeepBest(path, restore=True).on_epoch_end(_trainer(state, model=_net(0)), {"epoch": 2})
    assert not path.exists()


def test_a_checkpoint_written_before_the_train_state_resumes_its_counters():
    old = {  # the keys checkpoints had before TrainState (no 'scaler')
        "epoch": 2,
        "history": [
            {"epoch": 1, "loss": 1.0, "val_score": 0.4, "best_epoch": 1, "stall": 0},
            {"epoch": 2, "loss": 0.9, "val_score": 0.6, "best_epoch": 2, "stall": 0},
            {"epoch": 3, "loss": 0.8, "val_score": 0.5, "best_epoch": 2, "stall": 1, "plateau_unfrozen": 1,
             "micro_batch": 2, "train_patch": [48, 48]},
        ],
    }  # fmt: skip
    state = TrainState.from_checkpoint(old, micro_batch=4, train_patch=[64, 64])
    assert (state.epoch, state.best_score, state.best_epoch, state.stall) == (3, 0.6, 2, 1)
    assert (state.plateau_unfrozen, state.micro_batch, state.train_patch, state.scaler) == (1, 2, [48, 48], {})
    # Fewer samples per process than the micro-batch the run lowered to (more processes): the smaller.
    assert TrainState.from_checkpoint(old, micro_batch=1, train_patch=[64, 64]).micro_batch == 1
    assert TrainState.from_checkpoint(state.checkpoint(), micro_batch=4, train_patch=[64, 64]).epoch == 3


class _Recorder(Handler):
    """Notes every hook, and stops the run after epoch 2 as an early-stopping handler would."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_train_start(self, trainer):
        self.calls.append(("train_start",))

    def on_epoch_start(self, trainer):
        self.calls.append(("epoch_start", trainer.state.epoch))

    def on_step_end(self, trainer, loss):
        self.calls.append(("step_end", trainer.step_in_epoch, np.isfinite(loss)))

    def on_train_epoch_end(self, trainer, record):
        record["note"] = "added by a handler"
        self.calls.append(("train_epoch_end", record["epoch"]))

    def on_validation_end(self, trainer, record):
        self.calls.append(("validation_end", record["epoch"], record["val_dice"]))
        trainer.state.stopped_early = record["epoch"] == 2

    def on_epoch_end(self, trainer, record):
        self.calls.append(("epoch_end", record["epoch"], (trainer.run_dir / "checkpoint.pt").is_file()))

    def on_train_end(self, trainer):
        self.calls.append(("train_end", trainer.state.epoch))


def test_a_handler_of_ones_own_is_called_at_every_hook_in_order(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "model": {"name": "unet_resnet18", "pretrained": "none"},
            "preprocessing": {"patch_size": [32, 32]},
            "augmentation": "none",
            "train": {"epochs": 3, "steps_per_epoch": 2, "batch_size": 2, "device": "cpu"},
        }
    )
    rng = np.random.default_rng(0)
    items = [
        {"image": rng.random((1, 32, 32), dtype=np.float32), "label": (rng.random((1, 32, 32)) > 0.5).astype("int64")}
    ]
    recorder = _Recorder()
    trainer = Trainer(
        cfg, items, run_dir=tmp_path, scorer=lambda model: {"1": 0.5}, handlers=[recorder], events=EventSink()
    )
    state = trainer.run_training()
    epoch = [
        ("step_end", 1, True),
        ("step_end", 2, True),
    ]
    assert recorder.calls == [
        ("train_start",),
        ("epoch_start", 0),
        *epoch,
        ("train_epoch_end", 1),
        ("validation_end", 1, {"1": 0.5}),
        ("epoch_end", 1, True),
        ("epoch_start", 1),
        *epoch,
        ("train_epoch_end", 2),
        ("validation_end", 2, {"1": 0.5}),
        ("epoch_end", 2, True),
        ("train_end", 2),
    ]
    assert [h["epoch"] for h in state.history] == [1, 2] and state.history[0]["note"] == "added by a handler"
    assert (
        state.history[-1]["stopped_early"] and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    )
