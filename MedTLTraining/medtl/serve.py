"""The warm engine: ``medtl serve``, one process for a whole Slicer session.

It reads requests as JSON lines on stdin and answers with the events of :mod:`medtl.events` on
stdout, and keeps between rounds what a one-shot ``medtl train`` would load again: torch and
MONAI, the network being taught, the preprocessed volume. A second round starts training in a
fraction of a second and continues from the last round's weights.

Requests come as JSON lines on stdin, or as files in a folder (``--requests DIR``: what the Slicer
module uses, since CTKAppLauncher does not hand its stdin to the Python it starts); each is one
JSON object, ``"request"`` names it:

- ``learn``: ``id``, ``config`` (a run configuration file, as ``medtl train`` reads; its
  ``output_dir`` is the round's folder), ``image``, ``label`` (255 = unknown), ``out`` (the
  prediction, on the image's grid), optional ``uncertainty`` (normalised entropy), ``budget_s``
  (seconds of training; 0 or absent: the configured epochs), ``preview_every_s`` (0: none),
  ``view`` (``{"axis": a, "index": i}``: the slice of the image's array to preview). Events: a
  ``plan``, ``start``, ``step``/``epoch``, ``preview`` (``axis``, ``index``, ``path`` of a .npy
  with that slice's labels), then ``done`` (``round``, ``labels``, ``uncertainty``,
  ``package``, ``steps``, ``train_s``, ``stopped``), or ``cancelled``, or ``error`` (the engine
  stays up; the next round starts from the last good network).
- ``view``: ``axis``, ``index``: the slice the user looks at now (previews follow it).
- ``good_enough``: stop training now and predict with the current weights.
- ``cancel``: stop training now; nothing is predicted.
- ``shutdown``: exit (as does the end of stdin, and ``--idle-exit-s`` without a request).

A round trains on the slices the label file annotates; slices whose labels changed since the last
round on the same image (the user's corrections) are drawn :data:`CORRECTION_EMPHASIS` times as
often. The network is kept only while the structures (``data.label_names``) and the network stay
the same.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import SimpleITK as sitk
import torch

from medtl.case_data import check_label_values
from medtl.config import RunConfig
from medtl.data.checks import read_checked_image, read_checked_label
from medtl.data.geometry import SLICE_AXES, canonical_slice, label_on_image_grid, slice_on_input_grid
from medtl.data.io import array_like, write_image
from medtl.data.partial_labels import UNKNOWN
from medtl.data.slices import slice_items
from medtl.devices import resolve_device
from medtl.errors import DataError, MedTLError
from medtl.events import EventSink
from medtl.infer import normalised_entropy, predict_slices
from medtl.package import preprocess, save_package, segment_with_network, working_image
from medtl.planner import RoundPlan, budgeted, plan_run, replan
from medtl.stop import Cancelled
from medtl.training import Trainer
from medtl.training.interactive import LivePreview, LossPlateau, StopSignal, TimeBudget
from medtl.training.setup import new_network

CORRECTION_EMPHASIS = 3.0
"""How much more often a slice the user corrected since the last round is drawn for training."""

DEFAULT_IDLE_EXIT_S = 1800.0
# A budgeted round also stops when the loss has not fallen for this many steps.
LOSS_PATIENCE_STEPS = 60


class LockedSink(EventSink):
    """An event sink two threads may write to (the request reader reports bad requests)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            return super().emit(event, **fields)


class Control:
    """What the request reader tells the round in progress: the slice in view and a stop."""

    def __init__(self) -> None:
        self.view: tuple[int, int] | None = None
        self.stop: str | None = None  # "good enough" or "cancelled"

    def stop_reason(self) -> str | None:
        return self.stop


@dataclass
class _Image:
    """An image as the network sees it: read, reoriented and preprocessed once per file version."""

    key: tuple
    image: sitk.Image
    grid: sitk.Image
    volume: np.ndarray
    labels: np.ndarray | None = None  # the last round's labels on ``grid``, to find corrections


