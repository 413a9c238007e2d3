"""UniUltra Web: the trame app (UI, uploads, playback, propagation on a worker thread).

One process serves one scene (trame shares its state between every tab of a process): run one
process per user through trame's launcher (README, "UniUltra Web").
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from trame.app import TrameApp
from trame_client.widgets import html
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
from trame_vuetify.widgets import vuetify3 as v3
from UniUltraSegmentLib.controller import Reply

from .effect import UniUltraEffect
from .files import FileCatalog, UploadError, save_upload
from .session import WebSession, usable_models

log = logging.getLogger("uniultra.web")

BIG = {"size": "x-large", "block": True, "class": "my-1", "style": "min-height: 56px"}  # touch targets


class UniUltraWebApp(TrameApp):
    def __init__(self, server=None, *, catalog: FileCatalog, model: str, device: str = "cpu",
                 workdir: str | Path, out_dir: str | Path, max_upload_mb: float = 100.0, engine_factory=None):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.catalog = catalog
        self.workdir = Path(workdir)
        self.out_dir = Path(out_dir)
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.slicer_app = SlicerApp()
        # no per-view gutter (trame-slicer's default adds 3D/layout buttons and a second slice slider)
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=lambda *_: None)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        # lazy: only the views of the layout in use are created (one Red slice view)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration(), lazy_initialization=True)
        self.layout_manager.set_layout("Axial Only")
        self.session = WebSession(self.slicer_app, model, device, self.workdir, engine_factory=engine_factory)
        self.effect = self.slicer_app.segmentation_editor.get_effect(UniUltraEffect)
        self.effect.session = self.session
        self.effect.on_reply = self._on_effect_reply
        self._play_task = None
        self._propagation_task = None
        self._open_path = None
        self._init_state()
        self._build_ui()  # creates the Red view (lazy layout)
        self.session.red_view().get_view_node().AddObserver("ModifiedEvent", self._on_slice_node_modified)

    # ------------------------------------------------------------------ state

    def _init_state(self):
        s = self.state
        s.trame__title = "UniUltra Web"
        s.status, s.status_error = "Open an image.", False
        s.files = [{"title": name, "value": i} for i, name in enumerate(self.catalog.names())]
        s.file_index = None
        s.upload = None
        s.models = usable_models() if self.session._engine_factory is None else [self.session.model]
        if self.session.model not in s.models:
            s.models = [self.session.model, *s.models]
        s.model = self.session.model
        s.segments, s.segment_id, s.new_segment = [], None, ""
        s.negative, s.apply_immediately = False, False
        s.frame, s.frame_count, s.playing, s.kind = 0, 0, False, ""
        s.direction = "both"
        s.propagating, s.progress = False, 0
        s.can_apply = s.can_undo_prompt = s.can_redo_prompt = s.can_cancel = False
        s.can_undo = s.can_redo = s.can_propagate = False
        s.mask_pixels, s.result_seq, s.predict_ms = 0, 0, 0
        s.exported = []
        s.editable_area, s.overwrite = "everywhere", "all"
        s.frame_display = None

    def _frame_display(self):
        """Where the shown frame's pixel centres (0, 0) and (W-1, H-1) are in the view (display pixels,
        VTK origin bottom left), with the frame and view sizes: tests and the benchmark map frame
        pixels to page coordinates with it."""
        import numpy as np
        from UniUltraSegmentLib.geometry import slice_geometry, vtk_matrix_to_numpy

        ses = self.session
        if ses.loaded is None:
            return None
        node = ses.red_view().get_view_node()
        g = slice_geometry(ses.loaded.volume, vtk_matrix_to_numpy(node.GetSliceToRAS()))
        h, w = g.shape
        inv = np.linalg.inv(vtk_matrix_to_numpy(node.GetXYToRAS()))
        x0, y0 = (inv @ np.array([*g.pixel_to_ras(0, 0), 1.0]))[:2]
        x1, y1 = (inv @ np.array([*g.pixel_to_ras(w - 1, h - 1), 1.0]))[:2]
        vw, vh = node.GetDimensions()[:2]
        return {"x0": float(x0), "y0": float(y0), "x1": float(x1), "y1": float(y1), "w": w, "h": h,
                "vw": int(vw), "vh": int(vh)}

    def _on_slice_node_modified(self, *_):
        fd = self._frame_display()
        if fd != self.state.frame_display:
            with self.state:
                self.state.frame_display = fd

    def _refresh(self, reply: Reply | None = None):
        """Push the session's state to the browser (and a controller reply's status)."""
        s, ses = self.state, self.session
        c = ses.controller
        if reply is not None and (reply.status or reply.error):
            s.status, s.status_error = reply.status, bool(reply.error)
        busy = s.propagating
        s.can_apply = not busy and c is not None and c.has_preview
        s.can_undo_prompt = not busy and c is not None and c.has_prompts
        s.can_redo_prompt = not busy and bool(ses._redo_prompts)
        s.can_cancel = s.can_undo_prompt
        s.can_propagate = not busy and c is not None and c.has_boxes and ses.frame_count() > 1
        s.can_undo = not busy and ses.undo_stack.can_undo()
        s.can_redo = not busy and ses.undo_stack.can_redo()
        s.negative = bool(c.negative_mode) if c is not None else False
        if ses.loaded is not None:
            s.segments = [{"title": x["name"], "value": x["id"], "color": x["color"]} for x in ses.segments()]
            s.segment_id = ses.selected_segment
            s.frame_count = ses.frame_count()
            s.frame = ses.current_frame()
            try:
                s.mask_pixels = int(ses.segment_mask().sum())
            except Exception:  # noqa: BLE001 - a count for the UI only
                s.mask_pixels = 0
        s.frame_display = self._frame_display()
        s.result_seq += 1
        s.flush()

    def _on_effect_reply(self, reply: Reply):
        self.state.predict_ms = int(self.session.last_release_ms)
        self._refresh(reply)

    # ------------------------------------------------------------------ UI

    def _build_ui(self):
        with SinglePageWithDrawerLayout(self.server, theme=("'dark'",)) as layout:
            layout.title.set_text("UniUltra Web")
            layout.drawer.width = 390
            with layout.toolbar:
                v3.VSpacer()
                v3.VSelect(label="Image", items=("files",), v_model=("file_index",), density="compact",
                           hide_details=True, style="max-width: 320px", classes="mx-2", id="file-select")
                v3.VFileInput(label="Upload", v_model=("upload",), density="compact", hide_details=True,
                              accept=",".join(self.catalog.extensions), style="max-width: 220px", classes="mx-2",
                              id="upload")
                v3.VSelect(label="Model", items=("models",), v_model=("model",), density="compact",
                           hide_details=True, style="max-width: 240px", classes="mx-2", id="model-select")
            with layout.drawer:
                with v3.VContainer(classes="pa-2"):
                    v3.VSelect(label="Segment", items=("segments",), v_model=("segment_id",), hide_details=True,
                               id="segment-select")
                    with html.Div(classes="d-flex align-center my-1"):
                        v3.VTextField(label="New segment", v_model=("new_segment",), hide_details=True,
                                      density="compact", id="new-segment")
                        v3.VBtn("Add", click=self.ctrl.add_segment, classes="ml-2", size="large", id="btn-add-segment")
                    v3.VSwitch(label="Negative points (background)", v_model=("negative",), hide_details=True,
                               color="red", id="sw-negative")
                    v3.VSwitch(label="Apply immediately (no preview)", v_model=("apply_immediately",),
                               hide_details=True, id="sw-immediate")
                    v3.VBtn("Apply", click=self.ctrl.apply, disabled=("!can_apply",), color="primary", id="btn-apply",
                            **BIG)
                    with html.Div(classes="d-flex"):
                        v3.VBtn("Undo prompt", click=self.ctrl.undo_prompt, disabled=("!can_undo_prompt",),
                                id="btn-undo-prompt", size="x-large", classes="flex-grow-1 mr-1 my-1")
                        v3.VBtn("Redo prompt", click=self.ctrl.redo_prompt, disabled=("!can_redo_prompt",),
                                id="btn-redo-prompt", size="x-large", classes="flex-grow-1 my-1")
                    v3.VBtn("Cancel prompts", click=self.ctrl.cancel_prompts, disabled=("!can_cancel",),
                            id="btn-cancel", **BIG)
                    with html.Div(classes="d-flex"):
                        v3.VBtn("Undo", click=self.ctrl.undo, disabled=("!can_undo",), id="btn-undo",
                                prepend_icon="mdi-undo", size="x-large", classes="flex-grow-1 mr-1 my-1")
                        v3.VBtn("Redo", click=self.ctrl.redo, disabled=("!can_redo",), id="btn-redo",
                                prepend_icon="mdi-redo", size="x-large", classes="flex-grow-1 my-1")
                    v3.VDivider(classes="my-2")
                    v3.VSelect(label="Propagation", items=("['both', 'forward', 'backward']",),
                               v_model=("direction",), hide_details=True, density="compact")
                    v3.VBtn("Propagate", click=self.ctrl.propagate, disabled=("!can_propagate",),
                            v_show="!propagating", id="btn-propagate", **BIG)
                    v3.VBtn("Stop", click=self.ctrl.stop, v_show="propagating", color="red", id="btn-stop", **BIG)
                    v3.VProgressLinear(model_value=("progress",), v_show="propagating", height=10, id="progress")
                    v3.VDivider(classes="my-2")
                    v3.VSelect(label="Editable area", v_model=("editable_area",),
                               items=("['everywhere', 'inside_all', 'inside_visible', 'outside_all', 'outside_visible']",),
                               hide_details=True, density="compact")
                    v3.VSelect(label="Overwrite other segments", v_model=("overwrite",),
                               items=("['all', 'visible', 'none']",), hide_details=True, density="compact")
                    v3.VDivider(classes="my-2")
                    v3.VBtn("Export masks (PNG)", click=self.ctrl.export_png, disabled=("frame_count == 0",),
                            id="btn-export", **BIG)
                    v3.VBtn("Save segmentation (.seg.nrrd)", click=self.ctrl.save_seg, disabled=("frame_count == 0",),
                            id="btn-save", **BIG)
                    html.Div("{{ status }}", id="status", classes="text-body-1 mt-2",
                             style=("status_error ? 'color: #ff6b6b' : ''",))
                    html.Div("mask pixels on this frame: {{ mask_pixels }}", id="mask-pixels",
                             classes="text-caption")
                    html.Div("{{ exported.join(', ') }}", id="exported", classes="text-caption")
            with layout.content:
                with html.Div(style="position: relative; width: 100%; height: calc(100vh - 130px)", id="viewer"):
                    self.layout_manager.initialize_layout_grid(layout)
                with html.Div(v_show="frame_count > 1"), html.Div(classes="d-flex align-center px-4",
                                                                   style="height: 64px"):
                    v3.VBtn(icon=("playing ? 'mdi-pause' : 'mdi-play'",), click=self.ctrl.toggle_play, size="large",
                            id="btn-play")
                    v3.VSlider(v_model=("frame",), min=0, max=("frame_count - 1",), step=1, hide_details=True,
                               thumb_label=True, classes="mx-4", id="frame-slider")
                    html.Div("{{ frame + 1 }} / {{ frame_count }}", id="frame-label")
        self.ui = layout
        c = self.ctrl
        c.add_segment = self.add_segment
        c.apply = lambda: self._do(self.session.apply)
        c.undo_prompt = lambda: self._do(self.session.undo_prompt)
        c.redo_prompt = lambda: self._do(self.session.redo_prompt)
        c.cancel_prompts = lambda: self._do(self.session.cancel_prompts)
        c.undo = lambda: self._do(self.session.undo)
        c.redo = lambda: self._do(self.session.redo)
        c.propagate = self.propagate
        c.stop = self.stop
        c.export_png = self.export_png
        c.save_seg = self.save_seg
        c.toggle_play = self.toggle_play
        self.state.change("file_index")(self._on_file_index)
        self.state.change("upload")(self._on_upload)
        self.state.change("model")(self._on_model)
        self.state.change("segment_id")(self._on_segment)
        self.state.change("negative")(self._on_negative)
        self.state.change("apply_immediately")(self._on_immediate)
        self.state.change("frame")(self._on_frame)
        self.state.change("editable_area", "overwrite")(self._on_masking)

    # ------------------------------------------------------------------ actions

    def _do(self, call):
        if self.state.propagating:
            return
        t0 = time.perf_counter()
        reply = call()
        self.state.predict_ms = int(1000 * (time.perf_counter() - t0))
        self._refresh(reply)

    def open_index(self, index: int) -> None:
        path = self.catalog.path(index)  # KeyError/IndexError for anything not in the listing
        self._open(path)

    def _open(self, path: Path) -> None:
        from uniultra.errors import InputError

        self._stop_play()
        self._open_path = path
        try:
            loaded = self.session.open(path)
        except InputError as exc:
            self._refresh(Reply(status=str(exc), error=True))
            return
        self.slicer_app.segmentation_editor.set_active_effect(self.effect)
        self.session.set_apply_immediately(self.state.apply_immediately)
        self.state.kind = loaded.kind
        what = {"cine": f"a cine of {loaded.frame_count} frames", "volume": f"a volume of {loaded.frame_count} slices",
                "image": "an image"}[loaded.kind]
        self._refresh(Reply(status=f"Opened {loaded.name}: {what}. Drag a box around the object; tap for a point."))

    def _on_file_index(self, file_index, **_):
        if file_index is None:
            return
        try:
            if self._open_path is not None and self.catalog.path(int(file_index)) == self._open_path:
                return  # already open (the state echoing the start-up file)
            self.open_index(int(file_index))
        except (KeyError, IndexError, ValueError, TypeError):
            self._refresh(Reply(status="That file is not in the list.", error=True))

    def _on_upload(self, upload, **_):
        if not upload:
            return
        files = upload if isinstance(upload, list) else [upload]
        try:
            path = save_upload(files[0], self.workdir / "uploads", self.catalog.extensions, self.max_upload_bytes)
        except UploadError as exc:
            self._refresh(Reply(status=str(exc), error=True))
            return
        finally:
            self.state.upload = None
        self._open(path)

    def _on_model(self, model, **_):
        if model and model != self.session.model:
            self._refresh(self.session.set_model(model))

    def _on_segment(self, segment_id, **_):
        if segment_id and self.session.loaded is not None and segment_id != self.session.selected_segment:
            try:
                self.session.select_segment(segment_id)
            except ValueError:  # a segment of the previous file still in the browser's state
                pass
            self._refresh()

    def add_segment(self):
        name = (self.state.new_segment or "").strip()
        if self.session.loaded is None:
            return
        if not name:
            name = f"segment {len(self.session.segments()) + 1}"
        self.session.add_segment(name[:64])
        self.state.new_segment = ""
        self._refresh(Reply(status=f"Segment '{name[:64]}' selected."))

    def _on_negative(self, negative, **_):
        if self.session.controller is not None and bool(negative) != self.session.controller.negative_mode:
            self._refresh(self.session.set_negative(bool(negative)))

    def _on_immediate(self, apply_immediately, **_):
        self.session.set_apply_immediately(bool(apply_immediately))

    def _on_masking(self, editable_area, overwrite, **_):
        from UniUltraSegmentLib.segments import MASK_MODES, OVERWRITE_MODES

        if editable_area in MASK_MODES and overwrite in OVERWRITE_MODES and editable_area != "inside_segment":
            self.session.set_masking(editable_area, overwrite)

    def _on_frame(self, frame, **_):
        if self.session.loaded is None or frame is None:
            return
        if int(frame) != self.session.current_frame():
            self.session.set_frame(int(frame))
            self._refresh()

    # --- cine playback

    def toggle_play(self):
        if self._play_task is not None:
            self._stop_play()
        else:
            self.state.playing = True
            self._play_task = asyncio.ensure_future(self._play())

    def _stop_play(self):
        if self._play_task is not None:
            self._play_task.cancel()
            self._play_task = None
        self.state.playing = False

    async def _play(self):
        loaded = self.session.loaded
        dt = 0.1
        if loaded is not None and loaded.cine is not None:
            seq = loaded.cine.sequence
            try:
                if seq.GetNumberOfDataNodes() > 1 and seq.GetIndexUnit() == "s":
                    dt = max(float(seq.GetNthIndexValue(1)) - float(seq.GetNthIndexValue(0)), 0.03)
            except ValueError:
                pass
        try:
            while True:
                n = self.session.frame_count()
                if n <= 1:
                    break
                with self.state:
                    self.state.frame = (self.state.frame + 1) % n
                await asyncio.sleep(dt)
        except asyncio.CancelledError:
            pass

    # --- propagation: the engine runs on a worker thread, the write on the event loop

    def propagate(self):
        if self._propagation_task is None:
            self._propagation_task = asyncio.ensure_future(self._propagate())

    def stop(self):
        if self.session.controller is not None:
            self.session.controller.cancel()

    async def _propagate(self):
        try:
            self._stop_play()
            job = self.session.begin_propagation(self.state.direction)
            if isinstance(job, Reply):
                self._refresh(job)
                return
            with self.state:
                self.state.propagating, self.state.progress = True, 0
                self.state.status, self.state.status_error = "Propagating... (Stop ends it; nothing is written then)", False
            loop = asyncio.get_running_loop()

            def progress(fraction):
                loop.call_soon_threadsafe(self._set_progress, fraction)

            try:
                masks = await loop.run_in_executor(None, job.run, progress)
            except Exception as exc:  # noqa: BLE001
                reply = self.session.controller.propagation_failed(exc)
            else:
                reply = self.session.finish_propagation(job, masks)
            self.state.propagating = False
            self._refresh(reply)
        finally:
            self._propagation_task = None

    def _set_progress(self, fraction):
        with self.state:
            self.state.progress = int(100 * fraction)

    # --- export

    def _export(self, what, call):
        if self.session.loaded is None:
            return
        folder = self.out_dir
        try:
            paths = call(folder)
        except (ValueError, OSError) as exc:
            self._refresh(Reply(status=f"Could not {what}: {exc}", error=True))
            return
        self.state.exported = [p.name for p in paths[:5]] + ([f"... {len(paths)} files"] if len(paths) > 5 else [])
        self._refresh(Reply(status=f"Wrote {len(paths)} file(s) to {folder}."))

    def export_png(self):
        self._export("export the masks", self.session.export_masks)

    def save_seg(self):
        self._export("save the segmentation", self.session.save_segmentation)


def configure_rendering() -> None:
    """Off-screen rendering without a display: Mesa EGL (no X probe, no Xvfb)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
