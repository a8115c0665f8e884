"""The training loop: AdamW, warm-up then cosine, MONAI losses, AMP on CUDA, atomic checkpoints,
resume, JSON-lines events.

Randomness is re-seeded at the start of every epoch from ``(seed, epoch)``, so a run resumed from
its last checkpoint continues exactly as the uninterrupted run would have (on the CPU).

Example:
    >>> import numpy as np
    >>> from medtl.config import RunConfig
    >>> cfg = RunConfig.from_dict({"model": {"name": "unet_resnet18", "pretrained": "none"},
    ...     "preprocessing": {"patch_size": [32, 32]}, "augmentation": "none",
    ...     "strategy": {"name": "full_finetune"},
    ...     "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2}})
    >>> items = [{"image": np.random.rand(1, 32, 32).astype("float32"),
    ...           "label": (np.random.rand(1, 32, 32) > 0.5).astype("int64")}]
    >>> import tempfile; result = fit(cfg, items, run_dir=tempfile.mkdtemp())
    >>> len(result.history)
    1
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import apply_transform
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from medtl import distributed
from medtl.adaptation.dann import DomainAdversary, ramp
from medtl.adaptation.dsbn import DomainBatchSampler, convert_to_dsbn, domain_layers, use_domain
from medtl.config import RunConfig
from medtl.data.io import atomic_path
from medtl.data.partial_labels import known_fraction
from medtl.data.presets import default_class_ratios, training_transform
from medtl.devices import cuda_problem, device_report, resolve_device  # noqa: F401 - re-exported for callers
from medtl.errors import ConfigError, DataError, MedTLError, RunFailure
from medtl.evaluate import dice_per_class  # noqa: F401  (the Dice every part of MedTL reports)
from medtl.events import EventSink
from medtl.infer import memory_format
from medtl.losses import class_weights, make_loss
from medtl.memory import available_memory, estimate_training_memory, gib, smaller_patch
from medtl.models.registry import MODELS, TransferNet, build_model
from medtl.stop import check_stop
from medtl.strategies import param_groups, set_trainable_stages, unfrozen_stages

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


def lr_factor(step: int, *, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class FitResult:
    model: TransferNet
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    best_epoch: int | None = None  # 1-based; the weights in ``model`` when ``keep_best`` applied
    stopped_early: bool = False


def fit(
    cfg: RunConfig,
    items: Sequence[dict[str, np.ndarray]],
    *,
    run_dir: str | Path,
    events: EventSink | None = None,
    resume: bool = False,
    model: TransferNet | None = None,
    label: str = "train",
    validate: Callable[[TransferNet], dict[str, float]] | None = None,
    n_domains: int = 0,
    target_items: Sequence[dict[str, np.ndarray]] | None = None,
) -> FitResult:
    """Trains a network on in-memory samples.

    Args:
        cfg: the run configuration (model, strategy, optimiser, schedule, loss, augmentation).
        items: dicts with ``image`` (C, *spatial) float32 in the preset's [0, 1] space and ``label``
            (1, *spatial) integer class indices.
        run_dir: where ``checkpoint.pt`` is written after every epoch (atomically).
        events: the JSON-lines sink for progress.
        resume: continue from ``run_dir/checkpoint.pt`` if present.
        model: start from this network (e.g. the last round's) instead of building one.
        label: names the run in progress events (e.g. ``"pretrained seed 1"``).
        validate: called with the network (in eval mode) after every epoch; its scores (for
            example Dice per class on held-out cases) go into the history and the epoch event,
            which is what live validation curves are drawn from.
        n_domains: domain-specific BatchNorm with this many domains; every item then carries its
            ``domain`` index, and each batch is drawn from one domain.
        target_items: unlabelled target-domain samples (``image``; a ``label`` of the right shape
            is carried through the augmentation and ignored) for adversarial training (DANN).
    """
    if not items:
        raise ValueError("no training samples")
    world = distributed.world()
    # Rank 0 reports, checkpoints and validates for every process of a torchrun run.
    events = (events or EventSink()) if world.is_main else EventSink()
    if world.size > 1 and target_items is not None:
        raise ConfigError(
            "adversarial training (adaptation.method 'dann') runs in one process: start it without torchrun"
        )
    local_batch = distributed.local_batch_size(cfg.train.batch_size, world)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device, events)
    if model is None:
        torch.manual_seed(cfg.train.seed)  # the new head/decoder's initialisation is part of the run
        model = build_model(cfg.model.name, num_classes=cfg.num_classes, pretrained=cfg.model.pretrained)
        report = getattr(model, "load_report", None)
        if report is not None and not resume:
            events.emit("message", message=f"initial weights from {cfg.model.pretrained}: {report.summary()}")
    if n_domains:
        if any("domain" not in item for item in items):
            raise ValueError("domain-specific BatchNorm needs a 'domain' index in every training sample")
        if not domain_layers(model):
            convert_to_dsbn(model, n_domains)
    model.to(device)
    if world.size > 1 and device.type == "cuda" and cfg.train.sync_batchnorm and not n_domains:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layout = memory_format(cfg.spatial_dims, device)
    model.to(memory_format=layout)

    groups = param_groups(model, cfg.strategy, lr=cfg.optim.lr)
    adversary = None
    if target_items is not None:
        if not target_items:
            raise ValueError("adversarial training needs target-domain images; none were given")
        example = torch.zeros(1, cfg.in_channels, *cfg.preprocessing.patch_size, device=device)
        adversary = DomainAdversary(model, example)
        groups.append({"name": "domain_classifier", "params": list(adversary.parameters()), "lr": cfg.optim.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)
    total_steps = cfg.train.epochs * cfg.train.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total_steps, warmup=cfg.optim.warmup_steps)
    )
    weights = None
    if cfg.loss == "ce_weighted":
        weights = class_weights(items, cfg.num_classes)
        events.emit(
            "message",
            message="class weights from the training labels: " + ", ".join(f"{w:.3g}" for w in weights.tolist()),
        )
        weights = weights.to(device)
    loss_fn = make_loss(
        cfg.loss, weights=weights, classification=cfg.is_classification, multi_label=cfg.data.multi_label
    )
    use_amp = cfg.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt_path = run_dir / CHECKPOINT
    best_path = run_dir / BEST
    found = distributed.broadcast(resume and ckpt_path.is_file(), world)
    if found and not ckpt_path.is_file():
        raise DataError(
            f"process {world.rank} cannot see {ckpt_path}, which rank 0 resumes from: "
            "the run directory must be on storage that every node shares"
        )
    if found:
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = state.get("adaptation", {"adversarial": False, "n_domains": 0})
        wanted = {"adversarial": adversary is not None, "n_domains": n_domains}
        if saved != wanted:
            raise DataError(
                f"{ckpt_path} was trained with adaptation {saved}, this run asks for {wanted}: "
                "resume with the run's own configuration and data, or start a new run directory"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if adversary is not None:
            adversary.load_state_dict(state["adversary"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        events.emit("message", message=f"resuming from epoch {start_epoch} ({ckpt_path})")
    elif best_path.exists() and world.is_main:
        best_path.unlink()  # a best checkpoint from an earlier run in this folder is not this run's

    val_key = "val_auroc" if cfg.is_classification else "val_dice"
    n_stages = len(model.encoder_stages())
    strategy = cfg.strategy
    plateau = strategy.name == "gradual_unfreezing" and strategy.unfreeze_on_plateau
    if plateau and validate is None:
        events.emit("warning", message="unfreezing on a plateau needs validation; unfreezing on the epoch schedule")
        plateau = False
        strategy = dataclasses.replace(strategy, unfreeze_on_plateau=False)
    if cfg.train.early_stopping_patience and validate is None:
        events.emit("warning", message="early stopping needs validation; training every epoch")
    last = history[-1] if history else {}
    best_score = max((h["val_score"] for h in history if h.get("val_score") is not None), default=None)
    best_epoch = last.get("best_epoch")
    stall = int(last.get("stall", 0))
    plateau_unfrozen = int(last.get("plateau_unfrozen", 0))
    stopped_early = bool(last.get("stopped_early", False))
    if stopped_early:
        events.emit("message", message=f"this run stopped early after epoch {last['epoch']}; nothing to resume")
    current = -1

    transform = training_transform(
        patch_size=cfg.preprocessing.patch_size,
        level=cfg.augmentation,
        spatial_dims=cfg.spatial_dims,
        classification=cfg.is_classification,
        class_ratios=None if cfg.is_classification else cfg.train.class_ratios or default_class_ratios(cfg.num_classes),
    )
    generator = torch.Generator()
    if n_domains:
        global_batches: Sampler = DomainBatchSampler(
            [int(item["domain"]) for item in items],
            batch_size=cfg.train.batch_size,
            n_batches=cfg.train.steps_per_epoch,
            generator=generator,
        )
    else:
        global_batches = _random_batches(len(items), cfg, generator, weights=_annotation_weights(items, cfg))
    samples = SampleSeeds(global_batches)
    workers = worker_count(cfg.train.num_workers, device, world)
    loader = _loader(items, transform, distributed.ShardedBatches(samples, world), device, workers)
    target_generator = torch.Generator()
    target_samples = None
    target_loader: Any = [None] * cfg.train.steps_per_epoch
    if adversary is not None:
        target_samples = SampleSeeds(_random_batches(len(target_items), cfg, target_generator))
        target_loader = _loader(target_items, transform, target_samples, device, workers)

    patch = list(cfg.preprocessing.patch_size)
    # A run that had to lower its micro-batch resumes with it (the same GPU would fail the same way).
    micro_batch = min(local_batch, int(last.get("micro_batch", local_batch)))
    train_patch = list(last.get("train_patch", patch))

    def step(net, x, y, xt, ids, weight: float, micro_batch: int, train_patch: list[int]) -> tuple[float, list[float]]:
        """Forward and backward of one batch, in micro-batches of ``micro_batch`` samples whose
        gradients add up to the whole batch's; returns the batch's task loss and, for adversarial
        training, the domain losses, with the domain classifier's hits counted in ``domain_hits``."""
        domain_losses: list[float] = []
        optimizer.zero_grad(set_to_none=True)
        if train_patch != patch:
            x, y, xt = (_center_crop(t, train_patch) for t in (x, y, xt))
        x = x.contiguous(memory_format=layout)
        if xt is not None:
            xt = xt.contiguous(memory_format=layout)
        task_total = 0.0
        for start in range(0, x.shape[0], micro_batch):
            xs, ys = x[start : start + micro_batch], y[start : start + micro_batch]
            share = xs.shape[0] / x.shape[0]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                if adversary is not None:
                    # Source and target in separate passes: BatchNorm normalises each batch with its
                    # own domain's statistics (one mixed batch would blur them and hurt the task),
                    # while the domain classifier sees the features of both. The target pass leaves
                    # the running statistics alone, so the package normalises as its task was trained.
                    xts = xt[start : start + micro_batch].to(xs.dtype)
                    with adversary.capturing():
                        logits = net(xs)
                        source_domain = adversary(weight)
                    with adversary.capturing(), _frozen_statistics(model):
                        net(xts)
                        target_domain = adversary(weight)
                    domain_logits = torch.cat([source_domain, target_domain]).float()
                    task_loss = loss_fn(logits, ys)
                    domain_target = torch.cat(
                        [
                            torch.zeros(xs.shape[0], dtype=torch.long),
                            torch.ones(xts.shape[0], dtype=torch.long),
                        ]
                    ).to(device)
                    domain_loss = torch.nn.functional.cross_entropy(domain_logits, domain_target)
                    loss = task_loss + domain_loss
                    domain_losses.append(float(domain_loss.detach()))
                    domain_hits[0] += int((domain_logits.argmax(1) == domain_target).sum())
                    domain_hits[1] += domain_target.numel()
                elif n_domains:
                    # One domain per batch (the sampler's rule): an int avoids a device sync per layer.
                    part = ids[start : start + micro_batch]
                    with use_domain(model, int(part[0]) if bool((part == part[0]).all()) else part.to(device)):
                        loss = task_loss = loss_fn(net(xs), ys)
                else:
                    loss = task_loss = loss_fn(net(xs), ys)
            scaler.scale(loss * share if share != 1 else loss).backward()
            task_total += float(task_loss.detach()) * share
        return task_total, domain_losses

    events.emit(
        "start",
        run_dir=str(run_dir),
        total_steps=total_steps,
        device=str(device),
        label=label,
        processes=world.size,
        workers=workers,
    )
    micro_batch = _memory_check(model, cfg, device, world, local_batch, micro_batch, use_amp, events)
    # torch.compile is tried until one step has run through it; a network it cannot handle trains
    # uncompiled (with a warning) rather than not at all. (A compiled forward that ran before the
    # failure may have moved BatchNorm's running statistics once.)
    compiling = cfg.train.compile
    compiled_step_ran = False
    net = _parallel(model, world, device, find_unused=bool(n_domains), compiled=compiling)
    t0 = time.perf_counter()
    steps_done = 0
    images = 0
    for epoch in range(start_epoch, cfg.train.epochs):
        if stopped_early:
            break
        seed = cfg.train.seed * 100_003 + epoch
        generator.manual_seed(seed)
        target_generator.manual_seed(seed + 7919)
        samples.epoch_seed = seed
        if target_samples is not None:
            target_samples.epoch_seed = seed + 7919
        # Dropout draws its own masks in each process: the same masks on every share of the batch
        # would correlate what should be independent noise.
        torch.manual_seed(seed + 1_000_003 * world.rank)
        unfrozen = unfrozen_stages(strategy, epoch, n_stages, plateau_unfrozen=plateau_unfrozen)
        if n_stages and unfrozen != current:
            set_trainable_stages(model, unfrozen)
            # DDP registers the parameters that need gradients when it wraps the network.
            net = _parallel(model, world, device, find_unused=bool(n_domains), compiled=compiling)
            if epoch > start_epoch or unfrozen < n_stages:
                events.emit("phase", name=_phase_name(unfrozen, n_stages))
            current = unfrozen
        net.train()
        losses = []
        domain_losses: list[float] = []
        domain_hits = [0, 0]  # the domain classifier's correct answers, answers
        for batch, target_batch in zip(loader, target_loader, strict=True):
            # Between steps: the last epoch's checkpoint is complete, and --resume continues from it.
            check_stop(f"epoch {epoch + 1}")
            x = _tensor(batch["image"], device)
            y = _tensor(batch["label"], device)
            xt = _tensor(target_batch["image"], device) if adversary is not None else None
            weight = 0.0
            if adversary is not None:
                progress = (epoch * cfg.train.steps_per_epoch + len(losses)) / max(1, total_steps)
                weight = cfg.adaptation.dann_weight * ramp(progress, cfg.adaptation.dann_gamma)

            while True:
                try:
                    task_loss_value, step_domain_losses = step(
                        net, x, y, xt, batch.get("domain"), weight, micro_batch, train_patch
                    )
                    domain_losses += step_domain_losses
                    compiled_step_ran = compiled_step_ran or compiling
                    break
                except torch.OutOfMemoryError as err:
                    # Outside this handler the failed step's tensors are free to go.
                    failure = str(err).splitlines()[0]
                except Exception as err:
                    if not compiling or compiled_step_ran:
                        raise
                    failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    events.emit(
                        "warning",
                        message=f"torch.compile could not run {cfg.model.name} ({failure[:300]}); "
                        "training it uncompiled",
                    )
                    compiling = False
                    optimizer.zero_grad(set_to_none=True)
                    net = _parallel(model, world, device, find_unused=bool(n_domains), compiled=False)
                    continue
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                micro_batch, train_patch = _after_out_of_memory(
                    failure, cfg, world, micro_batch, train_patch, events, epoch=epoch + 1
                )
            if not math.isfinite(task_loss_value):  # before the step: a NaN update ruins every weight
                raise RunFailure(
                    f"training loss became {task_loss_value} at epoch {epoch + 1}, step {len(losses) + 1}; no "
                    "package written. Lower optim.lr, or check the images for extreme values"
                )
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(task_loss_value)
            steps_done += 1
            images += x.shape[0] * world.size
            global_step = epoch * cfg.train.steps_per_epoch + len(losses)
            elapsed = time.perf_counter() - t0
            eta = elapsed / steps_done * (total_steps - global_step)
            events.emit(
                "step",
                epoch=epoch + 1,
                epochs=cfg.train.epochs,
                step=global_step,
                total_steps=total_steps,
                loss=losses[-1],
                eta_s=round(eta, 1),
                label=label,
            )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": distributed.mean_over_ranks(float(np.mean(losses)), world),
            "lr": optimizer.param_groups[0]["lr"],
            "encoder_trainable": unfrozen > 0,
            "unfrozen_stages": unfrozen,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if micro_batch < local_batch:
            record["micro_batch"] = micro_batch
        if train_patch != patch:
            record["train_patch"] = train_patch
        if adversary is not None:
            record.update(
                domain_loss=float(np.mean(domain_losses)),
                domain_accuracy=domain_hits[0] / max(1, domain_hits[1]),
                dann_weight=weight,
            )
        improved = False
        if validate is not None:
            model.eval()
            record[val_key] = distributed.broadcast(validate(model) if world.is_main else None, world)
            values = [v for v in record[val_key].values() if not math.isnan(v)]
            score = float(np.mean(values)) if values else None
            record["val_score"] = score
            improved = score is not None and (best_score is None or score > best_score)
            if improved:
                best_score, best_epoch, stall = score, epoch + 1, 0
            elif score is not None:
                stall += 1
            else:
                # No class could be scored (e.g. every held-out case lacks them): no evidence either way.
                events.emit("warning", message=f"epoch {epoch + 1}: no validation score could be computed")
            if plateau and stall >= cfg.strategy.plateau_patience and plateau_unfrozen < n_stages:
                plateau_unfrozen += 1
                stall = 0  # the newly unfrozen stage gets its own chance before anything stops
            patience = cfg.train.early_stopping_patience
            if patience and stall >= patience and epoch + 1 < cfg.train.epochs:
                stopped_early = True
                events.emit(
                    "message",
                    message=f"early stop after epoch {epoch + 1}: no better validation score for {stall} epoch(s)",
                )
            record.update(best_epoch=best_epoch, stall=stall, plateau_unfrozen=plateau_unfrozen)
            record["stopped_early"] = stopped_early
        history.append(record)
        if world.is_main:
            with atomic_path(ckpt_path) as tmp:
                torch.save(
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "history": history,
                        "adaptation": {"adversarial": adversary is not None, "n_domains": n_domains},
                        **({"adversary": adversary.state_dict()} if adversary is not None else {}),
                    },
                    tmp,
                )
        distributed.barrier(world)
        elapsed = time.perf_counter() - t0
        events.emit(
            "epoch",
            epoch=epoch + 1,
            epochs=cfg.train.epochs,
            step=(epoch + 1) * cfg.train.steps_per_epoch,
            total_steps=total_steps,
            loss=record["loss"],
            lr=record["lr"],
            eta_s=round(elapsed / max(1, steps_done) * (total_steps - (epoch + 1) * cfg.train.steps_per_epoch), 1),
            label=label,
            **({val_key: record[val_key]} if val_key in record else {}),
        )
        if validate is not None and improved and world.is_main:
            # After the checkpoint, and tagged with its epoch: a crash in between leaves a best file
            # that the history does not point at, which the load below refuses.
            with atomic_path(best_path) as tmp:
                torch.save({"epoch": epoch + 1, "model": model.state_dict()}, tmp)
        events.emit("checkpoint", path=str(ckpt_path), epoch=epoch + 1)
    if adversary is not None:
        adversary.remove()
    final_epoch = history[-1]["epoch"] if history else 0
    kept_epoch = None
    if cfg.train.keep_best and best_epoch is not None and world.is_main:
        if best_epoch == final_epoch:
            kept_epoch = best_epoch
        else:
            best = torch.load(best_path, map_location=device, weights_only=True) if best_path.is_file() else {}
            if best.get("epoch") == best_epoch:
                model.load_state_dict(best["model"])
                kept_epoch = best_epoch
                events.emit(
                    "message",
                    message=f"keeping epoch {best_epoch}'s weights (best validation score {best_score:.4f}), "
                    f"not epoch {final_epoch}'s",
                )
            else:
                events.emit(
                    "warning", message=f"{best_path} does not hold epoch {best_epoch}; keeping the last epoch's weights"
                )
    seconds = time.perf_counter() - t0
    model.eval()
    return FitResult(
        model=model,
        history=history,
        seconds=seconds,
        images_per_s=images / seconds if seconds else 0.0,
        best_epoch=kept_epoch,
        stopped_early=stopped_early,
    )


