""" "Paint this slice next" against evenly spaced corrections, on the demo CT.

A simulated user starts from the same few painted axial slices of the demo CT (LiTS case 117,
liver and tumour), learns, and then for a few rounds adds the true labels of one more slice:

    suggested   the slice MedTL names first (the most uncertain one, ``suggest_slices``, the
                function behind the MedTL module's "Paint this slice next" list)
    evenly      the slice halfway across the largest gap between annotated slices (what a
                careful user does without advice: keep the annotated slices evenly spaced)

Each round continues from the last round's model, as the module does. Dice (liver and tumour)
is measured after every round on the liver slices no strategy has annotated by then, so both are
scored on the same slices. The figures are what they are: whichever wins is reported.

Writes ``next_slice.json`` and ``next_slice.md`` to ``--out``. About 10 minutes on 2 CPU cores;
``--quick`` is a smoke run.

    python Testing/bench/next_slice.py --out Testing/bench/results
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for sub in ("MedTLTraining", "MedTLExtension"):
    sys.path.insert(0, str(REPO / sub))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from medtl.config import RunConfig  # noqa: E402
from medtl.data.io import atomic_write_text  # noqa: E402
from medtl.data.lits_demo import LABEL_NAMES, load_demo_case  # noqa: E402
from medtl.data.partial_labels import UNKNOWN  # noqa: E402
from medtl.data.slices import slice_items, spread_slices  # noqa: E402
from medtl.evaluate import dice_per_class  # noqa: E402
from medtl.events import EventSink  # noqa: E402
from medtl.infer import normalised_entropy, predict_slices  # noqa: E402
from medtl.models.weights import seed_offline_weights  # noqa: E402
from medtl.package import preprocess  # noqa: E402
from medtl.train import fit  # noqa: E402
from MedTLExtensionLib.slice_learning import suggest_slices  # noqa: E402

STRATEGIES = ("suggested", "evenly")


def _config(seed: int, epochs: int, steps: int, *, first: bool) -> RunConfig:
    return RunConfig.from_dict(
        {
            "data": {"label_names": LABEL_NAMES},
            "preprocessing": {"preset": "ct_abdomen", "patch_size": [128, 128]},
            # The module's choices: ImageNet and feature extraction first, then gently all of the last model.
            "model": {"name": "unet_mobilenet_v2", "pretrained": "imagenet" if first else "none"},
            "strategy": (
                {"name": "feature_extraction_then_finetune", "feature_extraction_epochs": max(1, epochs // 3)}
                if first
                else {"name": "full_finetune", "encoder_lr_factor": 0.1}
            ),
            "optim": {"lr": 1e-3, "warmup_steps": steps},
            "train": {"epochs": epochs, "steps_per_epoch": steps, "batch_size": 8, "seed": seed, "device": "cpu"},
            "augmentation": "light",
        }
    )


def largest_gap_midpoint(annotated: list[int]) -> int:
    """The slice halfway across the largest gap between annotated slices: corrections that keep the
    annotated slices evenly spaced."""
    ordered = sorted(annotated)
    low, high = max(zip(ordered, ordered[1:], strict=False), key=lambda pair: (pair[1] - pair[0], -pair[0]))
    return (low + high) // 2


def run_round(volume, truth, annotated, model, cfg, run_dir):
    items = slice_items(volume, truth, slices=sorted(annotated))
    result = fit(cfg, items, run_dir=run_dir, model=model, events=EventSink())
    probs = predict_slices(result.model, volume)
    return result, probs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("Testing/bench/results"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--start", type=int, default=3, help="slices painted before the first round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds that each add one slice")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the first round (later: half)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 round, 1 epoch of 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.epochs, args.steps = 1, 1, 1, 2
    args.out.mkdir(parents=True, exist_ok=True)
    seed_offline_weights()
    scratch = tempfile.TemporaryDirectory(prefix="medtl-next-slice-")
    t0 = time.perf_counter()
    image, label_image = load_demo_case()
    volume = preprocess(image, _config(0, 1, 1, first=True))
    truth = sitk.GetArrayFromImage(label_image).astype(np.uint8)
    liver = [z for z in range(truth.shape[0]) if truth[z].any()]
    rows = []
    for seed in range(args.seeds):
        start = spread_slices(liver, args.start)
        first_cfg = _config(seed, args.epochs, args.steps, first=True)
        result, probs = run_round(volume, truth, start, None, first_cfg, Path(scratch.name) / f"s{seed}_r0")
        # Each strategy goes on from its own copy of the first round's network.
        states = {
            name: {"annotated": list(start), "model": copy.deepcopy(result.model), "probs": probs}
            for name in STRATEGIES
        }
        for round_no in range(1, args.rounds + 1):
            for name in STRATEGIES:
                state = states[name]
                known = np.full(truth.shape, UNKNOWN, np.uint8)
                known[state["annotated"]] = 0
                if name == "suggested":
                    entropy = normalised_entropy(state["probs"])
                    choice = suggest_slices(entropy, known != UNKNOWN, axis=0, count=1)[0][0]
                else:
                    choice = largest_gap_midpoint(state["annotated"])
                state["annotated"].append(int(choice))
                cfg = _config(seed, max(1, args.epochs // 2), args.steps, first=False)
                run_dir = Path(scratch.name) / f"s{seed}_{name}_{round_no}"
                result, state["probs"] = run_round(volume, truth, state["annotated"], state["model"], cfg, run_dir)
                state["model"] = result.model
                state["seconds"] = state.get("seconds", 0.0) + result.seconds
            scored = [z for z in liver if all(z not in s["annotated"] for s in states.values())]
            for name in STRATEGIES:
                pred = states[name]["probs"][:, scored].argmax(0)
                scores = dice_per_class(pred, truth[scored], [1, 2])
                whole = dice_per_class(pred > 0, truth[scored] > 0, [1])[1]
                row = {
                    "seed": seed,
                    "round": round_no,
                    "strategy": name,
                    "added": states[name]["annotated"][-1],
                    "annotated": sorted(states[name]["annotated"]),
                    "scored_slices": len(scored),
                    "liver_and_tumour": round(whole, 4),
                    "liver": round(scores[1], 4),
                    "tumour": round(scores[2], 4),
                }
                rows.append(row)
                print(
                    f"seed {seed} round {round_no} {name:9s}: +slice {row['added']:3d}, Dice liver+tumour "
                    f"{whole:.3f}, liver {scores[1]:.3f}, tumour {scores[2]:.3f}",
                    flush=True,
                )
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU only"
    result = {
        "date": date.today().isoformat(),
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(args.out / "next_slice.json", json.dumps(result, indent=2) + "\n")
    text = table(rows, args, result)
    atomic_write_text(args.out / "next_slice.md", text)
    print(text)
    return 0


def table(rows, args, result) -> str:
    lines = [
        f"Measured {result['date']} on {result['machine']}, {result['total_seconds']:.0f} s in all.",
        "",
        f"Demo CT, {args.start} painted slices, then one slice more per round (the oracle's labels); "
        f"first round {args.epochs} × {args.steps} steps, later rounds {max(1, args.epochs // 2)} × {args.steps} "
        f"from the last model; mean ± sd over {args.seeds} seed(s) of the Dice on the liver slices neither "
        "strategy annotated.",
        "",
        "| round | strategy | Dice liver+tumour | Dice liver | Dice tumour |",
        "|---|---|---|---|---|",
    ]
    for round_no in range(1, args.rounds + 1):
        for name in STRATEGIES:
            sel = [r for r in rows if r["round"] == round_no and r["strategy"] == name]
            cells = []
            for key in ("liver_and_tumour", "liver", "tumour"):
                values = np.array([r[key] for r in sel], float)
                cells.append(f"{np.nanmean(values):.3f} ± {np.nanstd(values, ddof=1) if len(values) > 1 else 0:.3f}")
            lines.append(f"| {round_no} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
