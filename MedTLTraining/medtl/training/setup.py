"""What a :class:`~medtl.training.trainer.Trainer` is built from: the network on its device, the
optimiser and schedule, the loss step, mixed precision and the data loaders.

Kept apart from the loop so that the trainer reads as the run does; a variant that builds one part
differently overrides one method here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl import distributed
from medtl.adaptation.dann import DomainAdversary
from medtl.adaptation.dsbn import DomainBatchSampler, convert_to_dsbn, domain_layers
from medtl.config import RunConfig
from medtl.data.presets import default_class_ratios, training_transform
from medtl.devices import resolve_device
from medtl.errors import ConfigError
from medtl.events import EventSink
from medtl.infer import memory_format
from medtl.losses import WEIGHTED as WEIGHTED_LOSSES
from medtl.losses import class_weights, make_loss
from medtl.models.registry import build_model
from medtl.strategies import param_groups
from medtl.training.data import SampleSeeds, annotation_weights, make_loader, random_batches, worker_count
from medtl.training.domains import AdversarialLoss, DomainBatchNormLoss, TaskLoss


def lr_factor(step: int, *, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Each parameter group's own learning rate times :func:`lr_factor`, stepped once per step.

    Not MONAI's ``WarmupCosineSchedule``: its first step trains at learning rate 0 (the ramp starts
    at ``0 / warmup``; a start fraction would end the ramp below 1), and past ``total`` its cosine
    rises again where this one stays at 0.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total=total, warmup=warmup))


def new_network(cfg: RunConfig, events: EventSink, *, announce: bool = True) -> torch.nn.Module:
    """The configured network with its initial weights (``model.pretrained``), a new head and
    decoder seeded by ``train.seed``; with ``announce``, a message says where the weights came from."""
    torch.manual_seed(cfg.train.seed)  # the new head/decoder's initialisation is part of the run
    model = build_model(cfg.model.name, num_classes=cfg.num_classes, pretrained=cfg.model.pretrained)
    report = getattr(model, "load_report", None)
    if report is not None and announce:
        events.emit("message", message=f"initial weights from {cfg.model.pretrained}: {report.summary()}")
    return model


class Setup:
    """Builds the parts of a training run; the arguments are the trainer's."""

    def __init__(
        self,
        cfg: RunConfig,
        items: Sequence[dict[str, np.ndarray]],
        *,
        run_dir: str | Path,
        events: EventSink | None,
        resume: bool,
        model: torch.nn.Module | None,
        n_domains: int,
        target_items: Sequence[dict[str, np.ndarray]] | None,
    ) -> None:
        if not items:
            raise ValueError("no training samples")
        self.cfg = cfg
        self.world = distributed.world()
        # Rank 0 reports, checkpoints and validates for every process of a torchrun run.
        self.events = (events or EventSink()) if self.world.is_main else EventSink()
        if self.world.size > 1 and target_items is not None:
            raise ConfigError(
                "adversarial training (adaptation.method 'dann') runs in one process: start it without torchrun"
            )
        self.local_batch = distributed.local_batch_size(cfg.train.batch_size, self.world)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.train.device, self.events)
        self.n_domains = n_domains
        self.patch = list(cfg.preprocessing.patch_size)
        self.total_steps = cfg.train.epochs * cfg.train.steps_per_epoch
        self.val_key = "val_auroc" if cfg.is_classification else "val_dice"
        self.model = self.build_model(model, items, announce=not resume)
        self.n_stages = len(self.model.encoder_stages())
        self.strategy = cfg.strategy
        self.plateau = self.strategy.name == "gradual_unfreezing" and self.strategy.unfreeze_on_plateau
        self.build_optimiser(target_items)
        self.adaptation = {"adversarial": self.adversary is not None, "n_domains": n_domains}
        self.build_loss(items)
        self.build_loaders(items, target_items)

    def build_model(self, model: torch.nn.Module | None, items: Sequence[dict], *, announce: bool) -> torch.nn.Module:
        """The given network or a new one, with domain-specific BatchNorm when asked, on the device."""
        cfg = self.cfg
        if model is None:
            model = new_network(cfg, self.events, announce=announce)
        if self.n_domains:
            if any("domain" not in item for item in items):
                raise ValueError("domain-specific BatchNorm needs a 'domain' index in every training sample")
            if not domain_layers(model):
                convert_to_dsbn(model, self.n_domains)
        model.to(self.device)
        if self.world.size > 1 and self.device.type == "cuda" and cfg.train.sync_batchnorm and not self.n_domains:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.layout = memory_format(cfg.spatial_dims, self.device)
        return model.to(memory_format=self.layout)

    def build_optimiser(self, target_items: Sequence[dict] | None) -> None:
        """AdamW over the strategy's parameter groups (and the domain classifier's), warm-up then cosine."""
        cfg = self.cfg
        groups = param_groups(self.model, cfg.strategy, lr=cfg.optim.lr)
        self.adversary: DomainAdversary | None = None
        if target_items is not None:
            if not target_items:
                raise ValueError("adversarial training needs target-domain images; none were given")
            example = torch.zeros(1, cfg.in_channels, *cfg.preprocessing.patch_size, device=self.device)
            self.adversary = DomainAdversary(self.model, example)
            groups.append(
                {"name": "domain_classifier", "params": list(self.adversary.parameters()), "lr": cfg.optim.lr}
            )
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, total=self.total_steps, warmup=cfg.optim.warmup_steps)

    def build_loss(self, items: Sequence[dict]) -> None:
        """The loss (class weights from the labels for a weighted loss), the loss step that applies
        it, and mixed precision on CUDA (bfloat16 where supported, else float16 with a scaler)."""
        cfg = self.cfg
        weights = None
        if cfg.loss in WEIGHTED_LOSSES:
            weights = class_weights(items, cfg.num_classes)
            self.events.emit(
                "message",
                message="class weights from the training labels: " + ", ".join(f"{w:.3g}" for w in weights.tolist()),
            )
            weights = weights.to(self.device)
        loss_fn = make_loss(
            cfg.loss, weights=weights, classification=cfg.is_classification, multi_label=cfg.data.multi_label
        )
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.loss_step: TaskLoss
        if self.adversary is not None:
            adaptation = cfg.adaptation
            self.loss_step = AdversarialLoss(
                loss_fn,
                adversary=self.adversary,
                model=self.model,
                device=self.device,
                weight=adaptation.dann_weight,
                gamma=adaptation.dann_gamma,
            )
        elif self.n_domains:
            self.loss_step = DomainBatchNormLoss(loss_fn, model=self.model, device=self.device)
        else:
            self.loss_step = TaskLoss(loss_fn)

    def build_loaders(self, items: Sequence[dict], target_items: Sequence[dict] | None) -> None:
        """The training batches (one domain per batch with DSBN; partly annotated slices drawn in
        proportion to their annotation), sharded among the processes, and the target batches for DANN."""
        cfg = self.cfg
        transform = training_transform(
            patch_size=cfg.preprocessing.patch_size,
            level=cfg.augmentation,
            spatial_dims=cfg.spatial_dims,
            classification=cfg.is_classification,
            class_ratios=None
            if cfg.is_classification
            else cfg.train.class_ratios or default_class_ratios(cfg.num_classes),
        )
        self.generator = torch.Generator()
        if self.n_domains:
            batches: torch.utils.data.Sampler = DomainBatchSampler(
                [int(item["domain"]) for item in items],
                batch_size=cfg.train.batch_size,
                n_batches=cfg.train.steps_per_epoch,
                generator=self.generator,
            )
        else:
            batches = random_batches(len(items), cfg, self.generator, weights=annotation_weights(items, cfg))
        self.samples = SampleSeeds(batches)
        self.workers = worker_count(cfg.train.num_workers, self.device, self.world)
        sharded = distributed.ShardedBatches(self.samples, self.world)
        self.loader = make_loader(items, transform, sharded, self.device, self.workers)
        self.target_generator = torch.Generator()
        self.target_samples: SampleSeeds | None = None
        self.target_loader: Any = [None] * cfg.train.steps_per_epoch
        if self.adversary is not None and target_items is not None:
            self.target_samples = SampleSeeds(random_batches(len(target_items), cfg, self.target_generator))
            self.target_loader = make_loader(target_items, transform, self.target_samples, self.device, self.workers)

    def parallel(self, *, compiled: bool) -> torch.nn.Module:
        """What the training step calls: the network, wrapped in DistributedDataParallel under
        torchrun (gradients averaged across processes during the backward pass) and compiled when
        ``train.compile`` asks for it."""
        net: torch.nn.Module = self.model
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                self.model,
                device_ids=[torch.cuda.current_device()] if self.device.type == "cuda" else None,
                # Domain-specific BatchNorm leaves the other domains' layers without gradients.
                find_unused_parameters=bool(self.n_domains),
            )
        if compiled:
            net = torch.compile(net)
        return net
