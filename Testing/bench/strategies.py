"""The transfer-learning strategy study: what each strategy buys, on a real CT, with few labels.

Segmentation: K labelled axial slices (spread through the liver) of the demo CT (LiTS case 117,
liver and tumour) train a 2D U-Net on ImageNet MobileNetV2 with Dice + class-weighted cross-entropy;
Dice is measured on every other liver slice. Strategies, all with the same step budget and optimiser:

    scratch                random weights, everything trains at the full rate
    feature_extraction     frozen ImageNet encoder, new decoder
    full_finetune          everything trains, the encoder at 0.1 × the rate
    gradual_unfreezing     decoder first, then one encoder stage more per epoch, from the top
    discriminative_lr      everything trains, rates halving per stage towards the input

Classification: 64 × 64 liver patches of the same case, tumour vs no tumour, MobileNetV2
classifier; alternate blocks of 8 slices train and test (with a one-slice gap); AUROC.

Writes ``strategies.json``, ``strategies.md`` (the tables) and ``strategies.png`` to ``--out``.
This is a benchmark: it prints figures, it asserts nothing. On 2 CPU cores the full study takes
about 40 minutes; ``--quick`` is a smoke run.

    python Testing/bench/strategies.py --out Testing/bench/results
"""

from __future__ import annotations

import argparse
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
from medtl.config import RunConfig
from medtl.data.io import atomic_write_text
from medtl.data.lits_demo import LABEL_NAMES, load_demo_case
from medtl.data.slices import slice_items, spread_slices
from medtl.events import EventSink
from medtl.infer import predict_class_probabilities, predict_slices
from medtl.models.weights import seed_offline_weights
from medtl.package import preprocess
from medtl.train import dice_per_class, fit, summarize

STRATEGIES: dict[str, dict[str, Any]] = {
    "scratch": {"pretrained": "none", "strategy": {"name": "full_finetune", "encoder_lr_factor": 1.0}},
    "feature_extraction": {"pretrained": "imagenet", "strategy": {"name": "feature_extraction"}},
    "full_finetune": {"pretrained": "imagenet", "strategy": {"name": "full_finetune", "encoder_lr_factor": 0.1}},
    "gradual_unfreezing": {"pretrained": "imagenet", "strategy": {"name": "gradual_unfreezing", "unfreeze_every": 1}},
    "discriminative_lr": {"pretrained": "imagenet", "strategy": {"name": "discriminative_lr", "lr_decay": 0.5}},
}
TARGET_DICE = 0.9


def _config(kind: str, *, task: str, epochs: int, steps: int, batch: int, seed: int) -> RunConfig:
    spec = STRATEGIES[kind]
    classification = task == "classification_2d"
    return RunConfig.from_dict(
        {
            "task": task,
            "data": {"label_names": ["no_tumour", "tumour"] if classification else LABEL_NAMES},
            "preprocessing": {"preset": "ct_abdomen", "patch_size": [64, 64] if classification else [128, 128]},
            "model": {
                "name": "cls_mobilenet_v2" if classification else "unet_mobilenet_v2",
                "pretrained": spec["pretrained"],
            },
            "strategy": spec["strategy"],
            "optim": {"lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": max(1, steps)},
            "train": {
                "epochs": epochs,
                "steps_per_epoch": steps,
                "batch_size": batch,
                "seed": seed,
                "device": "cpu",
                "keep_best": False,  # the same budget for every strategy: no selection on test data
            },
            "augmentation": "light",
            # With 8 labelled slices the tumour is ~6 % of the voxels: unweighted cross-entropy left it
            # unlearned for one head initialisation in three (2026-11-30-partial-labels.md).
            "loss": "ce" if classification else "dice_ce_weighted",
        }
    )