@contextlib.contextmanager
def _frozen_statistics(model: torch.nn.Module):
    """BatchNorm still normalises with the batch's statistics but does not update its running ones
    (momentum 0)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum


def _tensor(value: Any, device: torch.device) -> torch.Tensor:
    value = value.to(device, non_blocking=True)
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def _phase_name(unfrozen: int, n_stages: int) -> str:
    if unfrozen == 0:
        return "feature extraction (encoder frozen)"
    if unfrozen == n_stages:
        return "fine-tune (encoder unfrozen)"
    return f"fine-tune (top {unfrozen} of {n_stages} encoder stages unfrozen)"


def summarize(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "values": arr.tolist()}


class SampleSeeds(Sampler[list[tuple[int, int]]]):
    """Tags every drawn index with a seed for its augmentation, from the epoch's seed and the
    sample's place in the epoch: a sample is augmented the same whichever process or DataLoader
    worker loads it, so one process, N torchrun processes and any number of workers train on the
    same batches (and a resumed run continues exactly)."""

    def __init__(self, batches: Sampler[list[int]]) -> None:
        self.batches = batches
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self):
        position = 0
        for batch in self.batches:
            keys = []
            for index in batch:
                keys.append((int(index), (self.epoch_seed * 1_000_003 + position) % 2**32))
                position += 1
            yield keys


class _SeededSamples(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[dict[str, Any]], transform) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        self.transform.set_random_state(seed=seed)
        # Training needs the pixels, not MONAI's metadata: without it the same pixels come 1.7x as
        # fast with `standard` augmentation (the benchmark's data-path section) and 6x with none.
        with _without_metadata():
            return apply_transform(self.transform, dict(self.items[index]))


@contextlib.contextmanager
def _without_metadata():
    tracking = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(tracking)


def _random_batches(
    n_items: int, cfg: RunConfig, generator: torch.Generator, weights: Sequence[float] | None = None
) -> Sampler[list[int]]:
    """``steps_per_epoch`` global batches of indices drawn with replacement (in proportion to
    ``weights`` when given)."""
    n_samples = cfg.train.steps_per_epoch * cfg.train.batch_size
    if weights is not None:
        draws: Sampler[int] = WeightedRandomSampler(weights, n_samples, replacement=True, generator=generator)
    else:
        draws = RandomSampler(range(n_items), replacement=True, num_samples=n_samples, generator=generator)
    return BatchSampler(draws, cfg.train.batch_size, drop_last=True)


def _annotation_weights(items: Sequence[dict[str, Any]], cfg: RunConfig) -> list[float] | None:
    """2D slices drawn in proportion to their annotated voxels when some are partly unknown (a
    slice crossed by a plane painted in another view holds one annotated line); None (uniform)
    when every slice is fully annotated."""
    if cfg.is_classification or cfg.spatial_dims != 2:
        return None
    fractions = [known_fraction(item["label"]) for item in items]
    return fractions if min(fractions) < 1.0 else None


def worker_count(requested: int | None, device: torch.device, world: distributed.World) -> int:
    """DataLoader workers: as configured, else none on the CPU (they would compete with the
    network for the cores) and up to 4 per process on a GPU, leaving a core to each process."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores // world.size - 1))


