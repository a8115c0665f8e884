"""The benchmarks' semi-automatic scene: a 128³ CT-like volume (an ellipsoid organ in noise, 0.8 ×
0.8 × 1.5 mm voxels, displayed in an abdominal window) with 4 axial slices painted, headless on
slicer-core. Shared by ``performance.py`` (today's one-shot round) and ``interactive.py`` (the
warm engine), so both time the same user's round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAINTED_FRACTIONS = (0.3, 0.45, 0.6, 0.75)


@dataclass
class DemoScene:
    headless: object  # MedTLExtensionLib.headless_scene.HeadlessScene
    volume: object
    painted_segmentation: object
    truth: np.ndarray
    painted_slices: list[int]

    @property
    def unpainted_slices(self) -> list[int]:
        return [s for s in range(self.truth.shape[0]) if s not in self.painted_slices]


def demo_ct_scene(n: int = 128) -> DemoScene:
    from MedTLExtensionLib import mrml_bridge as bridge
    from MedTLExtensionLib.headless_scene import create_headless_scene

    k, j, i = np.indices((n, n, n), dtype=float)
    organ = ((k - n / 2) / (0.35 * n)) ** 2 + ((j - n / 2) / (0.3 * n)) ** 2 + ((i - n / 2) / (0.32 * n)) ** 2 < 1
    truth = organ.astype(np.uint8)
    image = (np.where(organ, 150.0, -80.0) + np.random.default_rng(0).normal(0, 15, truth.shape)).astype(np.float32)
    matrix = np.diag([0.8, 0.8, 1.5, 1.0])
    headless = create_headless_scene()
    volume = bridge.array_to_volume(headless.scene, image, matrix, "ct")
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(400, 40)
    painted_slices = [int(n * f) for f in PAINTED_FRACTIONS]
    painted = np.zeros_like(truth)
    painted[painted_slices] = truth[painted_slices]
    user = bridge.labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        painted,
        matrix,
        [(1, "organ", (0.9, 0.5, 0.3))],
        reference_volume=volume,
    )
    return DemoScene(headless, volume, user, truth, painted_slices)


def unpainted_dice(scene: DemoScene, segmentation) -> float:
    """Dice of ``segmentation`` against the truth on the slices the user did not paint."""
    from medtl.evaluate import dice_per_class
    from MedTLExtensionLib import mrml_bridge as bridge

    h = scene.headless
    predicted, _ = bridge.segmentation_to_labelmap(h.scene, h.segmentations_logic, segmentation, scene.volume)
    others = scene.unpainted_slices
    return float(dice_per_class(predicted[others] > 0, scene.truth[others], [1])[1])