def segmentation_study(args, volume, truth, log) -> list[dict[str, Any]]:
    liver_slices = [z for z in range(truth.shape[0]) if (truth[z] > 0).any()]
    rows = []
    for k in args.k:
        labelled = spread_slices(liver_slices, k)
        held_out = [z for z in liver_slices if z not in labelled]
        # Every sixth held-out slice scores the network after each epoch (the time-to-0.9 curve);
        # the final score uses all of them.
        curve_slices = held_out[::6]
        items = slice_items(volume, truth, slices=labelled)
        for kind in args.strategies:
            for seed in range(args.seeds):
                cfg = _config(
                    kind, task="segmentation_2d", epochs=args.epochs, steps=args.steps, batch=args.batch, seed=seed
                )
                curve: list[tuple[float, float]] = []
                train_clock = {"t0": time.perf_counter(), "eval": 0.0}

                def validate(model, curve=curve, clock=train_clock, slices=curve_slices):
                    t = time.perf_counter()
                    pred = predict_slices(model, volume[slices]).argmax(0)
                    liver = dice_per_class((pred > 0).astype(np.int64), (truth[slices] > 0).astype(np.int64), [1])[1]
                    clock["eval"] += time.perf_counter() - t
                    curve.append((time.perf_counter() - clock["t0"] - clock["eval"], liver))
                    return {"liver_and_tumour": liver}

                result = fit(
                    cfg,
                    items,
                    run_dir=args.scratch / f"k{k}_{kind}_s{seed}",
                    validate=validate,
                    events=EventSink(),
                )
                pred = predict_slices(result.model, volume[held_out]).argmax(0)
                scores = dice_per_class(pred, truth[held_out], [1, 2])
                whole = dice_per_class((pred > 0).astype(np.int64), (truth[held_out] > 0).astype(np.int64), [1])[1]
                reached = next((t for t, d in curve if d >= TARGET_DICE), None)
                row = {
                    "k": k,
                    "strategy": kind,
                    "seed": seed,
                    "liver_and_tumour": whole,
                    "liver": scores[1],
                    "tumour": scores[2],
                    "seconds_to_target": None if reached is None else round(reached, 1),
                    "train_seconds": round(result.seconds - train_clock["eval"], 1),
                    "curve": [(round(t, 1), round(d, 4)) for t, d in curve],
                }
                rows.append(row)
                log(
                    f"K={k:2d} {kind:19s} seed {seed}: Dice liver+tumour {whole:.3f}, liver {scores[1]:.3f}, "
                    f"tumour {scores[2]:.3f}, {row['train_seconds']:.0f} s, "
                    f"to {TARGET_DICE}: {row['seconds_to_target']}"
                )
    return rows


def liver_patches(volume, truth, size=64, stride=8):
    """(z, patch, class) for 64 × 64 patches on a grid: tumour (1) where at least 30 % of the
    central 32 × 32 is tumour, no tumour (0) where none of it is and at least half is liver; the
    ambiguous ones are left out."""
    half = size // 2
    out = []
    for z in range(truth.shape[0]):
        for y in range(half, truth.shape[1] - half + 1, stride):
            for x in range(half, truth.shape[2] - half + 1, stride):
                centre = truth[z, y - 16 : y + 16, x - 16 : x + 16]
                tumour, liver = (centre == 2).mean(), (centre == 1).mean()
                if tumour >= 0.3:
                    label = 1
                elif tumour == 0 and liver >= 0.5:
                    label = 0
                else:
                    continue
                out.append((z, volume[z, y - half : y + half, x - half : x + half].copy(), label))
    return out