def _loader(items, transform, batches: Sampler, device: torch.device, workers: int) -> DataLoader:
    return DataLoader(
        _SeededSamples(items, transform),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def _parallel(
    model: TransferNet, world: distributed.World, device: torch.device, *, find_unused: bool, compiled: bool
) -> torch.nn.Module:
    """What the training step calls: the network, wrapped in DistributedDataParallel under
    torchrun (gradients averaged across processes during the backward pass) and compiled when
    ``train.compile`` asks for it."""
    net: torch.nn.Module = model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model,
            device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,
            # Domain-specific BatchNorm leaves the other domains' layers without gradients.
            find_unused_parameters=find_unused,
        )
    if compiled:
        net = torch.compile(net)
    return net


def _memory_check(
    model: TransferNet,
    cfg: RunConfig,
    device: torch.device,
    world: distributed.World,
    local_batch: int,
    micro_batch: int,
    amp: bool,
    events: EventSink,
) -> int:
    """Says what the run is expected to need before it starts, and on a GPU that cannot hold the
    batch starts with micro-batches that fit (gradients accumulated: the same batch)."""
    patch = cfg.preprocessing.patch_size
    try:
        estimate = estimate_training_memory(model, (cfg.in_channels, *patch), batch_size=micro_batch, amp=amp)
    except (RuntimeError, NotImplementedError) as err:  # an operation without a shape-only kernel
        events.emit("warning", message=f"could not estimate the training memory: {err}")
        return micro_batch
    free = available_memory(device)
    where = "GPU memory free" if device.type == "cuda" else "memory available"
    per = " per process" if world.size > 1 else ""
    events.emit(
        "message",
        message=f"estimated training memory {gib(estimate.total)}{per} (batch {micro_batch}, patch "
        f"{'x'.join(map(str, patch))}, {'mixed' if amp else 'full'} precision); {where}: {gib(free)}",
        memory_estimate_bytes=estimate.total,
        memory_available_bytes=free,
    )
    if free is None or estimate.total <= free:
        return micro_batch
    fits = estimate.largest_batch(free)
    if device.type == "cuda" and world.size == 1 and 1 <= fits < micro_batch:
        events.emit(
            "warning",
            message=f"a batch of {micro_batch} is estimated not to fit into {gib(free)}: training in micro-batches of "
            f"{fits} with gradients accumulated over the batch of {local_batch}",
        )
        return fits
    events.emit(
        "warning",
        message=f"the estimate ({gib(estimate.total)}) exceeds the {where} ({gib(free)}): lower train.batch_size or "
        "preprocessing.patch_size if the run fails",
    )
    return micro_batch


