"""Predicted segments carry the terminology of the user's segments of the same name."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="the Slicer-side tests need slicer-core")

from MedTLExtensionLib import mrml_bridge  # noqa: E402
from MedTLExtensionLib.headless_scene import create_headless_scene  # noqa: E402
from MedTLExtensionLib.terminology import copy_terminology  # noqa: E402

LIVER = "SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"


def test_predicted_segments_get_the_users_terminology():
    headless = create_headless_scene()
    labels = np.zeros((4, 16, 16), np.uint8)
    labels[1, 2:6, 2:6] = 1
    labels[2, 8:12, 8:12] = 2
    segments = [(1, "liver", (0.9, 0.5, 0.3)), (2, "tumour", (0.2, 0.8, 0.3))]
    user = mrml_bridge.labelmap_to_segmentation(
        headless.scene, headless.segmentations_logic, labels, np.eye(4), segments, name="user"
    )
    prediction = mrml_bridge.labelmap_to_segmentation(
        headless.scene,
        headless.segmentations_logic,
        labels,
        np.eye(4),
        [*segments, (3, "vessel", (0.1, 0.1, 0.9))],
        name="prediction",
    )
    user.GetSegmentation().GetSegment(user.GetSegmentation().GetSegmentIdBySegmentName("liver")).SetTerminology(LIVER)
    vessel_before = prediction.GetSegmentation().GetNthSegment(2).GetTerminology()
    assert prediction.GetSegmentation().GetNthSegment(0).GetTerminology() != LIVER

    assert copy_terminology(user, prediction) == ["liver", "tumour"]
    by_name = {
        prediction.GetSegmentation().GetNthSegment(i).GetName(): prediction.GetSegmentation().GetNthSegment(i)
        for i in range(prediction.GetSegmentation().GetNumberOfSegments())
    }
    assert by_name["liver"].GetTerminology() == LIVER
    assert by_name["tumour"].GetTerminology() != LIVER and by_name["vessel"].GetTerminology() == vessel_before
