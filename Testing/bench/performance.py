"""What MedTL's own code costs on top of the network's arithmetic (issue 7's first benchmarks).

Each figure is a ratio against a reference measured in the same run, on the same network, data
and batch (this machine is shared and noisy; absolute times alone mean little):

- training: ``medtl.train.fit`` (its MONAI data pipeline, events, schedule) against a bare loop
  (forward, loss, backward, step on ready-made batches) and against MONAI's ``SupervisedTrainer``
  (what MONAI Label trains with) on a DataLoader of the same ready-made batches;
- inference: ``predict_slices`` (a 2D network over every axial slice) against the raw batched
  forward, and ``predict_sliding_window`` against raw ``monai.inferers.sliding_window_inference``;
- the MRML bridge: a 512 x 512 x 300 label map into a segmentation node and back, against the
  same array into a plain labelmap volume node and back (the least MRML can do).

Every section runs in its own process so that its peak RSS is its own. Timings take the best of
``--repeats`` runs after a warm-up.

    python Testing/bench/performance.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # demo_ct_scene, shared with interactive.py
for sub in ("MedTLTraining", "MedTLExtension"):
    sys.path.insert(0, str(REPO / sub))
RESULTS = HERE / "results"


def _best(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function, the functions taking turns in every repeat after a warm-up:
    a slow spell of this shared machine then hits all of them, not whichever ran at the time
    (run one after the other, the first version of this benchmark showed a 7 % 2D prediction
    overhead that interleaved runs put at zero)."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, lazy imports
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(values) for name, values in times.items()}


def _steady_state(short_s: float, long_s: float, short: int, long: int, batch: int) -> dict:
    """Images per second from two run lengths (the extra images over the extra seconds), and
    the seconds a run costs besides its steps (the intercept)."""
    per_step = (long_s - short_s) / (long - short)
    return {"images_per_s": round(batch / per_step, 2), "seconds_besides_steps": round(short_s - short * per_step, 2)}


def training(quick: bool, repeats: int) -> dict:
    """Steady-state throughput of each trainer from two run lengths (the extra images over the
    extra seconds), and what a run costs besides its steps (the intercept): a 12-step run would
    otherwise charge MedTL's once-per-run work (memory estimate, checkpoint) to every image."""
    import numpy as np
    import torch
    from medtl.config import RunConfig
    from medtl.data.slices import slice_items
    from medtl.events import EventSink
    from medtl.infer import memory_format
    from medtl.models.registry import build_model
    from medtl.train import fit
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    torch.set_num_threads(os.cpu_count() or 1)
    size, batch, short, long = (64, 4, 3, 9) if quick else (128, 8, 8, 32)
    rng = np.random.default_rng(0)
    volume = rng.random((24, size, size), dtype=np.float32)
    labels = (volume > 0.6).astype(np.int64)
    items = slice_items(volume, labels, slices=range(24))

    def config(steps: int) -> RunConfig:
        return RunConfig.from_dict(
            {
                "model": {"name": "unet_mobilenet_v2", "pretrained": "none"},
                "preprocessing": {"patch_size": [size, size]},
                "strategy": {"name": "full_finetune", "encoder_lr_factor": 1.0},
                "train": {"epochs": 1, "steps_per_epoch": steps, "batch_size": batch, "device": "cpu", "amp": False},
                "augmentation": "none",
                "optim": {"warmup_steps": 0},
            }
        )

    # The same samples as ready-made batches for the bare loop and MONAI's trainer, in the tensor
    # layout medtl trains in (channels-last on the CPU): the ratios are then MedTL's overhead, and
    # the layout's own gain is measured in the data_path section. MedTL loads its batches through
    # its data pipeline (crop, collation) inside the measurement; the references do not.
    layout = memory_format(2, "cpu")
    batches = [
        (
            torch.from_numpy(np.stack([items[(s * batch + i) % len(items)]["image"] for i in range(batch)])).contiguous(
                memory_format=layout
            ),
            torch.from_numpy(np.stack([items[(s * batch + i) % len(items)]["label"] for i in range(batch)])),
        )
        for s in range(long)
    ]

    def network():
        torch.manual_seed(0)
        return build_model("unet_mobilenet_v2", num_classes=2).train().to(memory_format=layout)

    def bare(steps: int):
        def run():
            model = network()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
            for x, y in batches[:steps]:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()

        return run

    run_dir = Path(tempfile.mkdtemp(prefix="medtl-bench-fit-"))

    def medtl(steps: int):
        cfg = config(steps)

        # A new run directory each time: fit would otherwise resume nothing but read its checkpoint.
        def run():
            fit(cfg, items, run_dir=run_dir / str(time.perf_counter_ns()), events=EventSink(), model=network())

        return run

    def monai_trainer(steps: int):
        def run():
            model = network()
            data = [{"image": x, "label": y} for x, y in batches[:steps]]
            trainer = SupervisedTrainer(
                device=torch.device("cpu"),
                max_epochs=1,
                train_data_loader=torch.utils.data.DataLoader(data, batch_size=None),
                network=model,
                optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
            )
            trainer.run()

        return run

    trainers = {"bare_loop": bare, "medtl_fit": medtl, "monai_supervised_trainer": monai_trainer}
    # A difference of two times is noisier than either: two more repeats than the other sections
    # (in one run the slope put MONAI's trainer 10 % above the bare loop it wraps; side by side
    # at one length the two are level).
    runs = {f"{name}@{n}": make(n) for name, make in trainers.items() for n in (short, long)}
    best = _best(runs, repeats + 2)
    out = {"network": "unet_mobilenet_v2", "patch": [size, size], "batch": batch, "steps": [short, long]}
    for name in trainers:
        out[name] = _steady_state(best[f"{name}@{short}"], best[f"{name}@{long}"], short, long, batch)
    out["medtl_vs_bare"] = round(out["medtl_fit"]["images_per_s"] / out["bare_loop"]["images_per_s"], 3)
    out["medtl_vs_monai"] = round(out["medtl_fit"]["images_per_s"] / out["monai_supervised_trainer"]["images_per_s"], 3)
    return out