def _after_out_of_memory(
    failure: str,
    cfg: RunConfig,
    world: distributed.World,
    micro_batch: int,
    train_patch: list[int],
    events: EventSink,
    *,
    epoch: int,
) -> tuple[int, list[int]]:
    """The next thing to try after running out of memory in a training step: half the micro-batch
    (the gradients still add up to the configured batch), and at one sample a smaller training
    patch; raises when neither is left."""
    if world.size > 1:
        # The other processes are already waiting in the gradient exchange of this step.
        raise MedTLError(
            f"out of memory in process {world.rank} ({failure}): lower train.batch_size or preprocessing.patch_size"
        )
    if micro_batch > 1:
        smaller = micro_batch // 2
        events.emit(
            "warning",
            message=f"out of memory at epoch {epoch} with {micro_batch} samples at once; going on with micro-batches "
            f"of {smaller} (gradients accumulated over the batch of {cfg.train.batch_size}). ({failure})",
        )
        return smaller, train_patch
    spec = MODELS[cfg.model.name]
    patch = None if cfg.is_classification else smaller_patch(train_patch, divisor=spec.divisor, min_size=spec.min_size)
    if patch is None:
        raise MedTLError(
            f"out of memory with one sample of {'x'.join(map(str, train_patch))} voxels ({failure}): "
            "choose a smaller network or preprocessing.patch_size, or free the GPU"
        )
    events.emit(
        "warning",
        message=f"out of memory at epoch {epoch} with one sample of {'x'.join(map(str, train_patch))}; going on with "
        f"training patches of {'x'.join(map(str, patch))} (prediction keeps its window). ({failure})",
    )
    return micro_batch, patch


def _center_crop(tensor: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor | None:
    """The central ``size`` of the spatial axes of a (N, C, *spatial) batch (the augmentation
    already placed the patch at random)."""
    if tensor is None:
        return None
    spatial = tensor.shape[2:]
    index = [slice(None), slice(None)]
    for have, want in zip(spatial, size, strict=True):
        start = max(0, (have - want) // 2)
        index.append(slice(start, start + want))
    return tensor[tuple(index)]
