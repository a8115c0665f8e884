"""Volumes and label arrays to and from files, for handing them to the engine process and back.

Storage nodes of our own are used, outside the scene, so that a user's volume keeps its file
name and "modified" state, and nothing is left in the scene pointing at a temporary file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import slicer.util

from MedTLExtensionLib import mrml_bridge

__all__ = ["read_array", "write_array", "write_volume"]


def write_volume(volume_node: slicer.vtkMRMLScalarVolumeNode, path: str | Path) -> Path:
    """Writes a volume (voxels and geometry) to ``path`` (.nrrd, .nii.gz ...), uncompressed for speed."""
    path = Path(path)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(volume_node):
        raise RuntimeError(f"could not write volume {volume_node.GetName()!r} to {path}")
    return path


def write_array(array: np.ndarray, ijk_to_ras: np.ndarray, path: str | Path) -> Path:
    """Writes a KJI array with its IJK->RAS matrix to ``path``."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=float)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return write_volume(node, path)


def read_array(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(KJI array, IJK->RAS matrix) of an image file."""
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"could not read the image {path}")
    return mrml_bridge.volume_to_array(node)
