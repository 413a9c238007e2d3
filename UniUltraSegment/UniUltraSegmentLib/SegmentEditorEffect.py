"""Segment Editor effect "UniUltra": box / point prompts -> SAM2-based mask, preview, apply, propagate.

Qt layer only: it collects clicks and settings, shows a rubber band and a preview, and runs
inference on a worker thread where only numpy crosses threads.  Geometry, masks into
segments and cine handling live in the Qt-free logic (UniUltraSegmentLib.logic) and are
tested against the real Slicer core.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from UniUltraSegmentLib.logic import Prompts, ViewTarget, frames_for_propagation, slicer_app_context
from UniUltraSegmentLib.segments import SegmentEditor, labelmap_from_frame_mask, labelmap_from_masks
from UniUltraSegmentLib.sequences import ensure_segmentation_sequence, write_cine_masks

PREVIEW_NAME = "UniUltra preview"


class _Worker:
    """Runs a function on a Python thread; the main thread polls `done` from a QTimer.

    Only numpy arrays and plain values go in and come out; no MRML or Qt object is touched
    from the thread.
    """

    def __init__(self, fn, *args, passWorker=False, **kwargs):
        if passWorker:
            args = (self, *args)
        self.cancel_event = threading.Event()
        self.progress = 0.0
        self.result = None
        self.error: BaseException | None = None
        self.done = False
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)

    def _run(self, fn, args, kwargs):
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001  reported on the main thread
            self.error = exc
        finally:
            self.done = True

    def start(self):
        self._thread.start()

    def set_progress(self, value):
        self.progress = float(value)

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Box-prompt segmentation for ultrasound (2D, RGB, cine, 3D slices)."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "UniUltra"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.prompts = Prompts()
        self.target: ViewTarget | None = None
        self.predictor = None
        self.predictorKey = None
        self.previewMask: np.ndarray | None = None
        self.previewNode = None
        self.dragStart = None  # (viewWidget, ras, xy)
        self.rubberBand = {}  # viewWidget -> (actor, points)
        self.worker: _Worker | None = None
        self.pollTimer = None
        self.lastCineEdit = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Segment ultrasound with a box (SAM2-based UniUltra model).<br>
<b>Click-drag</b>: draw a box around the structure (several boxes: several objects, one segment).<br>
<b>Shift+click</b>: add a positive point. <b>Ctrl+click</b>: add a negative point.<br>
The result is shown as a preview: <b>Apply</b> (Enter) writes it into the selected segment,
<b>Cancel</b> (Esc) discards it. <b>Propagate</b> follows the object through the cine frames
(or the volume's slices) from the boxes drawn on the current frame.<br>
Masking settings (editable area, intensity range, overwrite) are respected; Ctrl+Z undoes.</html>"""

    # ------------------------------------------------------------------ options panel

    def setupOptionsFrame(self):
        self.modelLabel = qt.QLabel()
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelLabel)

        self.applyImmediatelyCheckBox = qt.QCheckBox("Apply immediately (no preview)")
        self.applyImmediatelyCheckBox.toolTip = "Write each prediction into the segment without a preview step."
        self.scriptedEffect.addOptionsWidget(self.applyImmediatelyCheckBox)

        buttons = qt.QHBoxLayout()
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.toolTip = "Write the preview into the selected segment (Enter)"
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Discard the prompts and the preview (Esc)"
        buttons.addWidget(self.applyButton)
        buttons.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(buttons)

        propagateLayout = qt.QHBoxLayout()
        self.directionCombo = qt.QComboBox()
        self.directionCombo.addItems(["both", "forward", "backward"])
        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.toolTip = "Follow the boxed object through all frames/slices (one undo step)"
        propagateLayout.addWidget(self.directionCombo)
        propagateLayout.addWidget(self.propagateButton)
        self.scriptedEffect.addLabeledOptionsWidget("Propagation:", propagateLayout)

        progressLayout = qt.QHBoxLayout()
        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        self.progressBar.visible = False
        self.stopButton = qt.QPushButton("Stop")
        self.stopButton.visible = False
        progressLayout.addWidget(self.progressBar)
        progressLayout.addWidget(self.stopButton)
        self.scriptedEffect.addOptionsWidget(progressLayout)

        self.undoCineButton = qt.QPushButton("Undo last propagation")
        self.undoCineButton.toolTip = "Restore the cine frames written by the last propagation"
        self.undoCineButton.enabled = False
        self.scriptedEffect.addOptionsWidget(self.undoCineButton)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.stopButton.connect("clicked()", self.onStop)
        self.undoCineButton.connect("clicked()", self.onUndoCine)
        self.applyImmediatelyCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)

    def createCursor(self, widget):
        return qt.QCursor(qt.Qt.CrossCursor)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ApplyImmediately", 0)
        self.scriptedEffect.setParameterDefault("Direction", "both")

    def updateGUIFromMRML(self):
        wasBlocked = self.applyImmediatelyCheckBox.blockSignals(True)
        self.applyImmediatelyCheckBox.checked = self.scriptedEffect.integerParameter("ApplyImmediately") != 0
        self.applyImmediatelyCheckBox.blockSignals(wasBlocked)
        self.directionCombo.currentText = self.scriptedEffect.parameter("Direction") or "both"
        self.modelLabel.text = self._moduleSettings()[0]
        self._updateButtons()

    def updateMRMLFromGUI(self, *args):
        self.scriptedEffect.setParameter("ApplyImmediately", 1 if self.applyImmediatelyCheckBox.checked else 0)
        self.scriptedEffect.setParameter("Direction", self.directionCombo.currentText)

    def _updateButtons(self):
        busy = self.worker is not None
        self.applyButton.enabled = self.previewMask is not None and not busy
        self.cancelButton.enabled = (not self.prompts.empty() or self.previewMask is not None) and not busy
        self.propagateButton.enabled = bool(self.prompts.boxes) and not busy
        self.progressBar.visible = busy
        self.stopButton.visible = busy
        self.undoCineButton.enabled = self.lastCineEdit is not None and not busy

    def activate(self):
        self._clearPrompts()

    def deactivate(self):
        self.onStop()
        self._clearPrompts()
        self._removePreviewNode()

    # ------------------------------------------------------------------ interaction

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            key = callerInteractor.GetKeySym()
            if key == "Escape":
                self.onCancel()
                return True
            if key in ("Return", "KP_Enter") and self.previewMask is not None:
                self.onApply()
                return True
            return False
        xy = callerInteractor.GetEventPosition()
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            ras = self.xyToRas(xy, viewWidget)
            if callerInteractor.GetShiftKey() or callerInteractor.GetControlKey():
                if not self._ensureTarget(viewWidget):
                    return True
                self.prompts.add_point_ras(self.target.geometry, ras, positive=bool(callerInteractor.GetShiftKey()))
                self._predict()
                return True
            self.dragStart = (viewWidget, ras, xy)
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self.dragStart is not None:
            self._updateRubberBand(viewWidget, self.dragStart[2], xy)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self.dragStart is not None:
            startWidget, startRas, startXy = self.dragStart
            self.dragStart = None
            self._hideRubberBand(viewWidget)
            if startWidget is not viewWidget or (abs(xy[0] - startXy[0]) < 3 and abs(xy[1] - startXy[1]) < 3):
                return True  # a click, not a box
            if not self._ensureTarget(viewWidget):
                return True
            self.prompts.add_box_ras(self.target.geometry, startRas, self.xyToRas(xy, viewWidget))
            self._predict()
            return True
        return False

    def _ensureTarget(self, viewWidget) -> bool:
        """Work out (again) what the view shows; a new frame or slice starts new prompts."""
        sourceVolume = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        try:
            target = ViewTarget.from_view(slicer_app_context(), sourceVolume, sliceNode.GetSliceToRAS(), sliceNode.GetSliceOffset())
        except ValueError as exc:
            self._status(str(exc), error=True)
            return False
        key = (target.volume.GetID(), target.geometry.axis, target.current_index)
        if self.target is None or key != (self.target.volume.GetID(), self.target.geometry.axis, self.target.current_index):
            self.prompts.clear()
            self.previewMask = None
        self.target = target
        return True

    def _updateRubberBand(self, viewWidget, xy0, xy1):
        if viewWidget not in self.rubberBand:
            points = vtk.vtkPoints()
            points.SetNumberOfPoints(5)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5)
            for i in range(5):
                lines.InsertCellPoint(i)
            poly = vtk.vtkPolyData()
            poly.SetPoints(points)
            poly.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(poly)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(1.0, 0.8, 0.0)
            actor.GetProperty().SetLineWidth(2)
            self.scriptedEffect.addActor2D(viewWidget, actor)
            self.rubberBand[viewWidget] = (actor, points, poly)
        actor, points, poly = self.rubberBand[viewWidget]
        (x0, y0), (x1, y1) = xy0, xy1
        for i, (x, y) in enumerate([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]):
            points.SetPoint(i, x, y, 0)
        points.Modified()
        poly.Modified()
        actor.VisibilityOn()
        self.scriptedEffect.forceRender(viewWidget)

    def _hideRubberBand(self, viewWidget):
        if viewWidget in self.rubberBand:
            self.rubberBand[viewWidget][0].VisibilityOff()
            self.scriptedEffect.forceRender(viewWidget)

    # ------------------------------------------------------------------ inference

    def _moduleSettings(self):
        settings = qt.QSettings()
        from UniUltraSegmentLib.engine import DEFAULT_MODEL

        return (
            str(settings.value("UniUltra/Model", DEFAULT_MODEL)),
            str(settings.value("UniUltra/Device", "cpu")),
        )

    def _getPredictor(self):
        """The predictor, loaded on the main thread once (dependencies installed on confirmation)."""
        model, device = self._moduleSettings()
        if self.predictor is not None and self.predictorKey == (model, device):
            return self.predictor
        import UniUltraSegment

        if not UniUltraSegment.UniUltraSegmentLogic.ensureDependencies():
            return None
        from UniUltraSegmentLib.engine import load_predictor

        with slicer.util.tryWithErrorDisplay("UniUltra could not load the model.", waitCursor=True):
            self.predictor = load_predictor(model, device)
            self.predictorKey = (model, device)
        return self.predictor

    def _predict(self):
        if self.target is None or self.prompts.empty() or self.worker is not None:
            self._updateButtons()
            return
        predictor = self._getPredictor()
        if predictor is None:
            return
        from UniUltraSegmentLib.engine import predict_mask

        image = self.target.frame()  # numpy copy, taken on the main thread
        prompts = (list(self.prompts.boxes), list(self.prompts.points), list(self.prompts.labels))
        self._startWorker(predict_mask, self._onPredicted, predictor, image, *prompts)

    def _onPredicted(self, mask):
        self.previewMask = np.asarray(mask, bool)
        if self.applyImmediatelyCheckBox.checked:
            self.onApply()
        else:
            self._showPreview()
            self._status(f"Preview: {int(self.previewMask.sum())} pixels. Apply (Enter) or Cancel (Esc).")

    def _startWorker(self, fn, onDone, *args, passWorker=False, **kwargs):
        self.worker = _Worker(fn, *args, passWorker=passWorker, **kwargs)
        self.onDone = onDone
        self.worker.start()
        if self.pollTimer is None:
            self.pollTimer = qt.QTimer()
            self.pollTimer.setInterval(50)
            self.pollTimer.connect("timeout()", self._poll)
        self.pollTimer.start()
        self._updateButtons()

    def _poll(self):
        worker = self.worker
        if worker is None:
            self.pollTimer.stop()
            return
        self.progressBar.value = int(100 * worker.progress)
        if not worker.done:
            return
        self.pollTimer.stop()
        self.worker = None
        self._updateButtons()
        if worker.cancelled():
            self._status("Cancelled: nothing was written.")
            return
        if worker.error is not None:
            self._status(f"UniUltra failed: {worker.error}", error=True)
            return
        try:
            self.onDone(worker.result)
        except ValueError as exc:
            self._status(str(exc), error=True)
        self._updateButtons()

    def onStop(self):
        if self.worker is not None:
            self.worker.cancel_event.set()

    # ------------------------------------------------------------------ preview / apply

    def _showPreview(self):
        if self.previewMask is None or self.target is None:
            return
        if self.previewNode is None or self.previewNode.GetScene() is None:
            self.previewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NAME)
            self.previewNode.SetHideFromEditors(True)
            self.previewNode.CreateDefaultDisplayNodes()
            self.previewNode.GetDisplayNode().SetOpacity2DFill(0.4)
            self.previewNode.GetSegmentation().AddEmptySegment("preview", "preview", [1.0, 0.8, 0.0])
        index = 0 if self.target.is_cine else self.target.geometry.index
        labelmap = labelmap_from_frame_mask(self.target.geometry, self.previewMask, index)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, self.previewNode, "preview", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        )

    def _removePreviewNode(self):
        if self.previewNode is not None and self.previewNode.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(self.previewNode)
        self.previewNode = None

    def _clearPrompts(self):
        self.prompts.clear()
        self.previewMask = None
        if self.previewNode is not None and self.previewNode.GetScene() is not None:
            slicer.vtkSlicerSegmentationsModuleLogic.ClearSegment(self.previewNode, "preview")
        for viewWidget in list(self.rubberBand):
            self._hideRubberBand(viewWidget)
        if hasattr(self, "applyButton"):
            self._updateButtons()

    def onApply(self):
        if self.previewMask is None or self.target is None:
            return
        index = 0 if self.target.is_cine else self.target.geometry.index
        if self.target.is_cine:
            self._ensureCineSegmentation(self.target)
        labelmap = labelmap_from_frame_mask(self.target.geometry, self.previewMask, index)
        self.scriptedEffect.saveStateForUndo()
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd
        )
        self._clearPrompts()
        self._status("Applied. Ctrl+Z undoes.")

    def onCancel(self):
        self.onStop()
        self._clearPrompts()
        self._status("")

    # ------------------------------------------------------------------ propagation

    def onPropagate(self):
        if self.target is None or not self.prompts.boxes:
            self._status("Draw a box on the key frame first.", error=True)
            return
        predictor = self._getPredictor()
        if predictor is None:
            return
        from UniUltraSegmentLib.engine import make_propagate

        self.updateMRMLFromGUI()
        frames = frames_for_propagation(self.target)  # numpy copies, main thread
        keyBoxes = {self.target.current_index: list(self.prompts.boxes)}
        self.propagationTarget = self.target
        propagate = make_propagate(predictor)
        direction = self.directionCombo.currentText  # read Qt on the main thread only

        def job(worker):
            # worker thread: numpy frames in, numpy masks out
            return propagate(frames, keyBoxes, direction=direction, progress=worker.set_progress, cancel=worker.cancelled)

        self._startWorker(job, self._onPropagated, passWorker=True)
        self._status(f"Propagating through {len(frames)} frames...")

    def _onPropagated(self, masks):
        target = self.propagationTarget
        segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        written = [i for i, m in enumerate(masks) if m is not None and np.any(m)]
        if target.is_cine:
            ctx = slicer_app_context()
            proxySeg = self._ensureCineSegmentation(target)
            editor = SegmentEditor(ctx, self.scriptedEffect.parameterSetNode())
            self.lastCineEdit = write_cine_masks(ctx, editor, target.cine, proxySeg, segmentId, target.geometry, masks)
        else:
            if not written:
                self._status("Propagation found nothing to write.")
                return
            labelmap = labelmap_from_masks(target.geometry, {i: masks[i] for i in written})
            self.scriptedEffect.saveStateForUndo()
            self.scriptedEffect.modifySelectedSegmentByLabelmap(
                labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd
            )
        self._clearPrompts()
        self._status(f"Propagation wrote {len(written)} frames." + (" Ctrl+Z undoes." if not target.is_cine else ""))

    def _ensureCineSegmentation(self, target):
        """Make the segmentation per-frame (a synchronized sequence in the cine's browser)."""
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        proxySeg, _ = ensure_segmentation_sequence(slicer_app_context(), target.cine, segmentationNode, name)
        return proxySeg

    def onUndoCine(self):
        if self.lastCineEdit is not None:
            self.lastCineEdit.undo(slicer_app_context())
            self.lastCineEdit = None
            self._status("Propagation undone.")
        self._updateButtons()

    def _status(self, text, error=False):
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text
            self.statusLabel.setStyleSheet("color: #c0392b" if error else "")
        if error and text:
            import logging

            logging.warning(f"UniUltra: {text}")