def inference(quick: bool, repeats: int) -> dict:
    import numpy as np
    import torch
    from medtl.infer import memory_format, predict_slices, predict_sliding_window
    from medtl.models.registry import build_model
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    # The raw references run in the layout medtl predicts in (see training()).
    layout2d, layout3d = memory_format(2, "cpu"), memory_format(3, "cpu")
    net2d = build_model("unet_mobilenet_v2", num_classes=3).eval().to(memory_format=layout2d)
    n, size = (16, 128) if quick else (48, 256)
    volume = np.random.default_rng(0).random((n, size, size), dtype=np.float32)

    def raw_2d():
        with torch.inference_mode():
            for start in range(0, n, 16):
                net2d(torch.from_numpy(volume[start : start + 16, None]).contiguous(memory_format=layout2d))

    def medtl_2d():
        predict_slices(net2d, volume)

    net3d = build_model("unet3d", num_classes=3).eval().to(memory_format=layout3d)
    cube, roi = (48, (32, 32, 32)) if quick else (96, (64, 64, 64))
    volume3d = np.random.default_rng(1).random((cube, cube, cube), dtype=np.float32)

    def raw_3d():
        with torch.inference_mode():
            sliding_window_inference(
                torch.from_numpy(volume3d[None, None]),
                roi,
                2,
                lambda window: net3d(window.contiguous(memory_format=layout3d)),
                overlap=0.25,
                mode="gaussian",
            )

    def medtl_3d():
        predict_sliding_window(net3d, volume3d, roi_size=roi)

    out = {"slices": [n, size, size], "volume_3d": [cube] * 3, "roi": list(roi)}
    # A few seconds each: more repeats than the default, or one slow spell decides the ratio.
    repeats = max(repeats, 6)
    best = _best({"raw_forward_2d": raw_2d, "medtl_predict_slices": medtl_2d}, repeats)
    best |= _best({"raw_sliding_window_3d": raw_3d, "medtl_predict_sliding_window": medtl_3d}, repeats)
    out |= {name: round(seconds, 3) for name, seconds in best.items()}
    out["overhead_2d"] = round(out["medtl_predict_slices"] / out["raw_forward_2d"] - 1, 3)
    out["overhead_3d"] = round(out["medtl_predict_sliding_window"] / out["raw_sliding_window_3d"] - 1, 3)
    return out