@dataclass
class WarmSession:
    """The state kept between rounds: the network, what it knows, the image and the step time."""

    events: EventSink
    control: Control = field(default_factory=Control)
    model: torch.nn.Module | None = None
    known: tuple | None = None  # (network name, label names) the model was taught
    image: _Image | None = None
    seconds_per_step: float | None = None
    predict_s: float = 0.0
    optimizer_state: dict | None = None  # AdamW's moments after the last round, for the next
    plans: dict = field(default_factory=dict)  # the first round's plan per network and configuration
    rounds: int = 0

    def learn(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """One round: train, predict, package; returns the ``done`` fields (None when cancelled)."""
        started = time.perf_counter()
        self.control.stop = None
        if "view" in request:
            self.control.view = (int(request["view"]["axis"]), int(request["view"]["index"]))
        cfg = RunConfig.load(_required(request, "config"))
        device = resolve_device(cfg.train.device, self.events)
        image = self.load_image(Path(_required(request, "image")), cfg)
        labels = self.load_labels(Path(_required(request, "label")), image, cfg)
        items = self.samples(image, labels, cfg)
        model = self.starting_model(cfg, device)
        budget = float(request.get("budget_s") or 0)
        plan = self.plan(cfg, items, model, device, budget, image)
        round_cfg = budgeted(cfg, plan.steps) if budget else cfg
        round_cfg = replace(round_cfg, preprocessing=replace(round_cfg.preprocessing, patch_size=plan.patch_size))
        trainer = Trainer(
            round_cfg,
            items,
            run_dir=cfg.output_dir,
            events=self.events,
            model=model,
            label="learn",
            handlers=self.round_handlers(request, budget, image, round_cfg, Path(request["out"]).parent),
            checkpoints=False,  # a round ends in a model package and is never resumed
            optimizer_state=self.optimizer_state if model is self.model else None,
        )
        state = trainer.run_training()
        train_s = time.perf_counter() - trainer.t0
        self.model, self.known = trainer.model, (cfg.model.name, tuple(cfg.data.label_names))
        self.optimizer_state = trainer.optimizer.state_dict()
        image.labels = labels
        if trainer.steps_done:
            self.seconds_per_step = train_s / trainer.steps_done
        if self.control.stop == "cancelled":
            return None
        self.rounds += 1
        outputs = self.write_outputs(request, image, round_cfg, device)
        history = state.history
        return {
            "round": request.get("id"),
            **outputs,
            "steps": trainer.steps_done,
            "train_s": round(train_s, 2),
            "seconds": round(time.perf_counter() - started, 2),
            "final_loss": history[-1]["loss"] if history else None,
            "stopped": trainer.stop_reason,
            "planned": plan.event_fields(),
        }

    def plan(
        self,
        cfg: RunConfig,
        items: list[dict],
        model: torch.nn.Module,
        device: torch.device,
        budget: float,
        image: _Image,
    ) -> RoundPlan:
        """The round's plan: probed in the first round of a network and configuration, then the
        same plan with the step and prediction times the last round measured."""
        key = (cfg.model.name, cfg.train.batch_size, tuple(cfg.preprocessing.patch_size), str(device))
        last = self.plans.get(key)
        if last is not None and self.seconds_per_step:
            plan = replan(last, seconds_per_step=self.seconds_per_step, predict_s=self.predict_s, budget_s=budget)
            self.events.emit("plan", **plan.event_fields())
        else:
            plan = plan_run(
                cfg,
                items,
                model,
                device=device,
                predict_slices=image.volume.shape[SLICE_AXES[cfg.preprocessing.slice_axis]],
                budget_s=budget or None,
                events=self.events,
            )
        self.plans[key] = plan
        return plan

    def load_image(self, path: Path, cfg: RunConfig) -> _Image:
        """The image, from memory when the file and the preprocessing are those of the last round."""
        stat = path.stat() if path.is_file() else None
        if stat is None:
            raise DataError(f"image {path}: no such file")
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, json.dumps(cfg.to_dict()["preprocessing"]))
        if self.image is not None and self.image.key == key:
            return self.image
        image = read_checked_image(path, row=None, policy=cfg.preprocessing.nan_policy)
        grid = working_image(image, cfg)
        self.image = _Image(key=key, image=image, grid=grid, volume=preprocess(image, cfg, grid=grid))
        return self.image

    def load_labels(self, path: Path, image: _Image, cfg: RunConfig) -> np.ndarray:
        """The label file on the image's working grid; 255 = unknown."""
        label = label_on_image_grid(
            image.image,
            read_checked_label(path, row=None),
            where=f"label {path.name} of image {Path(image.key[0]).name}",
            resample=cfg.data.resample_labels,
            unknown=UNKNOWN,
        )
        labels = sitk.GetArrayFromImage(working_image(label, cfg, labels=True))
        known = check_label_values(labels, cfg, where=f"label {path.name}")
        if not known.size:
            raise DataError(f"label {path.name}: every voxel is {UNKNOWN} (unknown): paint a few slices first")
        return labels.astype(np.uint8)

    def samples(self, image: _Image, labels: np.ndarray, cfg: RunConfig) -> list[dict]:
        """The annotated slices along the run's slice axis; corrected ones emphasised."""
        if cfg.spatial_dims != 2:
            raise MedTLError(
                "the warm engine learns 2D segmentation networks from painted slices (task segmentation_2d)"
            )
        axis = SLICE_AXES[cfg.preprocessing.slice_axis]
        items = slice_items(
            np.moveaxis(image.volume, axis, 0), np.moveaxis(labels, axis, 0), context=cfg.preprocessing.context_slices
        )
        before = image.labels
        if before is not None and before.shape == labels.shape:
            for item in items:
                old = np.moveaxis(before, axis, 0)[item["slice"]]
                if not np.array_equal(old, item["label"][0]):
                    item["emphasis"] = CORRECTION_EMPHASIS
        return items

    def starting_model(self, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
        """The last round's network while it knows these structures, else a new one as configured."""
        if self.model is not None and self.known == (cfg.model.name, tuple(cfg.data.label_names)):
            return self.model
        model = new_network(cfg, self.events)
        self.image = None if self.image is None else replace(self.image, labels=None)
        self.optimizer_state = None
        return model.to(device)

    def round_handlers(self, request: dict, budget: float, image: _Image, cfg: RunConfig, folder: Path) -> list:
        handlers: list = [StopSignal(self.control.stop_reason)]
        if budget:
            handlers += [TimeBudget(budget), LossPlateau(patience=LOSS_PATIENCE_STEPS)]
        every = float(request.get("preview_every_s", 3.0) or 0)
        if every > 0:
            preview = Preview(self, image, cfg, folder / "preview.npy")
            handlers.append(LivePreview(preview, every_s=every, first_s=min(every, 1.5)))
        return handlers

    def write_outputs(self, request: dict, image: _Image, cfg: RunConfig, device: torch.device) -> dict[str, str]:
        """The prediction (and uncertainty) on the image's grid, and the round's model package."""
        t0 = time.perf_counter()
        labels, probs = segment_with_network(
            cfg, self.model, image.image, device=device, grid=image.grid, volume=image.volume
        )
        self.predict_s = time.perf_counter() - t0
        # Hand-off files the module reads at once and removes: not worth compressing.
        out = Path(_required(request, "out"))
        write_image(labels, out, compress=False)
        outputs = {"labels": str(out)}
        if request.get("uncertainty"):
            write_image(array_like(normalised_entropy(probs), image.image), request["uncertainty"], compress=False)
            outputs["uncertainty"] = str(request["uncertainty"])
        # A package every round: a crashed engine's successor, and Apply, start from it.
        package = save_package(Path(cfg.output_dir) / "model", self.model, cfg, metrics={"rounds": self.rounds})
        outputs["package"] = str(package)
        return outputs


class Preview:
    """Predicts the slice in view with the network being trained and hands it to the module: a
    .npy of that slice's labels (on the image's own array) and a ``preview`` event."""

    def __init__(self, session: WarmSession, image: _Image, cfg: RunConfig, path: Path) -> None:
        self.session, self.image, self.cfg, self.path = session, image, cfg, path
        self.refused: tuple[int, int] | None = None

    def __call__(self, trainer) -> None:
        view = self.session.control.view
        if view is None:
            return
        axis, index = view
        canonical_axis, canonical_index = canonical_slice(self.image.image, axis, index)
        slice_axis = SLICE_AXES[self.cfg.preprocessing.slice_axis]
        if canonical_axis != slice_axis or self.cfg.preprocessing.spacing is not None:
            if self.refused != view:  # said once per view, not every few seconds
                self.session.events.emit(
                    "message",
                    message=f"no preview of that view: the network learns {self.cfg.preprocessing.slice_axis} slices",
                )
                self.refused = view
            return
        t0 = time.perf_counter()
        labels = self.predict(trainer, canonical_index).astype(np.uint8)
        plane = slice_on_input_grid(labels, slice_axis, canonical_index, self.image.grid, self.image.image)
        _save_npy_atomically(self.path, plane)
        self.session.events.emit(
            "preview",
            axis=axis,
            index=index,
            path=str(self.path),
            step=trainer.steps_done,
            loss=trainer.epoch_losses[-1] if trainer.epoch_losses else None,
            seconds=round(time.perf_counter() - t0, 3),
        )

    def predict(self, trainer, index: int) -> np.ndarray:
        """The labels of one slice (canonical index along the slice axis), in eval mode."""
        context = self.cfg.preprocessing.context_slices
        moved = np.moveaxis(self.image.volume, SLICE_AXES[self.cfg.preprocessing.slice_axis], 0)
        low = max(0, index - context)
        block = moved[low : index + context + 1]
        model = trainer.model
        try:
            probs = predict_slices(model, block, context_slices=context, device=trainer.device, divisor=_divisor(model))
        finally:
            model.train()  # the trainer's mode (frozen stages stay in eval: see TransferNet.train)
        return probs[:, index - low].argmax(0)


def _divisor(model: torch.nn.Module) -> int:
    return getattr(getattr(model, "spec", None), "divisor", 32)


def _save_npy_atomically(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        np.save(out, array)
    os.replace(tmp, path)  # the module reads the old preview or the new one, never half of one


def _required(request: dict, key: str) -> Any:
    if not request.get(key):
        raise DataError(f"request '{request.get('request')}': field '{key}' is missing")
    return request[key]


def folder_lines(folder: Path, *, poll_s: float = 0.05) -> Iterator[str]:
    """The requests written into ``folder`` as files (each a whole request, named in the order they
    were sent, removed once read); ends when the folder is removed (the module has gone)."""
    while folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            try:
                text = path.read_text(encoding="utf-8")
                path.unlink()
            except OSError:
                continue
            yield from text.splitlines()
        time.sleep(poll_s)


def read_requests(lines: Iterable[str], control: Control, jobs: queue.Queue, events: EventSink) -> None:
    """The reader thread: view, stop and cancel take effect at once (the round checks them between
    steps); learn and shutdown wait in ``jobs``; the end of the requests is a shutdown."""
    for line in lines:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            kind = request["request"]
        except (ValueError, KeyError, TypeError):
            events.emit("error", message=f"not a request: {line.strip()[:200]}")
            continue
        if kind == "view":
            control.view = (int(request["axis"]), int(request["index"]))
        elif kind in ("good_enough", "cancel"):
            control.stop = "good enough" if kind == "good_enough" else "cancelled"
        elif kind in ("learn", "shutdown"):
            jobs.put(request)
        else:
            events.emit("error", message=f"unknown request '{kind}'")
    jobs.put({"request": "shutdown"})


def serve(requests: Iterable[str], stdout: IO[str], *, idle_exit_s: float = DEFAULT_IDLE_EXIT_S) -> int:
    """Answers ``requests`` (lines: stdin, or :func:`folder_lines`) until ``shutdown``, their end or
    ``idle_exit_s`` without one."""
    events = LockedSink(stream=stdout)
    session = WarmSession(events)
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=read_requests, args=(requests, session.control, jobs, events), daemon=True).start()
    events.emit("ready", pid=os.getpid(), torch=torch.__version__)
    while True:
        try:
            request = jobs.get(timeout=idle_exit_s)
        except queue.Empty:
            events.emit("message", message=f"no request for {idle_exit_s:g} s: the warm engine exits")
            return 0
        if request["request"] == "shutdown":
            return 0
        run_round(session, request)


def run_round(session: WarmSession, request: dict[str, Any]) -> None:
    """One ``learn`` request; a failure is reported and the engine stays up for the next."""
    events = session.events
    try:
        done = session.learn(request)
    except Cancelled:
        raise  # the stop file asks the process to end (Slicer's kill path), not the round
    except MedTLError as err:
        events.emit("error", round=request.get("id"), message=str(err))
        return
    except Exception as err:  # a bug must not take the session down with it; the network may be half-updated
        events.emit("error", round=request.get("id"), message=f"{type(err).__name__}: {err}")
        session.model = session.known = session.optimizer_state = None
        return
    if done is None:
        events.emit("cancelled", round=request.get("id"), message="the round was cancelled; nothing predicted")
    else:
        events.emit("done", **done)
