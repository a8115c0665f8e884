"""Interactive speed (issue 18): what a user waits for and sees in a round of the semi-automatic
loop, on the warm engine against today's one-shot round, in the same run on the same scene.

The scene is the demo CT of ``performance.py`` (128³, 4 painted axial slices, headless slicer-core,
the real engine in a child process). Measured, per round, from pressing Learn:

- **one-shot** (the module before the warm engine): ``medtl train`` then predict, 20 epochs of 20
  steps, a fresh process: the total and the Dice on the unpainted slices;
- **warm, first round**: the engine started when the module was entered (it imports torch while
  the user paints), Learn pressed once it is ready; the time to the first preview shown in the
  overlay, the round's total, its Dice, and what besides training steps it spends (overhead);
- **warm, cold start**: the same, with the engine started by the Learn press itself;
- **warm, second round**: one slice corrected (the worst predicted one set to the truth), Learn
  again on the same engine, with the shorter later budget;
- **planner**: the pre-flight estimate of the one-shot round (a few probe steps, no training)
  against the one-shot's measured training and prediction time.

    python Testing/bench/interactive.py [--quick] [--budget 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
for sub in ("MedTLTraining", "MedTLExtension"):
    sys.path.insert(0, str(REPO / sub))
RESULTS = HERE / "results"


def run_round(learner, scene, options) -> dict:
    """Presses Learn and polls as the module's timer does; the times the user sees, from the press."""
    t0 = time.time()
    learner.start_learning(scene.volume, scene.painted_segmentation, options)
    events, first_preview = [], None
    while learner.is_running:
        new = learner.poll()
        if first_preview is None and any(e["event"] == "preview" for e in new) and learner.preview.shown:
            first_preview = time.time() - t0  # in the overlay, not just sent
        events += new
        time.sleep(0.01)
    total = time.time() - t0
    steps = [e["time"] for e in events if e["event"] == "step" and e.get("label") != "predict"]
    start = next(e["time"] for e in events if e["event"] == "start" and e.get("label") != "predict")
    done = next((e for e in events if e["event"] == "done"), {})
    return {
        "total_s": round(total, 2),
        "first_preview_s": None if first_preview is None else round(first_preview, 2),
        "previews": sum(e["event"] == "preview" for e in events),
        "steps": len(steps),
        "training_steps_s": round(steps[-1] - start, 2) if steps else 0.0,
        "overhead_s": round(total - (steps[-1] - start), 2) if steps else round(total, 2),
        "before_training_s": round(start - t0, 2),
        "after_training_s": round(t0 + total - steps[-1], 2) if steps else None,
        "stopped": done.get("stopped"),
        "planned_total_s": (done.get("planned") or {}).get("total_s"),
        "_events": events,
    }


def wait_ready(engine, timeout_s: float = 120) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if any(e["event"] == "ready" for e in engine.process.poll()):
            return time.time() - t0
        time.sleep(0.05)
    raise TimeoutError("the warm engine did not start")


def correct_worst_slice(scene, learner) -> int:
    """The user's correction: the unpainted slice the prediction gets most wrong, set to the truth."""
    from MedTLExtensionLib import mrml_bridge as bridge

    h, node = scene.headless, learner.under_review
    predicted, _ = bridge.segmentation_to_labelmap(h.scene, h.segmentations_logic, node, scene.volume)
    wrong = [(int((predicted[s] != scene.truth[s]).sum()), s) for s in scene.unpainted_slices]
    worst = max(wrong)[1]
    predicted[worst] = scene.truth[worst]
    segment = bridge.list_segment_ids(node.GetSegmentation())[0]
    bridge.replace_segment_voxels(node, segment, predicted == 1, scene.volume)
    return worst


def one_shot_options(quick: bool):
    """The module's Learn before the warm engine: 20 epochs of 20 steps (a smoke run: 2 of 4)."""
    from MedTLExtensionLib.slice_learning import LearningOptions

    return LearningOptions(device="cpu", **({"epochs": 2, "steps_per_epoch": 4} if quick else {}))


def one_shot(scene, quick: bool) -> dict:
    from demo_ct_scene import unpainted_dice
    from MedTLExtensionLib.slice_learning import SliceLearner

    h = scene.headless
    learner = SliceLearner(h.scene, h.segmentations_logic, work_root=tempfile.mkdtemp(prefix="medtl-bench-oneshot-"))
    result = run_round(learner, scene, one_shot_options(quick))
    events = result.pop("_events")
    predict = [e for e in events if e["event"] == "start" and e.get("label") == "predict"]
    done = [e["time"] for e in events if e["event"] == "done"]
    result["inference_s"] = round(done[-1] - predict[0]["time"], 2) if predict and done else None
    result["dice_unpainted"] = round(unpainted_dice(scene, learner.result_segmentation), 3)
    learner.reject()
    return result


