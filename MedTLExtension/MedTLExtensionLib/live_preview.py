"""The live preview: the slice the user looks at, as the network being trained segments it now.

One label map node on the volume's grid, updated in place slice by slice as the warm engine's
``preview`` events arrive (every few seconds while it learns), and removed when the round ends
(the prediction then takes its place). Needs MRML, not Qt.

Example:
    >>> overlay = PreviewOverlay(scene)
    >>> overlay.show(volume, axis=0, index=40, plane=labels_of_slice_40)
    >>> overlay.clear()
"""

from __future__ import annotations

import numpy as np
import slicer

from MedTLExtensionLib import mrml_bridge


class PreviewOverlay:
    """The preview label map of the volume being learned from.

    Args:
        scene: the MRML scene.
    """

    def __init__(self, scene: slicer.vtkMRMLScene) -> None:
        self.scene = scene
        self.node: slicer.vtkMRMLLabelMapVolumeNode | None = None
        self.shown = 0

    def show(self, volume: slicer.vtkMRMLScalarVolumeNode, *, axis: int, index: int, plane: np.ndarray) -> None:
        """Puts ``plane`` (the labels of slice ``index`` along array axis ``axis``, KJI) into the
        overlay; slices previewed before stay as they were last seen.

        Raises:
            ValueError: when the plane does not fit the volume's slice.
        """
        node = self._node_for(volume)
        voxels = slicer.util.arrayFromVolume(node)
        target = np.moveaxis(voxels, axis, 0)
        if not 0 <= index < target.shape[0] or plane.shape != target.shape[1:]:
            raise ValueError(f"preview slice {index} of shape {plane.shape} does not fit axis {axis} of {voxels.shape}")
        target[index] = plane
        slicer.util.arrayFromVolumeModified(node)
        self.shown += 1

    def clear(self) -> None:
        """Removes the overlay (the round ended; its prediction replaces it)."""
        node, self.node = self.node, None
        if node is not None and self.scene.GetNodeByID(node.GetID()) is node:
            self.scene.RemoveNode(node)

    def _node_for(self, volume: slicer.vtkMRMLScalarVolumeNode) -> slicer.vtkMRMLLabelMapVolumeNode:
        node = self.node
        dims = volume.GetImageData().GetDimensions()
        if node is not None and self.scene.GetNodeByID(node.GetID()) is node:
            if node.GetImageData().GetDimensions() == dims:
                return node
        self.clear()
        node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{volume.GetName()} MedTL preview")
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(mrml_bridge.ijk_to_ras_of(volume)))
        slicer.util.updateVolumeFromArray(node, np.zeros(dims[::-1], np.uint8))
        node.CreateDefaultDisplayNodes()
        node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
        self.node = node
        return node
