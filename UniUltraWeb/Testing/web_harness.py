"""Drive UniUltra Web's event path without a browser, and the desktop controller path beside it.

`WebHarness`: trame-slicer's SlicerApp with one off-screen Red slice view (DirectViewFactory), the
UniUltra effect active, and synthetic VTK interactor events (press / move / release at display
pixels): the same route a browser's pointer events take after trame-rca hands them to the
server's vtkRenderWindowInteractor (vtkMRMLSliceViewInteractorStyle -> LayerDM -> the pipeline).

`DesktopPath`: what the desktop effect does, as the project's controller tests drive it: a plain
slicer-core scene, the `segments.SegmentEditor` writer (vtkSlicerSegmentEditorLogic and its undo
history) and ViewEvents built from frame pixels.
"""

from __future__ import annotations

import numpy as np
from stand_in_engine import StandInEngine  # noqa: F401  (Testing/, on the path: the desktop tests' stand-in)


class WebHarness:
    def __init__(self, engine, size=(720, 540)):
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
        from uniultra_web.effect import UniUltraEffect
        from uniultra_web.session import WebSession

        self.app = SlicerApp()
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.view = self.app.view_manager.create_view(ViewLayoutDefinition.axial_view())
        self.view.render_window().SetSize(*size)
        self.view.interactor().SetSize(*size)
        self.session = WebSession(self.app, "stand-in", engine_factory=lambda name: engine)
        self.effect = self.app.segmentation_editor.get_effect(UniUltraEffect)
        self.effect.session = self.session
        self.replies = []
        self.effect.on_reply = self.replies.append

    def open(self, path):
        loaded = self.session.open(path)
        self.app.segmentation_editor.set_active_effect(self.effect)
        self.view.render()
        return loaded

    @property
    def slice_node(self):
        return self.view.get_view_node()

    def slice_to_ras(self) -> np.ndarray:
        from UniUltraSegmentLib.geometry import vtk_matrix_to_numpy

        return vtk_matrix_to_numpy(self.slice_node.GetSliceToRAS())

    def geometry(self):
        from UniUltraSegmentLib.geometry import slice_geometry

        return slice_geometry(self.session.loaded.volume, self.slice_to_ras())

    def display_xy(self, col: float, row: float) -> tuple[int, int]:
        """Display pixel of frame pixel (col, row) on the shown slice (inverse of XYToRAS).

        Display pixels are integers, as in a browser: the view is large enough (over one display
        pixel per image pixel) for them to land back on the same frame pixel."""
        from UniUltraSegmentLib.geometry import vtk_matrix_to_numpy

        ras = self.geometry().pixel_to_ras(col, row)
        xy = np.linalg.inv(vtk_matrix_to_numpy(self.slice_node.GetXYToRAS())) @ np.array([*ras, 1.0])
        return int(round(xy[0])), int(round(xy[1]))

    def _event(self, name: str, xy, shift=False):
        import vtk

        iren = self.view.interactor()
        iren.SetEventInformation(int(xy[0]), int(xy[1]), 0, int(shift))
        iren.InvokeEvent(getattr(vtk.vtkCommand, name))

    def drag(self, a, b, steps: int = 4):
        """A left-button drag from frame pixel a to b (through display pixels)."""
        xa, xb = np.array(self.display_xy(*a), float), np.array(self.display_xy(*b), float)
        self._event("LeftButtonPressEvent", xa)
        for t in np.linspace(0, 1, steps + 1)[1:]:
            self._event("MouseMoveEvent", xa + t * (xb - xa))
        self._event("LeftButtonReleaseEvent", xb)

    def click(self, p):
        xy = self.display_xy(*p)
        self._event("LeftButtonPressEvent", xy)
        self._event("LeftButtonReleaseEvent", xy)

    def segment(self, name: str = "lesion") -> np.ndarray:
        from UniUltraSegmentLib.segments import segment_array

        seg = self.session.seg_node
        sid = seg.GetSegmentation().GetSegmentIdBySegmentName(name)
        return segment_array(seg, sid, self.session.loaded.volume)

    def cine_masks(self, name: str = "lesion") -> list[np.ndarray]:
        from UniUltraSegmentLib.sequences import cine_frame_masks

        seg = self.session.seg_node
        sid = seg.GetSegmentation().GetSegmentIdBySegmentName(name)
        if self.session.loaded.cine.browser.GetSequenceNode(seg) is None:
            return [np.zeros(self.geometry().shape, bool)] * self.session.frame_count()
        return cine_frame_masks(self.session.loaded.cine, seg, sid, self.geometry())


class DesktopPath:
    """The desktop effect's controller on a plain slicer-core scene (as Testing/test_mrml_logic.py)."""

    def __init__(self, path, engine, slice_to_ras: np.ndarray, segment: str = "lesion"):
        from uniultra_web.loaders import open_file
        from UniUltraSegmentLib.context import create_context
        from UniUltraSegmentLib.controller import InteractionController
        from UniUltraSegmentLib.segments import SegmentEditor, create_segmentation_for, get_or_add_segment

        self.ctx = create_context()
        self.loaded = open_file(self.ctx, path)
        self.seg = create_segmentation_for(self.ctx, self.loaded.volume)
        sid = get_or_add_segment(self.seg, segment)
        self.editor = SegmentEditor(self.ctx)
        self.editor.configure(self.seg, self.loaded.volume, sid)
        self.controller = InteractionController(self.ctx, self.editor.node, self.editor, lambda: engine)
        self.s2r = np.array(slice_to_ras, float)

    def geometry(self):
        from UniUltraSegmentLib.geometry import slice_geometry

        return slice_geometry(self.loaded.volume, self.s2r)

    def select(self, name: str) -> str:
        from UniUltraSegmentLib.segments import get_or_add_segment

        sid = get_or_add_segment(self.seg, name)
        self.editor.node.SetSelectedSegmentID(sid)
        return sid

    def _ev(self, p, xy):
        from UniUltraSegmentLib.controller import ViewEvent

        return ViewEvent("Red", self.s2r, None, tuple(self.geometry().pixel_to_ras(*p)), xy)

    def drag(self, a, b):
        c = self.controller
        c.press(self._ev(a, (0, 0)))
        c.move(self._ev(b, (40, 30)))
        return c.release(self._ev(b, (40, 30)))

    def click(self, p):
        self.controller.press(self._ev(p, (10, 10)))
        return self.controller.release(self._ev(p, (10, 10)))

    def segment(self, name: str = "lesion") -> np.ndarray:
        from UniUltraSegmentLib.segments import segment_array

        sid = self.seg.GetSegmentation().GetSegmentIdBySegmentName(name)
        return segment_array(self.seg, sid, self.loaded.volume)

    def cine_masks(self, name: str = "lesion") -> list[np.ndarray]:
        from UniUltraSegmentLib.sequences import cine_frame_masks

        sid = self.seg.GetSegmentation().GetSegmentIdBySegmentName(name)
        if self.loaded.cine.browser.GetSequenceNode(self.seg) is None:
            return [np.zeros(self.geometry().shape, bool)] * self.loaded.cine.num_frames
        return cine_frame_masks(self.loaded.cine, self.seg, sid, self.geometry())