def warm_rounds(scene, budget: float, *, prestart: bool) -> dict:
    from demo_ct_scene import unpainted_dice
    from MedTLExtensionLib.slice_learning import LearningOptions, SliceLearner
    from MedTLExtensionLib.warm_engine import WarmEngine

    h = scene.headless
    engine = WarmEngine()
    learner = SliceLearner(
        h.scene, h.segmentations_logic, work_root=tempfile.mkdtemp(prefix="medtl-bench-warm-"), warm_engine=engine
    )
    out: dict = {}
    try:
        if prestart:
            engine.start()
            out["engine_ready_s"] = round(wait_ready(engine), 2)  # while the user paints
        n = scene.truth.shape[0]
        learner.set_view(0, n // 2)  # the user looks at the middle slice
        options = LearningOptions(device="cpu", budget_s=budget, later_budget_s=budget / 2)
        first = run_round(learner, scene, options)
        first.pop("_events")
        first["dice_unpainted"] = round(unpainted_dice(scene, learner.result_segmentation), 3)
        out["first_round"] = first
        if not prestart:
            return out
        out["corrected_slice"] = correct_worst_slice(scene, learner)
        second = run_round(learner, scene, options)
        second.pop("_events")
        second["dice_unpainted"] = round(unpainted_dice(scene, learner.result_segmentation), 3)
        out["second_round"] = second
        learner.reject()
        return out
    finally:
        learner.close()


def planner_estimate(scene, quick: bool) -> dict:
    """The pre-flight plan of the one-shot round's configuration (probe steps only)."""
    import numpy as np
    import torch
    from medtl.config import RunConfig
    from medtl.events import EventSink
    from medtl.models.registry import build_model
    from medtl.planner import plan_run
    from medtl.serve import WarmSession
    from MedTLExtensionLib import mrml_bridge, volume_files
    from MedTLExtensionLib.slice_learning import display_window, learning_config

    folder = Path(tempfile.mkdtemp(prefix="medtl-bench-plan-"))
    labels = np.full(scene.truth.shape, 255, np.uint8)
    labels[scene.painted_slices] = scene.truth[scene.painted_slices]
    image = volume_files.write_volume(scene.volume, folder / "image.nrrd")
    volume_files.write_array(labels, mrml_bridge.ijk_to_ras_of(scene.volume), folder / "label.nrrd")
    cfg = RunConfig.from_dict(
        learning_config(
            window=display_window(scene.volume),
            label_names=["organ"],
            csv=folder / "cases.csv",
            output_dir=folder,
            image_shape=labels.shape,
            options=one_shot_options(quick),
            initial_weights="imagenet",
        )
    )
    session = WarmSession(EventSink())
    warm_image = session.load_image(image, cfg)
    items = session.samples(warm_image, session.load_labels(folder / "label.nrrd", warm_image, cfg), cfg)
    t0 = time.time()
    model = build_model(cfg.model.name, num_classes=cfg.num_classes, pretrained=cfg.model.pretrained)
    plan = plan_run(cfg, items, model, device=torch.device("cpu"), predict_slices=labels.shape[0])
    return {"planning_s": round(time.time() - t0, 2), **plan.event_fields()}


def table(results: dict) -> str:
    one, warm, cold = results["one_shot"], results["warm"], results["warm_cold_start"]["first_round"]
    first, second, plan = warm["first_round"], warm.get("second_round", {}), results["planner"]
    measured = (one["training_steps_s"] or 0) + (one["inference_s"] or 0)
    rows = [
        "| | one-shot round (today) | warm engine, first round | warm, cold start | warm, second round |",
        "|---|---|---|---|---|",
        f"| Learn pressed → first preview on screen | none (progress bar only) | {first['first_preview_s']} s | "
        f"{cold['first_preview_s']} s | {second.get('first_preview_s')} s |",
        f"| Learn pressed → prediction in the scene | {one['total_s']} s | {first['total_s']} s | "
        f"{cold['total_s']} s | {second.get('total_s')} s |",
        f"| training steps | {one['steps']} in {one['training_steps_s']} s | {first['steps']} in "
        f"{first['training_steps_s']} s | {cold['steps']} in {cold['training_steps_s']} s | {second.get('steps')} in "
        f"{second.get('training_steps_s')} s |",
        f"| besides training steps (before + after) | {one['overhead_s']} s | {first['overhead_s']} s "
        f"({first['before_training_s']} + {first['after_training_s']}) | {cold['overhead_s']} s | "
        f"{second.get('overhead_s')} s "
        f"({second.get('before_training_s')} + {second.get('after_training_s')}) |",
        f"| why training ended | 400 steps | {first['stopped'] or 'planned steps done'} | "
        f"{cold['stopped'] or 'planned steps done'} | {second.get('stopped') or 'planned steps done'} |",
        f"| Dice on the unpainted slices | {one['dice_unpainted']} | {first['dice_unpainted']} | "
        f"{cold['dice_unpainted']} | {second.get('dice_unpainted')} |",
        "",
        f"Planner (pre-flight, {plan['planning_s']} s of probing): the one-shot round predicted at "
        f"{plan['total_s']} s ({plan['steps']} steps × {plan['seconds_per_step']} s "
        f"+ {plan['predict_s']} s prediction); "
        f"measured {round(measured, 1)} s of training steps and prediction: "
        f"{round(100 * (plan['total_s'] - measured) / measured, 1)} % off.",
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64³ and short rounds: a smoke run")
    parser.add_argument("--budget", type=float, default=30.0, help="the first round's budget (s); later rounds half")
    args = parser.parse_args()
    from demo_ct_scene import demo_ct_scene
    from medtl.models.weights import seed_offline_weights

    os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="medtl-bench-hub-"))
    seed_offline_weights()
    budget = 6.0 if args.quick else args.budget
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "quick": args.quick,
        "budget_s": budget,
    }
    scene = demo_ct_scene(64 if args.quick else 128)
    results["one_shot"] = one_shot(scene, args.quick)
    print("one-shot:", json.dumps(results["one_shot"]), flush=True)
    results["warm"] = warm_rounds(scene, budget, prestart=True)
    print("warm:", json.dumps(results["warm"]), flush=True)
    results["warm_cold_start"] = warm_rounds(scene, budget, prestart=False)
    print("warm, cold start:", json.dumps(results["warm_cold_start"]), flush=True)
    results["planner"] = planner_estimate(scene, args.quick)
    print("planner:", json.dumps(results["planner"]), flush=True)
    text = table(results)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "interactive.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        header = f"Measured {results['date']} on {results['machine']}; first-round budget {budget:g} s.\n\n"
        (RESULTS / "interactive.md").write_text(header + text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
