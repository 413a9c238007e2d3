"""The UniUltra effect in trame-slicer: slice-view events -> the project's InteractionController.

trame-slicer effects are a different API from Slicer's scripted effects (the desktop file cannot
be reused), so this is the web counterpart of `SegmentEditorUniUltraLib/SegmentEditorEffect.py`:
it only translates events and draws the rubber band; every decision is the controller's.

Event path (trame-slicer 2.0): browser pointer event -> trame-rca's vtk.js interactor -> websocket
-> `vtkRemoteInteractionAdapter` -> the server's vtkRenderWindowInteractor ->
`vtkMRMLSliceViewInteractorStyle` -> LayerDM pipeline manager -> `ProcessInteractionEvent` below.
Touch and pen drags arrive as left-button press/move/release.

Display -> RAS is `slice_node.GetXYToRAS()` applied to (x, y, 0, 1), as the desktop effect's
`xyToRas` (Slicer's AbstractScriptedSegmentEditorEffect.xyToRas).
"""

from __future__ import annotations

from collections.abc import Callable

import vtk
from slicer import vtkMRMLAbstractViewNode, vtkMRMLNode, vtkMRMLSliceNode
from trame_slicer.segmentation import SegmentationEffect, SegmentationEffectPipeline
from UniUltraSegmentLib.rubber_band import RubberBand

# vtkEvent modifier bits (vtkEvent.h: ShiftModifier 1, ControlModifier 2, AltModifier 4)
SHIFT, CTRL, ALT = 1, 2, 4


class UniUltraEffect(SegmentationEffect):
    """Registered on trame-slicer's SegmentationEditor; `session` (a WebSession) receives the events."""

    session = None  # set by the app before activation
    on_reply: Callable | None = None  # called with each controller Reply (UI update)

    def _create_pipeline(self, view_node: vtkMRMLAbstractViewNode, _parameter: vtkMRMLNode):
        if isinstance(view_node, vtkMRMLSliceNode):
            return UniUltraPipeline()
        return None  # 3D views: no prompts


class UniUltraPipeline(SegmentationEffectPipeline):
    def __init__(self):
        super().__init__()
        self._renderer = None
        self._band = RubberBand(line_width=3)  # the desktop effect's rubber band, a bit thicker for touch

    # --- LayerDM pipeline API (LayerDMLib/vtkMRMLLayerDMScriptedPipeline.py)

    def OnRendererAdded(self, renderer) -> None:
        if renderer is not None:
            renderer.AddViewProp(self._band.actor)
        self._renderer = renderer

    def OnRendererRemoved(self, renderer) -> None:
        if renderer is not None:
            renderer.RemoveViewProp(self._band.actor)
        self._renderer = None

    def CanProcessInteractionEvent(self, event_data) -> tuple[bool, float]:
        ok = bool(self.IsActive()) and event_data.GetType() in (
            vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.MouseMoveEvent, vtk.vtkCommand.LeftButtonReleaseEvent)
        return ok, 0.0

    def ProcessInteractionEvent(self, event_data) -> bool:
        effect = self._effect
        session = getattr(effect, "session", None)
        slice_node = self.GetViewNode()
        if session is None or not isinstance(slice_node, vtkMRMLSliceNode):
            return False
        kind = event_data.GetType()
        xy = event_data.GetDisplayPosition()
        if kind == vtk.vtkCommand.LeftButtonPressEvent:
            mods = event_data.GetModifiers()
            reply = session.press(slice_node, xy, bool(mods & SHIFT), bool(mods & CTRL), bool(mods & ALT))
        elif kind == vtk.vtkCommand.MouseMoveEvent:
            reply = session.move(slice_node, xy)
            if reply.rubber_band is not None:
                self._draw(*reply.rubber_band)
            return reply.handled
        elif kind == vtk.vtkCommand.LeftButtonReleaseEvent:
            self._hide()
            reply = session.release(slice_node, xy)
        else:
            return False
        if effect.on_reply is not None and (reply.status or reply.changed):
            effect.on_reply(reply)
        self.RequestRender()
        return reply.handled

    def SetActive(self, isActive: bool):
        super().SetActive(isActive)
        if not isActive:
            self._hide()

    # --- rubber band

    def _draw(self, xy0, xy1) -> None:
        self._band.show(xy0, xy1)
        self.RequestRender()

    def _hide(self) -> None:
        if self._band.hide():
            self.RequestRender()
