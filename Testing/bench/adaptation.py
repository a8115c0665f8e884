"""The domain-adaptation study: how much of the Dice lost to another scanner each method recovers.

Source domain: the demo CT (LiTS case 117, liver and tumour). Target domains: the same CT seen
through scanner differences, each built from MONAI transforms in Hounsfield units (seeded):

    calibration   HU' = 1.15 · HU + 80                    (ScaleIntensity, ShiftIntensity)
    noise         Gaussian noise, sd 40 HU               (RandGaussianNoise: a low-dose scan)
    blur          Gaussian blur, sd 1.5 voxels in-plane  (GaussianSmooth: a softer kernel / coarser resolution)
    bias_field    smooth multiplicative field on attenuation, HU + 1024 (RandBiasField, coefficients 0.3)
    gamma         contrast gamma 1.5 over the volume's range (AdjustContrast)
    combined      all of the above, in that order

A 2D U-Net on ImageNet MobileNetV2 (``full_finetune``) learns from K = 8 labelled axial liver
slices. Dice (liver + tumour as one foreground) is measured on the target's other liver slices for

    none      the source model as it is
    adabn     the source model, BatchNorm statistics re-estimated on the whole unlabelled target volume
    dsbn      one BatchNorm per domain, trained on the 8 source slices and 2 labelled target slices
    joint     the control for dsbn: the same 8 + 2 slices, ordinary BatchNorm
    dann      the 8 source slices and every target slice unlabelled, adversarially
    ceiling   a model trained on the 8 target slices themselves (the same slice positions)

Recovered share = (method − none) / (ceiling − none), where the gap is at least 0.02 Dice.
Every training run has the same budget. Writes ``adaptation.json``, ``adaptation.md`` and a plot.
This is a benchmark: it prints figures, it asserts nothing. On 2 CPU cores it takes about 30
minutes; ``--quick`` is a smoke run.

    python Testing/bench/adaptation.py --out Testing/bench/results
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from medtl.adaptation.adapt_package import statistics_pass
from medtl.adaptation.batchnorm import adapt_batchnorm
from medtl.adaptation.dsbn import use_domain
from medtl.config import RunConfig
from medtl.data.io import atomic_write_text
from medtl.data.lits_demo import LABEL_NAMES, load_demo_case
from medtl.data.slices import slice_items, spread_slices
from medtl.events import EventSink
from medtl.infer import predict_slices
from medtl.models.weights import seed_offline_weights
from medtl.package import preprocess
from medtl.train import dice_per_class, fit, summarize

METHODS = ["none", "adabn", "dsbn", "joint", "dann", "ceiling"]
ADAPTIVE = ["adabn", "dsbn", "joint", "dann"]
MIN_GAP = 0.02


def shift(name: str, hu: np.ndarray, seed: int = 0) -> np.ndarray:
    """The target domain ``name`` of a (z, y, x) volume in HU."""
    from monai.transforms import (
        AdjustContrast,
        GaussianSmooth,
        RandBiasField,
        RandGaussianNoise,
        ScaleIntensity,
        ShiftIntensity,
    )

    x = torch.from_numpy(hu[None].astype(np.float32))
    steps = ["calibration", "blur", "bias_field", "gamma", "noise"] if name == "combined" else [name]
    for step in steps:
        if step == "calibration":
            x = ShiftIntensity(offset=80.0)(ScaleIntensity(minv=None, maxv=None, factor=0.15)(x))
        elif step == "noise":
            noise = RandGaussianNoise(prob=1.0, mean=0.0, std=40.0)
            noise.set_random_state(seed)
            x = noise(x)
        elif step == "blur":
            x = GaussianSmooth(sigma=(0.01, 1.5, 1.5))(x)
        elif step == "bias_field":
            field = RandBiasField(degree=3, coeff_range=(0.3, 0.3), prob=1.0)
            field.set_random_state(seed)
            x = field(x + 1024.0) - 1024.0
        elif step == "gamma":
            x = AdjustContrast(gamma=1.5)(x)
        else:
            raise ValueError(step)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    return x[0].numpy().astype(np.float32)


def _config(*, epochs: int, steps: int, batch: int, seed: int, adaptation: dict | None = None) -> RunConfig:
    return RunConfig.from_dict(
        {
            "task": "segmentation_2d",
            "data": {"label_names": LABEL_NAMES},
            "preprocessing": {"preset": "ct_abdomen", "patch_size": [128, 128]},
            "model": {"name": "unet_mobilenet_v2", "pretrained": "imagenet"},
            "strategy": {"name": "full_finetune", "encoder_lr_factor": 0.1},
            "optim": {"lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": max(1, steps)},
            "train": {
                "epochs": epochs,
                "steps_per_epoch": steps,
                "batch_size": batch,
                "seed": seed,
                "device": "cpu",
                "keep_best": False,
            },
            "adaptation": adaptation or {},
            "augmentation": "light",
            "loss": "dice_ce",
        }
    )


def _dice(model, volume, truth, slices, domain: int | None = None) -> dict[str, float]:
    with use_domain(model, domain) if domain is not None else contextlib.nullcontext():
        pred = predict_slices(model, volume[slices]).argmax(0)
    scores = dice_per_class(pred, truth[slices], [1, 2])
    whole = dice_per_class((pred > 0).astype(np.int64), (truth[slices] > 0).astype(np.int64), [1])[1]
    return {"dice": whole, "liver": scores[1], "tumour": scores[2]}


def study(args, image: sitk.Image, truth: np.ndarray, log) -> list[dict[str, Any]]:
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    cfg0 = _config(epochs=1, steps=1, batch=1, seed=0)
    source = preprocess(image, cfg0)
    liver = [z for z in range(truth.shape[0]) if (truth[z] > 0).any()]
    labelled = spread_slices(liver, args.k)
    few = spread_slices([z for z in liver if z not in labelled], args.few)
    test = [z for z in liver if z not in labelled and z not in few]
    log(f"{len(liver)} liver slices: {args.k} labelled {labelled}, {args.few} target-labelled {few}, {len(test)} test")
    targets = {}
    for name in args.targets:
        shifted = sitk.GetImageFromArray(shift(name, hu))
        shifted.CopyInformation(image)
        targets[name] = preprocess(shifted, cfg0)
    budget = {"epochs": args.epochs, "steps": args.steps, "batch": args.batch}
    rows = []
    for seed in range(args.seeds):

        def train(items, tag, adaptation=None, target_items=None, n_domains=0, seed=seed):
            cfg = _config(**budget, seed=seed, adaptation=adaptation)
            t = time.perf_counter()
            result = fit(
                cfg,
                items,
                run_dir=args.scratch / f"{tag}_s{seed}",
                events=EventSink(),
                n_domains=n_domains,
                target_items=target_items,
            )
            return result.model, time.perf_counter() - t

        source_items = slice_items(source, truth, slices=labelled)
        source_model, source_s = train(source_items, "source")
        source_scores = _dice(source_model, source, truth, test)
        log(f"seed {seed}: source model on the source test slices: Dice {source_scores['dice']:.3f}")
        for name, target in targets.items():
            row: dict[str, Any] = {"target": name, "seed": seed, "source_dice_on_source": source_scores["dice"]}
            seconds: dict[str, float] = {"source": source_s}
            row["none"] = _dice(source_model, target, truth, test)

            t = time.perf_counter()
            adapted = copy.deepcopy(source_model)
            adapt_batchnorm(adapted, statistics_pass([target], cfg0, "cpu"))
            seconds["adabn"] = time.perf_counter() - t
            row["adabn"] = _dice(adapted, target, truth, test)

            target_few = slice_items(target, truth, slices=few)
            both = [{**item, "domain": 0} for item in source_items] + [{**item, "domain": 1} for item in target_few]
            model, seconds["dsbn"] = train(both, f"{name}_dsbn", adaptation={"method": "dsbn"}, n_domains=2)
            row["dsbn"] = _dice(model, target, truth, test, domain=1)

            model, seconds["joint"] = train(source_items + target_few, f"{name}_joint")
            row["joint"] = _dice(model, target, truth, test)

            unlabelled = slice_items(target, np.zeros_like(truth), slices=range(target.shape[0]))
            model, seconds["dann"] = train(
                source_items,
                f"{name}_dann",
                adaptation={"method": "dann", "target_csv": "(in memory)"},  # fit takes the items themselves
                target_items=unlabelled,
            )
            row["dann"] = _dice(model, target, truth, test)

            model, seconds["ceiling"] = train(slice_items(target, truth, slices=labelled), f"{name}_ceiling")
            row["ceiling"] = _dice(model, target, truth, test)
            row["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
            gap = row["ceiling"]["dice"] - row["none"]["dice"]
            row["recovered"] = {
                m: (row[m]["dice"] - row["none"]["dice"]) / gap if gap >= MIN_GAP else None for m in ADAPTIVE
            }
            rows.append(row)
            log(
                f"seed {seed} {name:11s}: "
                + ", ".join(f"{m} {row[m]['dice']:.3f}" for m in METHODS)
                + " | recovered: "
                + ", ".join(f"{m} {v:+.2f}" if v is not None else f"{m} n/a" for m, v in row["recovered"].items())
            )
    return rows


def _fmt(values) -> str:
    s = summarize(values)
    return f"{s['mean']:.3f} ± {s['sd']:.3f}"


def table(rows, args) -> str:
    lines = [
        f"Dice (liver + tumour) on {args.seeds} seeds' target test slices, mean ± sd; "
        f"{args.epochs} epochs × {args.steps} steps × batch {args.batch} per training run",
        "",
        "| target | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for name in args.targets:
        rs = [r for r in rows if r["target"] == name]
        lines.append(f"| {name} | " + " | ".join(_fmt([r[m]["dice"] for r in rs]) for m in METHODS) + " |")
    lines += [
        "",
        "Share of the lost Dice recovered, (method − none) / (ceiling − none), mean over the seeds whose gap is "
        f"at least {MIN_GAP} (n = seeds counted)",
        "",
        "| target | gap (ceiling − none) | " + " | ".join(ADAPTIVE) + " |",
        "|---|---|" + "---|" * len(ADAPTIVE),
    ]
    for name in args.targets:
        rs = [r for r in rows if r["target"] == name]
        gap = _fmt([r["ceiling"]["dice"] - r["none"]["dice"] for r in rs])
        cells = []
        for m in ADAPTIVE:
            values = [r["recovered"][m] for r in rs if r["recovered"][m] is not None]
            cells.append(f"{np.mean(values):+.2f} (n={len(values)})" if values else "no gap")
        lines.append(f"| {name} | {gap} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(METHODS)}  # one colour per method in both panels
    width = 0.8 / len(METHODS)
    x = np.arange(len(args.targets))
    for i, m in enumerate(METHODS):
        means = [np.mean([r[m]["dice"] for r in rows if r["target"] == t]) for t in args.targets]
        sds = [np.std([r[m]["dice"] for r in rows if r["target"] == t]) for t in args.targets]
        axes[0].bar(
            x + (i - len(METHODS) / 2 + 0.5) * width, means, width, yerr=sds, capsize=2, label=m, color=colour[m]
        )
    axes[0].set(xticks=x, ylabel="target Dice (liver + tumour)", title="Dice on the target domain", ylim=(0, 1))
    axes[0].set_xticklabels(args.targets, rotation=20)
    axes[0].legend(fontsize=8, ncol=3)
    width = 0.8 / len(ADAPTIVE)
    for i, m in enumerate(ADAPTIVE):
        means = []
        for t in args.targets:
            values = [r["recovered"][m] for r in rows if r["target"] == t and r["recovered"][m] is not None]
            means.append(np.mean(values) if values else np.nan)
        axes[1].bar(x + (i - len(ADAPTIVE) / 2 + 0.5) * width, means, width, label=m, color=colour[m])
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].axhline(1, color="grey", lw=0.8, ls="--")
    axes[1].set(xticks=x, ylabel="share of lost Dice recovered", title="(method − none) / (ceiling − none)")
    axes[1].set_xticklabels(args.targets, rotation=20)
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"Domain adaptation on the demo CT (LiTS 117), {args.seeds} seeds, CPU ({platform.processor() or 'x86_64'}), "
        f"{date.today().isoformat()}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--plot", type=Path, help="where the figure goes (default: OUT/adaptation.png)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, default=8, help="labelled source (and ceiling) slices")
    parser.add_argument("--few", type=int, default=2, help="labelled target slices for dsbn and joint")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--targets", nargs="+", default=["calibration", "noise", "blur", "bias_field", "gamma", "combined"]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 targets, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.steps, args.targets = 1, 2, 2, ["calibration", "combined"]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seed_offline_weights()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    image, labels = load_demo_case()
    truth = sitk.GetArrayFromImage(labels).astype(np.int64)
    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = Path(scratch)
        rows = study(args, image, truth, log)
    text = table(rows, args)
    print(text)
    meta = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU only",
        "torch": torch.__version__,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "budget": {"epochs": args.epochs, "steps": args.steps, "batch": args.batch, "k": args.k, "few": args.few},
    }
    atomic_write_text(args.out / "adaptation.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    atomic_write_text(args.out / "adaptation.md", f"{meta['date']}, {meta['machine']}, {meta['minutes']} min\n\n{text}")
    plot(rows, args, args.plot or args.out / "adaptation.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
