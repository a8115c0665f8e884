"""Standard terminology (DICOM/SNOMED codes) for the segments MedTL creates, copied from the user's.

A prediction's segments are named after the user's (``liver``, ``tumour``); the terminology the user
chose for them in the Segment Editor (category, type, modifier) travels with the name, so the
prediction's segments export to DICOM SEG and show in the Segment Editor as the user's do.
"""

from __future__ import annotations

import slicer

__all__ = ["copy_terminology"]


def copy_terminology(source: slicer.vtkMRMLSegmentationNode, target: slicer.vtkMRMLSegmentationNode) -> list[str]:
    """Gives each segment of ``target`` the terminology of ``source``'s segment of the same name.

    Args:
        source: the user's segmentation.
        target: MedTL's prediction.

    Returns:
        The names of the segments that got one (a segment without a namesake keeps its own).
    """
    source_segmentation = source.GetSegmentation()
    entries = {
        source_segmentation.GetNthSegment(i).GetName(): source_segmentation.GetNthSegment(i).GetTerminology()
        for i in range(source_segmentation.GetNumberOfSegments())
    }
    copied = []
    target_segmentation = target.GetSegmentation()
    for index in range(target_segmentation.GetNumberOfSegments()):
        segment = target_segmentation.GetNthSegment(index)
        entry = entries.get(segment.GetName())
        if entry:
            segment.SetTerminology(entry)
            copied.append(segment.GetName())
    return copied