def mrml_bridge(quick: bool, repeats: int) -> dict:
    import numpy as np
    import slicer.util
    from MedTLExtensionLib import mrml_bridge as bridge
    from MedTLExtensionLib.headless_scene import create_headless_scene

    shape = (60, 256, 256) if quick else (300, 512, 512)
    labels = np.zeros(shape, np.uint8)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    labels[np.broadcast_to(((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (shape[1] / 4) ** 2, shape)] = 1
    labels[((y - shape[1] / 3) ** 2 + (x - shape[2] / 3) ** 2 + (z - shape[0] / 2) ** 2) < (shape[1] / 10) ** 2] = 2
    matrix = np.diag([0.8, 0.8, 1.5, 1.0])
    h = create_headless_scene()
    reference = bridge.array_to_volume(h.scene, labels.astype(np.int16), matrix, "ct")
    segments = [(1, "liver", (0.9, 0.5, 0.4)), (2, "tumour", (0.5, 0.9, 0.5))]

    def plain():
        node = h.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.util.updateVolumeFromArray(node, labels)
        back = slicer.util.arrayFromVolume(node).copy()
        h.scene.RemoveNode(node)
        return back

    def segmentation():
        node = bridge.labelmap_to_segmentation(
            h.scene, h.segmentations_logic, labels, matrix, segments, reference_volume=reference
        )
        back, _ = bridge.segmentation_to_labelmap(h.scene, h.segmentations_logic, node, reference)
        assert np.array_equal(back, labels)
        h.scene.RemoveNode(node)

    out = {"shape": list(shape)}
    best = _best({"plain_labelmap_round_trip": plain, "segmentation_round_trip": segmentation}, repeats)
    out |= {name: round(seconds, 3) for name, seconds in best.items()}
    out["ratio"] = round(out["segmentation_round_trip"] / out["plain_labelmap_round_trip"], 2)
    return out


def semi_automatic_loop(quick: bool, repeats: int) -> dict:
    """One learn-and-predict round as the Slicer module runs it (headless slicer-core, the real
    engine in child processes), split into its stages by the engine's own time-stamped events.

    A round takes minutes, so it runs once (``repeats`` does not apply); the stages are shares of
    that round. The defaults of the module's *Learn* button (20 epochs of 20 steps, batch 8,
    ImageNet MobileNetV2 U-Net) are what a user waits for.
    """
    from demo_ct_scene import demo_ct_scene, unpainted_dice
    from medtl.models.weights import seed_offline_weights
    from MedTLExtensionLib.engine_process import start_engine
    from MedTLExtensionLib.slice_learning import LearningOptions, SliceLearner

    os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="medtl-bench-hub-"))
    seed_offline_weights()
    n = 64 if quick else 128
    scene = demo_ct_scene(n)
    h, volume, user, painted_slices = scene.headless, scene.volume, scene.painted_segmentation, scene.painted_slices
    launches: list[float] = []

    def engine(args):
        launches.append(time.time())
        return start_engine(args)

    learner = SliceLearner(
        h.scene, h.segmentations_logic, work_root=tempfile.mkdtemp(prefix="medtl-bench-loop-"), engine_factory=engine
    )
    imported: list[tuple[float, float]] = []
    import_results = learner._import_results

    def timed_import(job):
        t = time.time()
        node = import_results(job)
        imported.append((t, time.time()))
        return node

    learner._import_results = timed_import
    options = LearningOptions(device="cpu", **({"epochs": 2, "steps_per_epoch": 4} if quick else {}))
    events: list[dict] = []
    t0 = time.time()
    learner.start_learning(volume, user, options)
    while learner.is_running:
        events += learner.poll()
        time.sleep(0.01)
    t_end = time.time()
    # The engine's events carry its own clock (time.time(), the same machine).
    starts = [e for e in events if e["event"] == "start"]
    train_start = next(e["time"] for e in starts if e.get("label") != "predict")
    predict_start = next(e["time"] for e in starts if e.get("label") == "predict")
    checkpoints = [e["time"] for e in events if e["event"] == "checkpoint"]
    done = [e["time"] for e in events if e["event"] == "done"]
    stages = {
        "export": launches[0] - t0,
        "start_up": train_start - launches[0],  # interpreter, torch and MONAI imports, data, network
        "training": checkpoints[-1] - train_start,
        "package_and_report": done[0] - checkpoints[-1],
        "load_package": predict_start - done[0],
        "inference": done[1] - predict_start,  # with reading the image and writing the labels
        "engine_exit": imported[0][0] - done[1],  # the process ends, the module's timer notices
        "import": imported[0][1] - imported[0][0],
    }
    total = t_end - t0
    stages["other"] = total - sum(stages.values())
    dice = unpainted_dice(scene, learner.result_segmentation)
    return {
        "volume": [n] * 3,
        "painted_slices": len(painted_slices),
        "epochs": options.epochs,
        "steps_per_epoch": options.steps_per_epoch,
        "batch": options.batch_size,
        "total_s": round(total, 2),
        "stages_s": {name: round(v, 2) for name, v in stages.items()},
        "dice_unpainted": round(float(dice), 3),
        # The engine ran as this process's child: the largest finished child's peak.
        "engine_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def data_path(quick: bool, repeats: int) -> dict:
    """What the fast-data-path options buy on this machine: the preprocessed-data cache against
    preprocessing every run, DataLoader workers against none, channels-last against the default
    layout (training step and prediction)."""
    import copy

    import numpy as np
    import SimpleITK as sitk
    import torch
    from medtl.config import RunConfig
    from medtl.data.dataset import Case
    from medtl.data.slices import slice_items
    from medtl.events import EventSink
    from medtl.models.registry import build_model
    from medtl.pipeline import load_case_arrays
    from medtl.train import fit

    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(tempfile.mkdtemp(prefix="medtl-bench-data-"))
    shape = (40, 256, 256) if quick else (200, 512, 512)
    rng = np.random.default_rng(0)
    cases = []
    for index in range(2 if quick else 3):
        z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
        organ = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (shape[1] / 4) ** 2
        ct = np.where(organ, 60, -100).astype(np.int16) + rng.normal(0, 20, shape).astype(np.int16)
        image = sitk.GetImageFromArray(ct)
        image.SetSpacing((0.8, 0.8, 2.0))
        labels = sitk.GetImageFromArray(np.broadcast_to(organ, shape).astype(np.uint8))
        labels.CopyInformation(image)
        sitk.WriteImage(image, str(folder / f"ct{index}.nii.gz"))
        sitk.WriteImage(labels, str(folder / f"ct{index}_label.nii.gz"))
        cases.append(Case(row=index + 2, image=folder / f"ct{index}.nii.gz", label=folder / f"ct{index}_label.nii.gz"))
    plain = RunConfig.from_dict({"preprocessing": {"preset": "ct_abdomen", "spacing": [2.0, 1.0, 1.0]}})
    cached = copy.deepcopy(plain)
    cached.data.cache_dir = str(folder / "cache")
    for case in cases:
        load_case_arrays(case, cached)  # fills the cache

    def load(cfg):
        return lambda: [load_case_arrays(case, cfg) for case in cases]

    out: dict = {"cases": len(cases), "shape": list(shape)}
    best = _best({"preprocess_every_run": load(plain), "cache_hit": load(cached)}, repeats)
    out |= {name: round(seconds, 3) for name, seconds in best.items()}
    out["cache_speed_up"] = round(best["preprocess_every_run"] / best["cache_hit"], 1)

    size, batch = (64, 4) if quick else (128, 8)
    volume = rng.random((24, size, size), dtype=np.float32)
    items = slice_items(volume, (volume > 0.6).astype(np.uint8), slices=range(24))

    def training(workers: int, steps: int):
        cfg = RunConfig.from_dict(
            {
                "model": {"name": "unet_mobilenet_v2", "pretrained": "none"},
                "preprocessing": {"patch_size": [size, size]},
                "strategy": {"name": "full_finetune"},
                "augmentation": "standard",
                "train": {"epochs": 1, "steps_per_epoch": steps, "batch_size": batch, "device": "cpu"},
                "optim": {"warmup_steps": 0},
            }
        )
        cfg.train.num_workers = workers
        root = Path(tempfile.mkdtemp(prefix="medtl-bench-workers-"))
        return lambda: fit(cfg, items, run_dir=root / str(time.perf_counter_ns()), events=EventSink())

    # Two run lengths, as in training(): steady-state images per second apart from the workers' start.
    short, long = (2, 6) if quick else (4, 16)
    best = _best({f"workers_{w}@{n}": training(w, n) for w in (0, 2) for n in (short, long)}, repeats)
    rates = {}
    for w in (0, 2):
        rate = _steady_state(best[f"workers_{w}@{short}"], best[f"workers_{w}@{long}"], short, long, batch)
        rates[f"workers_{w}"] = rate["images_per_s"]
        rates[f"workers_{w}_seconds_besides_steps"] = rate["seconds_besides_steps"]
    out["training_standard_augmentation"] = rates
    out["workers_2_vs_0"] = round(rates["workers_2"] / rates["workers_0"], 3)

    # MONAI's metadata (MetaTensor) on the training transforms, which medtl.train switches off.
    from medtl.data.presets import training_transform
    from monai.data import set_track_meta
    from monai.transforms import apply_transform

    augment = training_transform(patch_size=[size, size], level="standard", spatial_dims=2)

    def transforms(metadata: bool):
        def run():
            set_track_meta(metadata)
            try:
                for index in range(4 * len(items)):
                    augment.set_random_state(seed=index)
                    apply_transform(augment, dict(items[index % len(items)]))
            finally:
                set_track_meta(True)

        return run

    best = _best({"with_metadata": transforms(True), "without_metadata": transforms(False)}, repeats)
    out["augmentation_ms_per_sample"] = {name: round(1e3 * s / (4 * len(items)), 2) for name, s in best.items()}
    out["augmentation_without_metadata_speed_up"] = round(best["with_metadata"] / best["without_metadata"], 2)

    torch.manual_seed(0)
    net = build_model("unet_mobilenet_v2", num_classes=2).train()
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x = torch.rand(batch, 1, size, size)

    def step(model, layout):
        def run():
            model.zero_grad(set_to_none=True)
            model(x.contiguous(memory_format=layout)).mean().backward()

        return run

    best = _best(
        {"default": step(net, torch.contiguous_format), "channels_last": step(net_cl, torch.channels_last)}, repeats
    )
    out["training_step_channels_last_speed_up"] = round(best["default"] / best["channels_last"], 2)
    net.eval()
    net_cl.eval()
    slices = torch.rand(16, 1, 2 * size, 2 * size)

    def forward(model, layout):
        def run():
            with torch.inference_mode():
                model(slices.contiguous(memory_format=layout))

        return run

    best = _best(
        {"default": forward(net, torch.contiguous_format), "channels_last": forward(net_cl, torch.channels_last)},
        repeats,
    )
    out["prediction_channels_last_speed_up"] = round(best["default"] / best["channels_last"], 2)
    return out


SECTIONS = {
    "training": training,
    "inference": inference,
    "mrml_bridge": mrml_bridge,
    "semi_automatic_loop": semi_automatic_loop,
    "data_path": data_path,
}


def _section(name: str, quick: bool, repeats: int) -> dict:
    # A spawned process starts its own children by spawning too, and DataLoader workers started
    # that way import torch and MONAI again (12 s a run here): measure with the start method that
    # `medtl train` gets, this platform's default.
    multiprocessing.set_start_method(None, force=True)
    result = SECTIONS[name](quick, repeats)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _table(results: dict) -> str:
    t, i, m = results["training"], results["inference"], results["mrml_bridge"]
    rows = [
        "| what | MedTL | reference | ratio | peak RSS |",
        "|---|---|---|---|---|",
        f"| training {t['network']}, {t['patch'][0]}² patches, batch {t['batch']} (steady state) | "
        f"{t['medtl_fit']['images_per_s']} img/s | bare loop {t['bare_loop']['images_per_s']} img/s; MONAI "
        f"SupervisedTrainer {t['monai_supervised_trainer']['images_per_s']} img/s | {t['medtl_vs_bare']} of bare; "
        f"{t['medtl_vs_monai']} of MONAI | {t['peak_rss_mb']} MB |",
        f"| the same, seconds per run besides its steps | {t['medtl_fit']['seconds_besides_steps']} s | bare loop "
        f"{t['bare_loop']['seconds_besides_steps']} s; MONAI {t['monai_supervised_trainer']['seconds_besides_steps']} s"
        " | | |",
        f"| 2D prediction, {i['slices'][0]} slices of {i['slices'][1]}² | {i['medtl_predict_slices']} s | "
        f"raw forward {i['raw_forward_2d']} s | overhead {i['overhead_2d']:+.1%} | {i['peak_rss_mb']} MB |",
        f"| 3D sliding window, {i['volume_3d'][0]}³, ROI {i['roi'][0]}³ | {i['medtl_predict_sliding_window']} s | "
        f"raw sliding_window_inference {i['raw_sliding_window_3d']} s | overhead {i['overhead_3d']:+.1%} | (same) |",
        f"| MRML bridge, {'×'.join(map(str, reversed(m['shape'])))} label map → segmentation → back | "
        f"{m['segmentation_round_trip']} s | plain labelmap node {m['plain_labelmap_round_trip']} s | "
        f"{m['ratio']}× | {m['peak_rss_mb']} MB |",
    ]
    loop = results.get("semi_automatic_loop")
    if loop:
        stages = loop["stages_s"]
        rows += [
            "",
            f"Semi-automatic loop, {loop['volume'][0]}³ volume, {loop['painted_slices']} painted slices, "
            f"{loop['epochs']} epochs × {loop['steps_per_epoch']} steps of batch {loop['batch']}: "
            f"{loop['total_s']} s from *Learn* to the prediction in the scene (Dice {loop['dice_unpainted']} on "
            f"the unpainted slices). Peak RSS: the module's process {loop['peak_rss_mb']} MB, the engine's "
            f"{loop['engine_peak_rss_mb']} MB.",
            "",
            "| stage | seconds | share |",
            "|---|---|---|",
            *(f"| {name.replace('_', ' ')} | {v} | {v / loop['total_s']:.0%} |" for name, v in stages.items()),
        ]
    data = results.get("data_path")
    if data:
        rows += [
            "",
            "| fast data path (CPU) | with | without | ratio |",
            "|---|---|---|---|",
            f"| preprocessed-data cache, {data['cases']} CTs of {'×'.join(map(str, reversed(data['shape'])))} "
            f"(nii.gz, resampled) | {data['cache_hit']} s | {data['preprocess_every_run']} s | "
            f"{data['cache_speed_up']}× as fast |",
            f"| 2 DataLoader workers, `standard` augmentation (steady state; the workers' start "
            f"{data['training_standard_augmentation']['workers_2_seconds_besides_steps']} s per run against "
            f"{data['training_standard_augmentation']['workers_0_seconds_besides_steps']} s) | "
            f"{data['training_standard_augmentation']['workers_2']} img/s | "
            f"{data['training_standard_augmentation']['workers_0']} img/s | {data['workers_2_vs_0']} |",
            f"| `standard` augmentation without MONAI's metadata, per sample | "
            f"{data['augmentation_ms_per_sample']['without_metadata']} ms | "
            f"{data['augmentation_ms_per_sample']['with_metadata']} ms | "
            f"{data['augmentation_without_metadata_speed_up']}× as fast |",
            f"| channels-last, training step | | | {data['training_step_channels_last_speed_up']}× as fast |",
            f"| channels-last, 2D prediction | | | {data['prediction_channels_last_speed_up']}× as fast |",
        ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, figures not meaningful")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "quick": args.quick,
    }
    for name in SECTIONS:
        # A fresh process per section: its peak RSS is its own, and an error comes back here.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results[name] = pool.submit(_section, name, args.quick, args.repeats).result()
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    table = _table(results)
    print(table)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "performance.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        header = f"Measured {results['date']} on {results['machine']} (best of {args.repeats} after a warm-up).\n\n"
        (RESULTS / "performance.md").write_text(header + table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
