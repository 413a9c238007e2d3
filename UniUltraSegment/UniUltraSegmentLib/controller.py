"""The UniUltra interaction controller: everything the Segment Editor effect does, without Qt.

The effect (`SegmentEditorUniUltraLib/SegmentEditorEffect.py`) only translates PythonQt/VTK
events into the plain calls below and shows what they return; the tests drive the very same
object on the real Slicer core (`slicer-core`).  No Qt, no `slicer.app`, no threads.

Life cycle
----------
* **Prompts.**  A left-button *drag* is a box, a *click* is a point (positive, or negative while
  `negative_mode` is on).  Each prompt records the frame (cine) or slice (3D) it was made on.
  Modifier keys are left to Slicer (Shift moves the crosshair / pans, Ctrl+wheel zooms).
* **Work session.**  The first prompt captures the source volume, the view axis, and the
  segmentation node and segment to write into.  Later changes of the selected segment do not
  redirect the result; a change of source volume, segmentation node or scene ends the session.
* **Preview.**  Each prompt re-predicts the mask of its frame (synchronously: the bundled model
  answers in well under a second).  The preview is a segmentation node that is not saved with the
  scene and is removed on cancel, deactivate, source change and scene close.
* **Undo.**  `undo_prompt()` drops the last prompt (its frame is predicted again).  `apply()` is
  one undo step of the Segment Editor (3D/2D) or one `CineEdit` record (cine, see sequences.py).
* **Apply** writes each prompted frame's mask into *that* frame, whatever frame is shown now.
* **Propagate** follows the boxes through all frames/slices and writes back into the captured
  segmentation and segment, replacing only the frames the run covers.  Between frames it calls
  `pump()` so that the application can process events (the effect passes
  `slicer.app.processEvents`); `cancel()` stops it and nothing is written.

Writes go through `segments.write_masks(writer, ...)`, the single write path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import vtk

from .context import MRMLContext
from .logic import ViewTarget, validate_box
from .segments import labelmap_from_masks, write_masks
from .sequences import CineEdit, ensure_segmentation_sequence, needs_segmentation_sequence, write_cine_masks

PREVIEW_NAME = "UniUltra preview"
PREVIEW_SEGMENT = "preview"
DRAG_THRESHOLD_PX = 3  # display pixels: less is a click (a point), more is a drag (a box)

# Keys the effect hands to `key()`.  None of them is bound in slice views or by the Segment
# Editor (Slicer Docs: user_guide/user_interface.md "Slice views", modules/segmenteditor.md);
# "x" deletes the last point in Draw too.  Esc is *not* ours: the Segment Editor unselects the
# effect on Esc (qMRMLSegmentEditorWidget installs a QShortcut), and deactivate() then cancels.
KEY_UNDO_PROMPT = "x"
KEY_NEGATIVE = "n"
KEYS_APPLY = ("Return", "KP_Enter", "a")

Box = tuple[int, int, int, int]


@dataclass
class ViewEvent:
    """A mouse event in a slice view, in plain values.

    view: any hashable naming the view (the effect uses the slice node ID); slice_to_ras and
    slice_offset: the slice node's SliceToRAS (4x4) and GetSliceOffset(); ras: the event position
    in world RAS; xy: the position in display pixels (only used to tell a click from a drag)."""

    view: object
    slice_to_ras: object
    slice_offset: float | None
    ras: tuple[float, float, float]
    xy: tuple[int, int] | None = None


@dataclass
class Prompt:
    kind: str  # "box" | "point"
    frame: int  # cine frame, or slice index along the view axis (3D)
    value: tuple  # box (x0, y0, x1, y1) or point (x, y), frame pixels
    label: int = 1  # points: 1 positive, 0 negative


@dataclass
class Reply:
    """What the effect should show after a call."""

    handled: bool = False  # True: the event was ours (the effect aborts it for Slicer)
    rubber_band: tuple | None = None  # ((x0, y0), (x1, y1)) display pixels to draw, or None
    status: str = ""
    error: bool = False
    changed: bool = False  # prompts/preview changed: refresh buttons


@dataclass
class Session:
    """What the work is about, fixed at the first prompt."""

    volume: object
    axis: int
    seg_node: object
    segment_id: str
    target: ViewTarget  # geometry and cine of the first prompt's view
    prompts: list[Prompt] = field(default_factory=list)
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # frame -> predicted mask

    def frames(self) -> list[int]:
        return sorted({p.frame for p in self.prompts})

    def prompts_on(self, frame: int) -> list[Prompt]:
        return [p for p in self.prompts if p.frame == frame]


class Engine:
    """What the controller needs from a model (see engine.py for the real one): numpy in, numpy out."""

    def predict(self, image, boxes, points, labels) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def propagate(self, frames, key_boxes, direction="both", progress=None, cancel=None):  # pragma: no cover
        raise NotImplementedError


class InteractionController:
    """Prompts -> preview -> apply / propagate, for one Segment Editor (parameter node + writer).

    ctx: scene and logics; editor_node: the vtkMRMLSegmentEditorNode (source volume, segmentation,
    selected segment, masking); writer: the write route (`segments.SegmentEditor` or the effect's
    EffectWriter); get_engine: () -> Engine or None (None: not available, e.g. the user declined
    installing it); confirm: (question) -> bool, asked before a segmentation becomes per-frame.
    """

    def __init__(self, ctx: MRMLContext, editor_node, writer, get_engine: Callable[[], Engine | None],
                 confirm: Callable[[str], bool] = lambda question: True):
        self.ctx = ctx
        self.editor_node = editor_node
        self.writer = writer
        self.get_engine = get_engine
        self.confirm = confirm
        self.session: Session | None = None
        self.preview_node = None
        self.negative_mode = False
        self.apply_immediately = False
        self.busy = False
        self.last_cine_edit: CineEdit | None = None
        self._drag: ViewEvent | None = None
        self._cancel_requested = False
        self._scene_closing = False
        self._observations: list[tuple[object, int]] = []
        self._session_observations: list[tuple[object, int]] = []
        import slicer

        self._observe(ctx.scene, slicer.vtkMRMLScene.StartCloseEvent, "_on_scene_close")

    # ------------------------------------------------------------------ observers

    def _observe(self, obj, event, method_name: str, session: bool = False):
        # a weak reference: a VTK observer holding the controller would make a reference cycle
        # through C++ that Python's garbage collector cannot break safely
        ref = weakref.ref(self)

        def callback(caller, ev):
            controller = ref()
            if controller is not None:
                getattr(controller, method_name)()

        tag = obj.AddObserver(event, callback)
        (self._session_observations if session else self._observations).append((obj, tag))

    def _unobserve_session(self):
        for obj, tag in self._session_observations:
            obj.RemoveObserver(tag)
        self._session_observations = []

    def close(self) -> None:
        """Forget everything and stop observing (the effect's cleanup())."""
        self.reset()
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self._observations = []

    def _on_scene_close(self):
        self._cancel_requested = True
        self._scene_closing = True
        self._unobserve_session()
        self.session = None
        self._drag = None
        self.preview_node = None  # the scene removes it; it is never saved (SaveWithScene off)
        self._scene_closing = False

    # ------------------------------------------------------------------ state

    @property
    def has_prompts(self) -> bool:
        return self.session is not None and bool(self.session.prompts)

    @property
    def has_preview(self) -> bool:
        return self.session is not None and any(m is not None and m.any() for m in self.session.masks.values())

    @property
    def has_boxes(self) -> bool:
        return self.session is not None and any(p.kind == "box" for p in self.session.prompts)

    def prompts(self) -> list[Prompt]:
        return list(self.session.prompts) if self.session else []

    def preview_mask(self, frame: int | None = None) -> np.ndarray | None:
        """The predicted mask of `frame` (default: the last prompt's frame)."""
        if self.session is None or not self.session.prompts:
            return None
        frame = self.session.prompts[-1].frame if frame is None else frame
        return self.session.masks.get(frame)

    def reset(self, status: str = "") -> Reply:
        """Drop prompts and preview (Cancel button, deactivate, source volume change)."""
        self.session = None
        self._drag = None
        self._unobserve_session()
        self._remove_preview()
        return Reply(handled=True, status=status, changed=True)

    def source_changed(self) -> Reply:
        return self.reset("The source volume changed: prompts and preview were discarded.")

    def _check_session(self) -> None:
        """End the session when the editor now points at another volume or segmentation."""
        s = self.session
        if s is None:
            return
        node = self.editor_node
        if node.GetSourceVolumeNode() is not s.volume or node.GetSegmentationNode() is not s.seg_node \
                or s.seg_node.GetScene() is None or s.seg_node.GetSegmentation().GetSegment(s.segment_id) is None:
            self.reset()

    # ------------------------------------------------------------------ events

    def press(self, event: ViewEvent, button: str = "left", shift=False, ctrl=False, alt=False) -> Reply:
        if button != "left" or shift or ctrl or alt or self.busy:
            return Reply()  # Slicer's own: pan, zoom, crosshair, window/level, context menu
        self._drag = event
        return Reply(handled=True)

    def move(self, event: ViewEvent) -> Reply:
        if self._drag is None:
            return Reply()
        if event.view != self._drag.view:
            return Reply(handled=True)
        return Reply(handled=True, rubber_band=(self._drag.xy, event.xy) if event.xy and self._drag.xy else None)

    def release(self, event: ViewEvent, button: str = "left") -> Reply:
        start, self._drag = self._drag, None
        if start is None or button != "left":
            return Reply()
        if start.view != event.view:
            return Reply(handled=True, status="Draw the box inside one view.")
        try:
            target = self._target(event)
            a = np.array(target.geometry.ras_to_pixel(start.ras))
            b = np.array(target.geometry.ras_to_pixel(event.ras))
            if start.xy is not None and event.xy is not None:
                dragged = max(abs(start.xy[0] - event.xy[0]), abs(start.xy[1] - event.xy[1])) >= DRAG_THRESHOLD_PX
            else:
                dragged = float(np.abs(a - b).max()) >= 1.0
            if dragged:
                box = validate_box(target.geometry.ras_box_to_pixel_box(start.ras, event.ras), target.geometry.shape)
                prompt = Prompt("box", target.current_index, box)
            else:
                point = target.geometry.ras_to_pixel_int(event.ras)
                prompt = Prompt("point", target.current_index, point, 0 if self.negative_mode else 1)
        except ValueError as exc:
            return Reply(handled=True, status=str(exc), error=True)
        return self.add_prompt(target, prompt)

    def key(self, name: str) -> Reply:
        if self.busy:
            return Reply()
        if name == KEY_UNDO_PROMPT:
            return self.undo_prompt() if self.has_prompts else Reply()
        if name == KEY_NEGATIVE:
            return self.set_negative_mode(not self.negative_mode)
        if name in KEYS_APPLY and self.has_preview:
            return self.apply()
        return Reply()

    def set_negative_mode(self, on: bool) -> Reply:
        self.negative_mode = bool(on)
        kind = "negative (background)" if self.negative_mode else "positive (object)"
        return Reply(handled=True, status=f"Clicks add {kind} points.", changed=True)

    # ------------------------------------------------------------------ prompts and preview

    def _target(self, event: ViewEvent) -> ViewTarget:
        return ViewTarget.from_view(self.ctx, self.editor_node.GetSourceVolumeNode(), event.slice_to_ras,
                                    event.slice_offset)

    def add_prompt(self, target: ViewTarget, prompt: Prompt) -> Reply:
        """Add a prompt made on `target` (the view it was made in) and predict its frame."""
        self._check_session()
        s = self.session
        if s is not None and (target.volume is not s.volume or target.geometry.axis != s.axis):
            self.reset()  # another volume or another view direction: a new piece of work
            s = None
        if s is None:
            seg_node = self.editor_node.GetSegmentationNode()
            segment_id = self.editor_node.GetSelectedSegmentID()
            if seg_node is None or not segment_id:
                return Reply(handled=True, status="Select a segmentation and a segment first.", error=True)
            s = self.session = Session(target.volume, target.geometry.axis, seg_node, segment_id, target)
            if target.is_cine:  # show each frame's own preview while the user scrubs
                self._observe(target.cine.browser, vtk.vtkCommand.ModifiedEvent, "frame_shown_changed", session=True)
        s.prompts.append(prompt)
        reply = self._predict(prompt.frame)
        if reply.error:
            s.prompts.pop()
            self._predict(prompt.frame) if s.prompts_on(prompt.frame) else s.masks.pop(prompt.frame, None)
            return reply
        if self.apply_immediately:
            return self.apply()
        return reply

    def undo_prompt(self) -> Reply:
        """Remove the last prompt (before apply); its frame is predicted again without it."""
        s = self.session
        if s is None or not s.prompts:
            return Reply(status="No prompt to undo.")
        prompt = s.prompts.pop()
        if s.prompts_on(prompt.frame):
            reply = self._predict(prompt.frame)
        else:
            s.masks.pop(prompt.frame, None)
            self._show_preview()
            reply = Reply(handled=True, changed=True)
        reply.status = f"Removed the last {prompt.kind}." + (f" {reply.status}" if reply.status else "")
        if not s.prompts:
            self.reset()
        return reply

    def _predict(self, frame: int) -> Reply:
        s = self.session
        prompts = s.prompts_on(frame)
        engine = self.get_engine()
        if engine is None:
            return Reply(handled=True, status="The UniUltra model is not available (see the UniUltra Segment module).",
                         error=True)
        boxes = [p.value for p in prompts if p.kind == "box"]
        points = [p.value for p in prompts if p.kind == "point"]
        labels = [p.label for p in prompts if p.kind == "point"]
        if not boxes and not any(labels):
            s.masks[frame] = np.zeros(s.target.geometry.shape, bool)
            self._show_preview()
            return Reply(handled=True, changed=True, status="Add a box or a positive point: negative points alone mark nothing.")
        try:
            mask = np.asarray(engine.predict(s.target.frame(frame), boxes, points, labels), bool)
        except Exception as exc:  # noqa: BLE001 - the model's error goes to the user, the effect stays usable
            return Reply(handled=True, status=f"UniUltra could not segment: {exc}", error=True)
        if mask.shape != tuple(s.target.geometry.shape):
            return Reply(handled=True, status=f"The model returned a {mask.shape} mask for a {s.target.geometry.shape} image.",
                         error=True)
        s.masks[frame] = mask
        self._show_preview()
        where = f"frame {frame}" if s.target.is_cine else f"slice {frame}"
        return Reply(handled=True, changed=True,
                     status=f"Preview on {where}: {int(mask.sum())} pixels. Apply (Enter) writes it; x removes the last prompt.")

    # --- the preview node: never saved with the scene, removed with the session

    def _preview(self):
        import slicer

        node = self.preview_node
        if node is None or node.GetScene() is None:
            node = slicer.vtkMRMLSegmentationNode()
            node.SetName(PREVIEW_NAME)
            node.SetSaveWithScene(False)
            node.SetHideFromEditors(True)
            self.ctx.scene.AddNode(node)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetOpacity2DFill(0.4)
                display.SetSaveWithScene(False)
            node.GetSegmentation().AddEmptySegment(PREVIEW_SEGMENT, PREVIEW_SEGMENT, [1.0, 0.8, 0.0])
            self.preview_node = node
        return node

    def _show_preview(self) -> None:
        """Show the masks of the prompted frames: every slice at once (3D), the shown frame (cine)."""
        import slicer

        s = self.session
        if s is None:
            return
        if s.target.is_cine:
            shown = s.target.cine.current_frame
            masks = {0: s.masks[shown]} if shown in s.masks else {}
        else:
            masks = dict(s.masks)
        node = self._preview()
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not masks or not any(m.any() for m in masks.values()):
            logic.ClearSegment(node, PREVIEW_SEGMENT)
            return
        node.SetReferenceImageGeometryParameterFromVolumeNode(s.volume)
        logic.SetBinaryLabelmapToSegment(labelmap_from_masks(s.target.geometry, masks), node, PREVIEW_SEGMENT,
                                         logic.MODE_REPLACE)

    def frame_shown_changed(self) -> None:
        """The cine browser moved (the effect observes it): show that frame's preview, if any."""
        if self.session is not None and self.session.target.is_cine:
            self._show_preview()

    def _remove_preview(self) -> None:
        node, self.preview_node = self.preview_node, None
        if node is not None and node.GetScene() is not None and not self._scene_closing:
            node.GetScene().RemoveNode(node)

    # ------------------------------------------------------------------ apply

    def apply(self) -> Reply:
        """Write every prompted frame's mask into that frame of the captured segment."""
        self._check_session()
        s = self.session
        if s is None or not self.has_preview:
            return Reply(status="Nothing to apply: draw a box first.")
        masks = {f: m for f, m in s.masks.items() if m is not None and m.any()}
        if s.target.is_cine:
            reply = self._write_cine(masks, "add")
            if reply.error:
                return reply
            frames = reply.status
            self.reset()
            return Reply(handled=True, changed=True, status=f"Applied to {frames}. 'Undo last cine write' undoes it.")
        written = write_masks(self.writer, s.seg_node, s.segment_id, s.target.geometry, masks, "add")
        self.reset()
        where = "the image" if s.target.geometry.dims[s.axis] == 1 else f"slice(s) {', '.join(map(str, written))}"
        return Reply(handled=True, changed=True, status=f"Applied to {where}. Ctrl+Z undoes.")

    def _write_cine(self, masks: dict[int, np.ndarray], mode: str) -> Reply:
        s = self.session
        cine = s.target.cine
        seg_node = s.seg_node
        if needs_segmentation_sequence(cine, seg_node):
            question = (f"'{seg_node.GetName()}' holds one segmentation for all frames of '{cine.proxy.GetName()}'. "
                        "UniUltra writes each frame's mask into that frame, so the segmentation becomes one per "
                        "frame; every existing segment is copied to every frame. Continue?")
            if not self.confirm(question):
                return Reply(handled=True, status="Nothing was written (the segmentation stays one for all frames).",
                             error=True)
            name = seg_node.GetSegmentation().GetSegment(s.segment_id).GetName()
            ensure_segmentation_sequence(self.ctx, cine, seg_node, name)
        edit = write_cine_masks(self.ctx, self.writer, cine, seg_node, s.segment_id, s.target.geometry, masks, mode)
        self.last_cine_edit = edit
        frames = edit.frames_written
        return Reply(handled=True, status=f"frame{'s' if len(frames) != 1 else ''} {', '.join(map(str, frames))}")

    def undo_cine_write(self) -> Reply:
        if self.last_cine_edit is None:
            return Reply(status="No cine write to undo.")
        self.last_cine_edit.undo(self.ctx)
        self.last_cine_edit = None
        return Reply(handled=True, changed=True, status="The last cine write was undone.")

    # ------------------------------------------------------------------ propagation

    def cancel(self) -> None:
        """Stop a running propagation (the Stop button); nothing is written."""
        self._cancel_requested = True

    def propagate(self, direction: str = "both", progress: Callable[[float], None] | None = None,
                  pump: Callable[[], None] | None = None) -> Reply:
        """Follow the boxes through every frame (cine) or slice (3D) and write the result.

        progress(fraction) and pump() are called after every frame; pump lets the application
        process events (Stop button, repaint).  While it runs, `busy` is True and mouse and key
        events are left to Slicer.  The result goes to the segmentation and segment captured at
        the first prompt; frames the run covers are replaced, the others are untouched.

        This is `begin_propagation` + the engine's run + `finish_propagation` in one call (the
        desktop effect, on Slicer's main thread); a front end with an event loop of its own (the
        web app) runs the engine between the two on a worker thread instead.
        """
        job = self.begin_propagation(direction)
        if isinstance(job, Reply):
            return job

        def report(fraction):
            if progress is not None:
                progress(float(fraction))
            if pump is not None:
                pump()

        try:
            masks = job.run(report)
        except Exception as exc:  # noqa: BLE001 - reported, nothing written
            return self.propagation_failed(exc)
        return self.finish_propagation(job, masks)

    def propagation_failed(self, exc: BaseException) -> Reply:
        """The engine's run raised: nothing is written, the controller takes events again."""
        self.busy = False
        return Reply(status=f"Propagation failed: {exc}", error=True)

    def begin_propagation(self, direction: str = "both") -> PropagationJob | Reply:
        """Check the session and take the frames (numpy copies): a job whose `run` needs no MRML
        access, or the Reply saying why there is none.  `busy` is True until `finish_propagation`."""
        self._check_session()
        s = self.session
        if s is None or not self.has_boxes:
            return Reply(status="Draw a box on a key frame first.", error=True)
        if self.busy:
            return Reply(status="Already propagating.", error=True)
        engine = self.get_engine()
        if engine is None:
            return Reply(status="The UniUltra model is not available (see the UniUltra Segment module).", error=True)
        key_boxes: dict[int, list[Box]] = {}
        for p in s.prompts:
            if p.kind == "box":
                key_boxes.setdefault(p.frame, []).append(p.value)
        target = s.target
        frames = [target.frame(i) for i in range(target.count)]  # numpy copies, taken before any event runs
        self.busy = True
        self._cancel_requested = False
        return PropagationJob(s, engine, frames, key_boxes, direction, lambda: self._cancel_requested)

    def finish_propagation(self, job: PropagationJob, masks) -> Reply:
        """Write the masks of a finished job (nothing when it was cancelled or its session ended)."""
        self.busy = False
        s = job.session
        target = s.target
        frames = job.frames
        if self._cancel_requested or self.session is not s:
            return Reply(status="Propagation stopped: nothing was written.", changed=True)
        if s.seg_node.GetScene() is None or s.volume.GetScene() is None \
                or s.seg_node.GetSegmentation().GetSegment(s.segment_id) is None:
            self.reset()
            return Reply(status="The segmentation or segment was removed while propagating: nothing was written.",
                         error=True, changed=True)
        if self.editor_node.GetSegmentationNode() is not s.seg_node or self.editor_node.GetSourceVolumeNode() is not s.volume:
            # the editor's masking (editable area, intensity range) now describes other nodes
            self.reset()
            return Reply(status="The Segment Editor switched to another segmentation or image while propagating: "
                                "nothing was written. Select them again and propagate.", error=True, changed=True)
        if len(masks) != len(frames):
            return Reply(status=f"Propagation returned {len(masks)} masks for {len(frames)} frames.", error=True)
        covered = {i: m for i, m in enumerate(masks) if m is not None}
        if not covered:
            return Reply(status="Propagation found nothing to write.", changed=True)
        if target.is_cine:
            reply = self._write_cine(covered, "replace")
            if reply.error:
                return reply
            self.reset()
            return Reply(handled=True, changed=True,
                         status=f"Propagation wrote {len(covered)} frames. 'Undo last cine write' undoes it.")
        written = write_masks(self.writer, s.seg_node, s.segment_id, target.geometry, covered, "replace")
        self.reset()
        return Reply(handled=True, changed=True, status=f"Propagation wrote {len(written)} slices. Ctrl+Z undoes.")


@dataclass
class PropagationJob:
    """The engine's part of a propagation: frames and key boxes in, one mask (or None) per frame out.

    `run` touches no MRML node, so it may run on a worker thread; `cancel` is the controller's
    Stop flag (`InteractionController.cancel()`)."""

    session: Session
    engine: Engine
    frames: list
    key_boxes: dict
    direction: str
    cancel: Callable[[], bool]

    def run(self, progress: Callable[[float], None] | None = None) -> list:
        return self.engine.propagate(self.frames, self.key_boxes, direction=self.direction, progress=progress,
                                     cancel=self.cancel)