def classification_study(args, volume, truth, log) -> list[dict[str, Any]]:
    from monai.metrics import compute_roc_auc

    # Blocks of 8 slices alternate between training and test, with a slice left out on each side
    # of a test block, so that no test patch has a training patch from the next slice.
    patches = liver_patches(volume, truth)
    train = [(p, c) for z, p, c in patches if (z // 8) % 2 == 0]
    test = [(p, c) for z, p, c in patches if (z // 8) % 2 == 1 and z % 8 not in (0, 7)]
    items = [{"image": p[None].astype(np.float32), "label": np.array([c])} for p, c in train]
    test_labels = torch.tensor([c for _, c in test], dtype=torch.float32)
    log(
        f"classification: {len(train)} training patches ({sum(c for _, c in train)} tumour), "
        f"{len(test)} test patches ({int(test_labels.sum())} tumour)"
    )
    rows = []
    for kind in args.strategies:
        for seed in range(args.seeds):
            cfg = _config(
                kind, task="classification_2d", epochs=args.epochs, steps=args.steps, batch=args.batch, seed=seed
            )
            result = fit(cfg, items, run_dir=args.scratch / f"cls_{kind}_s{seed}", events=EventSink())
            probs = predict_class_probabilities(result.model, [p for p, _ in test], size=[64, 64])[:, 1]
            auroc = float(compute_roc_auc(torch.from_numpy(probs), test_labels))
            rows.append({"strategy": kind, "seed": seed, "auroc": auroc, "train_seconds": round(result.seconds, 1)})
            log(f"classification {kind:19s} seed {seed}: AUROC {auroc:.3f} ({result.seconds:.0f} s)")
    return rows


def _fmt(values) -> str:
    s = summarize(values)
    return f"{s['mean']:.3f} ± {s['sd']:.3f}"


def tables(seg_rows, cls_rows, args) -> str:
    lines = [
        f"Segmentation (held-out liver slices, Dice mean ± sd over {args.seeds} seeds; "
        f"{args.epochs} epochs × {args.steps} steps × batch {args.batch} for every strategy)",
        "",
        "| K | strategy | Dice liver+tumour | Dice liver | Dice tumour | reached 0.9 | time to 0.9 (s) "
        "| train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in args.k:
        for kind in args.strategies:
            rs = [r for r in seg_rows if r["k"] == k and r["strategy"] == kind]
            times = [r["seconds_to_target"] for r in rs if r["seconds_to_target"] is not None]
            lines.append(
                f"| {k} | {kind} | {_fmt([r['liver_and_tumour'] for r in rs])} | {_fmt([r['liver'] for r in rs])} "
                f"| {_fmt([r['tumour'] for r in rs])} | {len(times)}/{len(rs)} "
                f"| {f'{np.mean(times):.0f}' if times else '—'} | {np.mean([r['train_seconds'] for r in rs]):.0f} |"
            )
    if cls_rows:
        lines += [
            "",
            f"Classification (tumour vs no tumour liver patches, AUROC mean ± sd over {args.seeds} seeds)",
            "",
            "| strategy | AUROC | train time (s) |",
            "|---|---|---|",
        ]
        for kind in args.strategies:
            rs = [r for r in cls_rows if r["strategy"] == kind]
            lines.append(
                f"| {kind} | {_fmt([r['auroc'] for r in rs])} | {np.mean([r['train_seconds'] for r in rs]):.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot(seg_rows, cls_rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if cls_rows else 2, figsize=(15 if cls_rows else 10, 4))
    for kind in args.strategies:
        means, sds = [], []
        for k in args.k:
            values = [r["liver_and_tumour"] for r in seg_rows if r["k"] == k and r["strategy"] == kind]
            means.append(np.mean(values))
            sds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        axes[0].errorbar(args.k, means, yerr=sds, marker="o", capsize=3, label=kind)
        k_max = max(args.k)
        for r in (r for r in seg_rows if r["k"] == k_max and r["strategy"] == kind and r["seed"] == 0):
            t, d = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            axes[1].plot(t, d, marker=".", label=kind)
    axes[0].set(xscale="log", xlabel="labelled slices K", ylabel="held-out Dice (liver+tumour)", title="Dice vs K")
    axes[0].set_xticks(args.k, [str(k) for k in args.k])
    axes[0].minorticks_off()
    axes[0].legend(fontsize=8)
    axes[1].axhline(TARGET_DICE, color="grey", lw=0.8, ls="--")
    axes[1].set(
        xlabel="training seconds (CPU)",
        ylabel="Dice (every 6th held-out slice)",
        title=f"learning curve, K={max(args.k)}, seed 0",
    )
    if cls_rows:
        kinds = list(args.strategies)
        values = [[r["auroc"] for r in cls_rows if r["strategy"] == kind] for kind in kinds]
        axes[2].bar(
            range(len(kinds)),
            [np.mean(v) for v in values],
            yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values],
            capsize=3,
        )
        axes[2].set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
        axes[2].axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[2].set(ylim=(0.0, 1.0), ylabel="AUROC (0.5 = chance)", title="tumour vs no-tumour patches")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("Testing/bench/results"))
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--no-classification", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: K=2, 1 seed, 1 epoch of 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.k, args.seeds, args.epochs, args.steps, args.batch = [2], 1, 1, 2, 2
    args.out.mkdir(parents=True, exist_ok=True)
    # Checkpoints of 75 runs are gigabytes; only the figures are kept.
    scratch = tempfile.TemporaryDirectory(prefix="medtl-study-")
    args.scratch = Path(scratch.name)
    seed_offline_weights()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def log(message: str) -> None:
        print(message, flush=True)

    t0 = time.perf_counter()
    image, label_image = load_demo_case()
    cfg = _config("scratch", task="segmentation_2d", epochs=1, steps=1, batch=1, seed=0)
    volume = preprocess(image, cfg)
    truth = sitk.GetArrayFromImage(label_image).astype(np.int64)
    seg_rows = segmentation_study(args, volume, truth, log)
    cls_rows = [] if args.no_classification else classification_study(args, volume, truth, log)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU only"
    result = {
        "date": date.today().isoformat(),
        "machine": machine,
        "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "scratch"},
        "segmentation": seg_rows,
        "classification": cls_rows,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(args.out / "strategies.json", json.dumps(result, indent=2) + "\n")
    text = f"Measured {result['date']} on {machine}, torch {torch.__version__}.\n\n" + tables(seg_rows, cls_rows, args)
    atomic_write_text(args.out / "strategies.md", text)
    plot(seg_rows, cls_rows, args, args.out / "strategies.png")
    print(text)
    print(f"wrote {args.out / 'strategies.json'}, strategies.md, strategies.png in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
