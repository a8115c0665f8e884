"""The trainer: a short loop over named steps, in nnU-Net's shape, with handlers attached.

:meth:`Trainer.run_training` reads as the run does: start, then per epoch its start, the steps,
the end of training, validation and the epoch's end (history, checkpoint), then the end of the
run. Each named step is a method a variant may override; what varies between runs (domain
adaptation, the out-of-memory back-off, early stopping, keep-best, plateau unfreezing, progress
events) is a :class:`~medtl.training.handlers.Handler` attached to it.

Randomness is re-seeded at the start of every epoch from ``(seed, epoch)``, so a run resumed from
its last checkpoint continues exactly as the uninterrupted run would have (on the CPU).

Example:
    >>> import numpy as np, tempfile
    >>> from medtl.config import RunConfig
    >>> cfg = RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"},
    ...     "preprocessing": {"patch_size": [32, 32]}, "augmentation": "none",
    ...     "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "device": "cpu"}})
    >>> items = [{"image": np.random.rand(1, 32, 32).astype("float32"),
    ...           "label": (np.random.rand(1, 32, 32) > 0.5).astype("int64")}]
    >>> trainer = Trainer(cfg, items, run_dir=tempfile.mkdtemp())
    >>> [record["epoch"] for record in trainer.run_training().history]
    [1]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl import distributed
from medtl.config import RunConfig
from medtl.data.io import atomic_path
from medtl.errors import DataError, RunFailure
from medtl.events import EventSink
from medtl.stop import check_stop
from medtl.strategies import set_trainable_stages, unfrozen_stages
from medtl.training.backoff import OutOfMemoryBackoff, center_crop
from medtl.training.handlers import EarlyStopping, Handler, KeepBest, PlateauUnfreezing, ProgressEvents
from medtl.training.setup import Setup
from medtl.training.state import TrainState

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"

Scorer = Callable[[torch.nn.Module], dict[str, float]]


class Trainer(Setup):
    """Trains a network on in-memory samples; see :func:`medtl.train.fit` for the arguments.

    Args:
        cfg: the run configuration.
        items: the training samples.
        run_dir: where ``checkpoint.pt`` (and ``best.pt``) go.
        events: the JSON-lines sink for progress.
        resume: continue from ``run_dir/checkpoint.pt`` if present.
        model: start from this network instead of building one.
        label: names the run in progress events.
        scorer: scores the network after every epoch (validation); None trains without.
        n_domains: domain-specific BatchNorm with this many domains.
        target_items: unlabelled target-domain samples for adversarial training (DANN).
        handlers: attached after the built-in ones (e.g. live previews).
        checkpoints: write ``checkpoint.pt`` after every epoch (resume needs it; a warm engine's
            round, which ends in a model package and is never resumed, does not).
        optimizer_state: an earlier run's ``optimizer.state_dict()`` on the same network (the warm
            engine's last round): AdamW's moments continue where they were when the trainable
            parameters are the same; the learning rates are this run's.

    Attributes:
        state: the :class:`TrainState`, checkpointed after every epoch.
        kept_epoch: the epoch whose weights the network ends with when keep-best applied.
    """

    def __init__(
        self,
        cfg: RunConfig,
        items: Sequence[dict[str, np.ndarray]],
        *,
        run_dir: str | Path,
        events: EventSink | None = None,
        resume: bool = False,
        model: torch.nn.Module | None = None,
        label: str = "train",
        scorer: Scorer | None = None,
        n_domains: int = 0,
        target_items: Sequence[dict[str, np.ndarray]] | None = None,
        handlers: Iterable[Handler] = (),
        checkpoints: bool = True,
        optimizer_state: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            cfg,
            items,
            run_dir=run_dir,
            events=events,
            resume=resume,
            model=model,
            n_domains=n_domains,
            target_items=target_items,
        )
        self.scorer = scorer
        self.checkpoints = checkpoints
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self.best_path = self.run_dir / BEST
        self.state = TrainState(micro_batch=self.local_batch, train_patch=list(self.patch))
        self.load_checkpoint(resume)
        if optimizer_state is not None and not resume:
            self.continue_moments(optimizer_state)
        self.start_epoch = self.state.epoch
        self.backoff = OutOfMemoryBackoff()
        self.handlers = [*self.default_handlers(label), *handlers]
        self.kept_epoch: int | None = None
        self.t0 = time.perf_counter()
        self.steps_done = self.images = self.step_in_epoch = 0
        self.unfrozen, self._applied_unfrozen = 0, -1
        self.stop_reason: str | None = None

    def run_training(self) -> TrainState:
        """Trains from the state's epoch to the configured last one (or an early stop, or a
        :meth:`request_stop`)."""
        self.on_train_start()
        while self.state.epoch < self.cfg.train.epochs and not self.state.stopped_early and not self.stop_reason:
            self.on_epoch_start()
            for batch, target_batch in zip(self.loader, self.target_loader, strict=True):
                self.train_step(batch, target_batch)
                if self.stop_reason:
                    break
            record = self.on_train_epoch_end()
            if self.scorer is not None:
                self.validate(record)
            self.on_epoch_end(record)
        self.on_train_end()
        return self.state

    def default_handlers(self, label: str) -> list[Handler]:
        """Progress events, the loss step, the out-of-memory back-off, and with validation the
        plateau unfreezing, early stopping and keep-best the configuration asks for."""
        handlers: list[Handler] = [ProgressEvents(label=label), self.loss_step, self.backoff]
        train, strategy = self.cfg.train, self.cfg.strategy
        if self.plateau and self.scorer is None:
            self.events.emit(
                "warning", message="unfreezing on a plateau needs validation; unfreezing on the epoch schedule"
            )
            self.plateau = False
            self.strategy = dataclasses.replace(strategy, unfreeze_on_plateau=False)
        if train.early_stopping_patience and self.scorer is None:
            self.events.emit("warning", message="early stopping needs validation; training every epoch")
        if self.state.stopped_early:
            last = self.state.history[-1]["epoch"]
            self.events.emit("message", message=f"this run stopped early after epoch {last}; nothing to resume")
        if self.scorer is None:
            return handlers
        if self.plateau:
            handlers.append(PlateauUnfreezing(patience=strategy.plateau_patience, n_stages=self.n_stages))
        if train.early_stopping_patience:
            handlers.append(EarlyStopping(patience=train.early_stopping_patience, epochs=train.epochs))
        return [*handlers, KeepBest(self.best_path, restore=train.keep_best)]

    def continue_moments(self, earlier: dict[str, Any]) -> bool:
        """Takes AdamW's moments from ``earlier`` (an optimiser state on the same network) when its
        parameter groups hold the same parameters as this run's; the groups' learning rates and
        the schedule stay this run's. Returns whether the moments were taken."""
        current = self.optimizer.state_dict()
        shapes = [(g.get("name"), len(g["params"])) for g in current["param_groups"]]
        if shapes != [(g.get("name"), len(g["params"])) for g in earlier.get("param_groups", [])]:
            return False
        self.optimizer.load_state_dict({"state": earlier["state"], "param_groups": current["param_groups"]})
        return True

    def request_stop(self, reason: str) -> None:
        """Ends the run after the current step: the epoch so far is recorded and checkpointed as a
        (shorter) epoch, validated if the run validates, and the run ends as it would after its
        last epoch. For handlers (a time budget, a user's "good enough"); the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.events.emit("message", message=f"stopping after step {self.steps_done}: {reason}")

    def fire(self, hook: str, *args: Any) -> None:
        """Calls ``hook`` on every handler, in the order they were attached."""
        for handler in self.handlers:
            getattr(handler, hook)(self, *args)

    def on_train_start(self) -> None:
        self.fire("on_train_start")
        # torch.compile is tried until one step has run through it; a network it cannot handle
        # trains uncompiled (with a warning) rather than not at all.
        self.compiling = self.cfg.train.compile
        self.compiled_step_ran = False
        self.net = self.parallel(compiled=self.compiling)
        self.t0 = time.perf_counter()

    def on_epoch_start(self) -> None:
        epoch = self.state.epoch
        seed = self.cfg.train.seed * 100_003 + epoch
        self.generator.manual_seed(seed)
        self.target_generator.manual_seed(seed + 7919)
        self.samples.epoch_seed = seed
        if self.target_samples is not None:
            self.target_samples.epoch_seed = seed + 7919
        # Dropout draws its own masks in each process: the same masks on every share of the batch
        # would correlate what should be independent noise.
        torch.manual_seed(seed + 1_000_003 * self.world.rank)
        self.set_phase(epoch)
        self.net.train()
        self.epoch_losses: list[float] = []
        self.step_in_epoch = 0
        self.fire("on_epoch_start")

    def set_phase(self, epoch: int) -> None:
        """Sets the encoder stages the strategy trains in ``epoch`` and says when that changes."""
        self.unfrozen = unfrozen_stages(
            self.strategy, epoch, self.n_stages, plateau_unfrozen=self.state.plateau_unfrozen
        )
        if not self.n_stages or self.unfrozen == self._applied_unfrozen:
            return
        set_trainable_stages(self.model, self.unfrozen)
        # DDP registers the parameters that need gradients when it wraps the network.
        self.net = self.parallel(compiled=self.compiling)
        if epoch > self.start_epoch or self.unfrozen < self.n_stages:
            self.events.emit("phase", name=_phase_name(self.unfrozen, self.n_stages))
        self._applied_unfrozen = self.unfrozen

    def train_step(self, batch: dict[str, Any], target_batch: dict[str, Any] | None) -> float:
        """One optimiser step on a batch (and for DANN a target batch); returns the task loss."""
        # Between steps: the last epoch's checkpoint is complete, and --resume continues from it.
        check_stop(f"epoch {self.state.epoch + 1}")
        parts = {"image": _tensor(batch["image"], self.device), "label": _tensor(batch["label"], self.device)}
        if target_batch is not None:
            parts["target"] = _tensor(target_batch["image"], self.device)
        if self.n_domains:
            parts["domain"] = batch["domain"]
        loss = self.forward_backward_with_fallbacks(parts)
        if not math.isfinite(loss):  # before the step: a NaN update ruins every weight
            raise RunFailure(
                f"training loss became {loss} at epoch {self.state.epoch + 1}, step {self.step_in_epoch + 1}; no "
                "package written. Lower optim.lr, or check the images for extreme values"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.epoch_losses.append(loss)
        self.step_in_epoch += 1
        self.steps_done += 1
        self.images += parts["image"].shape[0] * self.world.size
        self.fire("on_step_end", loss)
        return loss

    def forward_backward_with_fallbacks(self, parts: dict[str, torch.Tensor]) -> float:
        """:meth:`forward_backward`, tried again in smaller pieces after running out of memory and
        uncompiled when torch.compile cannot run the network."""
        while True:
            try:
                loss = self.forward_backward(parts)
                self.compiled_step_ran = self.compiled_step_ran or self.compiling
                return loss
            except torch.OutOfMemoryError as err:
                # Outside this handler the failed step's tensors are free to go.
                failure = str(err).splitlines()[0]
            except Exception as err:
                if not self.compiling or self.compiled_step_ran:
                    raise
                self.stop_compiling(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                continue
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.backoff.after_failure(self, failure)

    def stop_compiling(self, failure: str) -> None:
        # A compiled forward that ran before the failure may have moved BatchNorm's running
        # statistics once.
        self.events.emit(
            "warning",
            message=f"torch.compile could not run {self.cfg.model.name} ({failure[:300]}); training it uncompiled",
        )
        self.compiling = False
        self.optimizer.zero_grad(set_to_none=True)
        self.net = self.parallel(compiled=False)

    def forward_backward(self, parts: dict[str, torch.Tensor]) -> float:
        """Forward and backward of one batch, in micro-batches whose gradients add up to the whole
        batch's; returns the batch's task loss."""
        self.optimizer.zero_grad(set_to_none=True)
        state = self.state
        if state.train_patch != self.patch:
            parts = {k: v if k == "domain" else center_crop(v, state.train_patch) for k, v in parts.items()}
        for key in ("image", "target"):
            if key in parts:
                parts[key] = parts[key].contiguous(memory_format=self.layout)
        size, micro = parts["image"].shape[0], state.micro_batch
        self.loss_step.begin_attempt(self)
        task_total = 0.0
        for start in range(0, size, micro):
            part = parts if micro >= size else {k: v[start : start + micro] for k, v in parts.items()}
            share = part["image"].shape[0] / size
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                loss, task_loss = self.loss_step.loss(self.net, part)
            self.scaler.scale(loss * share if share != 1 else loss).backward()
            task_total += float(task_loss.detach()) * share
        return task_total

    def on_train_epoch_end(self) -> dict[str, Any]:
        """The epoch's record: its mean loss over every process, the schedule and the back-off."""
        state = self.state
        record: dict[str, Any] = {
            "epoch": state.epoch + 1,
            "loss": distributed.mean_over_ranks(float(np.mean(self.epoch_losses)), self.world),
            "lr": self.optimizer.param_groups[0]["lr"],
            "encoder_trainable": self.unfrozen > 0,
            "unfrozen_stages": self.unfrozen,
            "seconds": round(time.perf_counter() - self.t0, 2),
        }
        if state.micro_batch < self.local_batch:
            record["micro_batch"] = state.micro_batch
        if state.train_patch != self.patch:
            record["train_patch"] = state.train_patch
        if self.stop_reason:
            record["steps"] = self.step_in_epoch
            record["stopped"] = self.stop_reason
        self.fire("on_train_epoch_end", record)
        return record

    def validate(self, record: dict[str, Any]) -> None:
        """Scores the network (on rank 0, shared with every process) into ``record`` and the state."""
        self.model.eval()
        scores = distributed.broadcast(self.scorer(self.model) if self.world.is_main else None, self.world)
        record[self.val_key] = scores
        values = [v for v in scores.values() if not math.isnan(v)]
        score = float(np.mean(values)) if values else None
        record["val_score"] = score
        if score is None:
            # No class could be scored (e.g. every held-out case lacks them): no evidence either way.
            self.events.emit("warning", message=f"epoch {record['epoch']}: no validation score could be computed")
        self.state.record_score(score, epoch=record["epoch"])
        self.fire("on_validation_end", record)
        record.update(self.state.counters())

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        self.state.epoch += 1
        if self.checkpoints:
            self.save_checkpoint()
        self.fire("on_epoch_end", record)
        if self.checkpoints:
            # Last: a listener that stops the run here finds every file of the epoch written.
            self.events.emit("checkpoint", path=str(self.checkpoint_path), epoch=record["epoch"])

    def on_train_end(self) -> None:
        self.fire("on_train_end")
        self.model.eval()

    def save_checkpoint(self) -> None:
        """Writes ``checkpoint.pt`` (rank 0, atomically) and waits for every process."""
        if self.world.is_main:
            self.state.scaler = self.scaler.state_dict()
            with atomic_path(self.checkpoint_path) as tmp:
                torch.save(
                    {
                        **self.state.checkpoint(),
                        "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "adaptation": self.adaptation,
                        **({"adversary": self.adversary.state_dict()} if self.adversary is not None else {}),
                    },
                    tmp,
                )
        distributed.barrier(self.world)

    def load_checkpoint(self, resume: bool) -> None:
        """With ``resume``, continues from ``checkpoint.pt`` where one exists (every process reads
        it); otherwise removes a ``best.pt`` an earlier run in this folder left."""
        path = self.checkpoint_path
        found = distributed.broadcast(resume and path.is_file(), self.world)
        if found and not path.is_file():
            raise DataError(
                f"process {self.world.rank} cannot see {path}, which rank 0 resumes from: "
                "the run directory must be on storage that every node shares"
            )
        if not found:
            if self.best_path.exists() and self.world.is_main:
                self.best_path.unlink()
            return
        saved = torch.load(path, map_location=self.device, weights_only=True)
        if saved.get("adaptation", {"adversarial": False, "n_domains": 0}) != self.adaptation:
            raise DataError(
                f"{path} was trained with adaptation {saved.get('adaptation')}, this run asks for {self.adaptation}: "
                "resume with the run's own configuration and data, or start a new run directory"
            )
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.adversary is not None:
            self.adversary.load_state_dict(saved["adversary"])
        self.state = TrainState.from_checkpoint(saved, micro_batch=self.local_batch, train_patch=list(self.patch))
        if self.state.scaler:
            self.scaler.load_state_dict(self.state.scaler)
        self.events.emit("message", message=f"resuming from epoch {self.state.epoch} ({path})")


def _tensor(value: Any, device: torch.device) -> torch.Tensor:
    value = value.to(device, non_blocking=True)
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def _phase_name(unfrozen: int, n_stages: int) -> str:
    if unfrozen == 0:
        return "feature extraction (encoder frozen)"
    if unfrozen == n_stages:
        return "fine-tune (encoder unfrozen)"
    return f"fine-tune (top {unfrozen} of {n_stages} encoder stages unfrozen)"
