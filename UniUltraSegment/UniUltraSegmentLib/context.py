"""The MRML scene and the module logics UniUltra needs, inside or outside the Slicer application.

Inside Slicer the application already owns a scene and the Segmentations/Sequences logics.
Outside (tests, scripts with `slicer-core` from PyPI) they must be created, and the
Segmentations logic must be registered on a `vtkSlicerApplicationLogic` or segments cannot
get a binary-labelmap representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class MRMLContext:
    scene: Any
    app_logic: Any
    segmentations_logic: Any
    sequences_logic: Any


def create_context(scene=None, register_converters: bool = True) -> MRMLContext:
    """A fresh scene (or `scene`) with application, Segmentations and Sequences logics, no Qt.

    register_converters=False (inside Slicer): make no second Segmentations logic.  Its
    SetMRMLScene appends the segmentation converter rules to the process-wide
    vtkSegmentationConverterFactory again (vtkSlicerSegmentationsModuleLogic::RegisterNodes), and
    the application's own Segmentations module has registered them already."""
    import slicer

    if scene is None:
        scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    seg_logic = None
    if register_converters:
        seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        seg_logic.SetMRMLApplicationLogic(app)
        seg_logic.SetMRMLScene(scene)
        app.SetModuleLogic("Segmentations", seg_logic)
    seq_logic = slicer.vtkSlicerSequencesLogic()
    seq_logic.SetMRMLApplicationLogic(app)
    seq_logic.SetMRMLScene(scene)
    app.SetModuleLogic("Sequences", seq_logic)
    return MRMLContext(scene, app, seg_logic, seq_logic)


def slicer_app_context() -> MRMLContext:
    """The running Slicer application's scene and logics (only inside Slicer)."""
    import slicer

    return MRMLContext(
        slicer.mrmlScene,
        slicer.app.applicationLogic(),
        slicer.modules.segmentations.logic(),
        slicer.modules.sequences.logic(),
    )
