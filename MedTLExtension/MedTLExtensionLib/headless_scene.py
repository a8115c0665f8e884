"""A MRML scene with the module logics MedTL needs, without Slicer's Qt application.

Inside Slicer the application owns the scene and the logics (``slicer.mrmlScene``,
``slicer.modules.segmentations.logic()``); this module builds the same objects from the
``slicer-core`` wheel, the way trame-slicer does, so that the MRML bridge can be tested
and benchmarked headless.

Example:
    >>> from MedTLExtensionLib.headless_scene import create_headless_scene
    >>> headless = create_headless_scene()
    >>> node = headless.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
"""

from __future__ import annotations

from dataclasses import dataclass

import slicer

__all__ = ["HeadlessScene", "create_headless_scene"]


@dataclass(frozen=True)
class HeadlessScene:
    """A scene and the module logics attached to it.

    The logics must stay referenced for as long as the scene is used (they observe it),
    which is what holding them here is for.

    Attributes:
        scene: The MRML scene.
        application_logic: Application logic, with the module logics registered by their
            Slicer module names ("Colors", "Segmentations", "Volumes").
        color_logic: Colour logic; the default colour tables are in the scene.
        segmentations_logic: Logic of the Segmentations module.
        volumes_logic: Logic of the Volumes module.
    """

    scene: slicer.vtkMRMLScene
    application_logic: slicer.vtkSlicerApplicationLogic
    color_logic: slicer.vtkMRMLColorLogic
    segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic
    volumes_logic: slicer.vtkSlicerVolumesLogic


def _attach(logic, scene: slicer.vtkMRMLScene, application_logic, module_name: str) -> None:
    # The application logic must be known before the scene is set, because setting the
    # scene is what makes a logic register its node classes and observers.
    logic.SetMRMLApplicationLogic(application_logic)
    logic.SetMRMLScene(scene)
    application_logic.SetModuleLogic(module_name, logic)


def create_headless_scene() -> HeadlessScene:
    """Create a MRML scene with colour, segmentation and volume logics.

    Returns:
        The scene and its logics.

    Example:
        >>> headless = create_headless_scene()
        >>> headless.application_logic.GetModuleLogic("Segmentations") is not None
        True
    """
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)

    # The application logic's own colour logic is reused (rather than a second one, or
    # vtkSlicerColorLogic, which logs an error when no Slicer home directory exists):
    # attaching it to the scene adds the default colour tables that display nodes refer to.
    color_logic = application_logic.GetColorLogic()
    _attach(color_logic, scene, application_logic, "Colors")

    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    _attach(segmentations_logic, scene, application_logic, "Segmentations")

    volumes_logic = slicer.vtkSlicerVolumesLogic()
    _attach(volumes_logic, scene, application_logic, "Volumes")

    return HeadlessScene(
        scene=scene,
        application_logic=application_logic,
        color_logic=color_logic,
        segmentations_logic=segmentations_logic,
        volumes_logic=volumes_logic,
    )
