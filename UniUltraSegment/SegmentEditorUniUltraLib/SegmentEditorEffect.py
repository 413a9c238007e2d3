"""Segment Editor effect "UniUltra": the Qt side only.

Layout as Slicer's ScriptedSegmentEditorEffect template: Slicer loads this file as a module named
after its folder (`SegmentEditorUniUltraLib`, qSlicerSegmentEditorScriptedEffect::setPythonSource)
and looks up the class `SegmentEditorEffect` in it.  No other code imports this folder, so loading
it cannot replace the `UniUltraSegmentLib` package that holds the logic.

Everything the effect does is `UniUltraSegmentLib.controller.InteractionController`, tested on
the real Slicer core; this file translates PythonQt/VTK events into its calls, shows its replies,
and provides its two Slicer-only services:

* the writer (`EffectWriter`): `scriptedEffect.saveStateForUndo()` and
  `scriptedEffect.modifySegmentByLabelmap(node, segmentID, labelmap, mode)`;
* the engine: the `uniultra` predictor, loaded on the main thread under a wait cursor.

Threads: none.  PythonQt never releases the GIL while the main thread waits in the Qt event
loop (PythonQt's thread support is off in Slicer), so a Python worker thread only advances while
main-thread Python runs; polled from a QTimer it starves (37 s instead of 0.3 s for one
prediction).  Prediction therefore runs synchronously (well under a second for the bundled
model), and propagation runs on the main thread frame by frame, calling
`slicer.app.processEvents()` between frames so that the Stop button and the views stay live.
"""

import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect
from UniUltraSegmentLib.context import slicer_app_context
from UniUltraSegmentLib.controller import (
    InteractionController,
    ViewEvent,
)
from UniUltraSegmentLib.geometry import vtk_matrix_to_numpy

SETTINGS_MODEL = "UniUltra/Model"
SETTINGS_DEVICE = "UniUltra/Device"


class EffectWriter:
    """The controller's writer inside Slicer: the Segment Editor's own write route and undo.

    In Slicer >= 5.10 `modifySegmentByLabelmap` is
    `vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap(node, id, labelmap, mode, extent,
    perSegment(), bypassMasking)` on the editor widget's logic (qSlicerSegmentEditorAbstractEffect.cxx),
    the same function the tests call through `UniUltraSegmentLib.segments.SegmentEditor`."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def save_state_for_undo(self):
        self.scriptedEffect.saveStateForUndo()

    def modify(self, segmentationNode, segmentId, labelmap, mode):
        effect = slicer.qSlicerSegmentEditorAbstractEffect
        modes = {"add": effect.ModificationModeAdd, "remove": effect.ModificationModeRemove}
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, labelmap, modes[mode])


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Box and point prompts -> SAM2-based mask, preview, apply, propagate (2D, RGB, cine, 3D)."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "UniUltra"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.controller = None
        self.engine = None
        self.engineKey = None
        self.rubberBands = {}  # viewWidget -> UniUltraSegmentLib.rubber_band.RubberBand
        self.propagating = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Segment ultrasound with boxes and points (SAM2-based UniUltra model).<br>
<b>Left-drag</b>: a box around the object. <b>Left-click</b>: a point on the object; with
<b>Negative points</b> on (key <b>n</b>) a point on the background.<br>
<b>x</b>: remove the last box or point. <b>Enter</b> or <b>a</b>: apply the preview to the segment
(each apply is one Ctrl+Z / z step). <b>Esc</b> leaves the effect (Segment Editor); the preview is discarded.<br>
Shift, Ctrl and Alt keep their Slicer meaning (crosshair, pan, zoom).<br>
Prompts remember their frame: after scrubbing a cine, Apply writes each frame's preview into that frame.
<b>Propagate</b> follows the boxes through all frames (cine) or slices (3D) into the segment chosen at the
first prompt, replacing only the frames it covers. The first write into a cine asks before making the
segmentation one per frame. Masking settings (editable area, intensity range, overwrite) apply.</html>"""

    # ------------------------------------------------------------------ options panel

    def setupOptionsFrame(self):
        self.modelLabel = qt.QLabel()
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelLabel)

        self.negativeCheckBox = qt.QCheckBox("Negative points (n)")
        self.negativeCheckBox.toolTip = "Clicks add background points instead of object points"
        self.applyImmediatelyCheckBox = qt.QCheckBox("Apply immediately (no preview)")
        self.applyImmediatelyCheckBox.toolTip = "Write each prediction into the segment without a preview step"
        checks = qt.QHBoxLayout()
        checks.addWidget(self.negativeCheckBox)
        checks.addWidget(self.applyImmediatelyCheckBox)
        self.scriptedEffect.addOptionsWidget(checks)

        buttons = qt.QHBoxLayout()
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.toolTip = "Write the preview into the segment (Enter)"
        self.undoPromptButton = qt.QPushButton("Undo prompt")
        self.undoPromptButton.toolTip = "Remove the last box or point (x)"
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Discard the prompts and the preview"
        for b in (self.applyButton, self.undoPromptButton, self.cancelButton):
            buttons.addWidget(b)
        self.scriptedEffect.addOptionsWidget(buttons)

        propagateLayout = qt.QHBoxLayout()
        self.directionCombo = qt.QComboBox()
        self.directionCombo.addItems(["both", "forward", "backward"])
        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.toolTip = "Follow the boxed object through all frames/slices"
        self.stopButton = qt.QPushButton("Stop")
        self.stopButton.toolTip = "Stop the propagation; nothing is written"
        propagateLayout.addWidget(self.directionCombo)
        propagateLayout.addWidget(self.propagateButton)
        propagateLayout.addWidget(self.stopButton)
        self.scriptedEffect.addLabeledOptionsWidget("Propagation:", propagateLayout)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)

        self.undoCineButton = qt.QPushButton("Undo last cine write")
        self.undoCineButton.toolTip = "Restore the cine frames written by the last apply or propagation"
        self.scriptedEffect.addOptionsWidget(self.undoCineButton)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.connections = [
            (self.applyButton, "clicked()", self.onApply),
            (self.undoPromptButton, "clicked()", self.onUndoPrompt),
            (self.cancelButton, "clicked()", self.onCancel),
            (self.propagateButton, "clicked()", self.onPropagate),
            (self.stopButton, "clicked()", self.onStop),
            (self.undoCineButton, "clicked()", self.onUndoCine),
            (self.negativeCheckBox, "toggled(bool)", self.onNegativeToggled),
            (self.applyImmediatelyCheckBox, "toggled(bool)", self.updateMRMLFromGUI),
            (self.directionCombo, "currentIndexChanged(int)", self.updateMRMLFromGUI),
        ]
        for widget, signal, slot in self.connections:
            widget.connect(signal, slot)
        self._updateButtons()

    def cleanup(self):
        """Slicer >= 5.10 calls this before deleting the effect (Slicer issue #7392)."""
        for widget, signal, slot in getattr(self, "connections", []):
            widget.disconnect(signal, slot)
        self.connections = []
        if self.controller is not None:
            self.controller.close()
            self.controller = None

    def createCursor(self, widget):
        return qt.QCursor(qt.Qt.CrossCursor)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ApplyImmediately", 0)
        self.scriptedEffect.setParameterDefault("Direction", "both")

    def updateGUIFromMRML(self):
        wasBlocked = self.applyImmediatelyCheckBox.blockSignals(True)
        self.applyImmediatelyCheckBox.checked = self.scriptedEffect.integerParameter("ApplyImmediately") != 0
        self.applyImmediatelyCheckBox.blockSignals(wasBlocked)
        wasBlocked = self.directionCombo.blockSignals(True)
        self.directionCombo.currentText = self.scriptedEffect.parameter("Direction") or "both"
        self.directionCombo.blockSignals(wasBlocked)
        self.modelLabel.text = self._settings()[0]
        self._updateButtons()

    def updateMRMLFromGUI(self, *args):
        self.scriptedEffect.setParameter("ApplyImmediately", 1 if self.applyImmediatelyCheckBox.checked else 0)
        self.scriptedEffect.setParameter("Direction", self.directionCombo.currentText)
        if self.controller is not None:
            self.controller.apply_immediately = self.applyImmediatelyCheckBox.checked

    def _updateButtons(self):
        if not hasattr(self, "applyButton"):
            return
        c = self.controller
        idle = not self.propagating
        self.applyButton.enabled = idle and c is not None and c.has_preview
        self.undoPromptButton.enabled = idle and c is not None and c.has_prompts
        self.cancelButton.enabled = idle and c is not None and c.has_prompts
        self.propagateButton.enabled = idle and c is not None and c.has_boxes
        self.directionCombo.enabled = idle
        self.stopButton.visible = self.propagating
        self.progressBar.visible = self.propagating
        self.undoCineButton.enabled = idle and c is not None and c.last_cine_edit is not None
        wasBlocked = self.negativeCheckBox.blockSignals(True)
        self.negativeCheckBox.checked = c is not None and c.negative_mode
        self.negativeCheckBox.blockSignals(wasBlocked)

    # ------------------------------------------------------------------ the controller

    def _controller(self):
        """The controller for the current parameter node (made on first use)."""
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            return None
        if self.controller is None or self.controller.editor_node is not node:
            if self.controller is not None:
                self.controller.close()
            self.controller = InteractionController(slicer_app_context(), node, EffectWriter(self.scriptedEffect),
                                                    self._getEngine, self._confirm)
            self.controller.apply_immediately = self.scriptedEffect.integerParameter("ApplyImmediately") != 0
        return self.controller

    def _confirm(self, question):
        return slicer.util.confirmOkCancelDisplay(question, windowTitle="UniUltra")

    def _show(self, reply):
        """Show a controller reply; returns whether the event was ours."""
        if (reply.status or reply.error) and hasattr(self, "statusLabel"):
            self.statusLabel.text = reply.status
            self.statusLabel.setStyleSheet("color: #c0392b" if reply.error else "")
            if reply.error:
                logging.warning(f"UniUltra: {reply.status}")
        if reply.changed:
            self._updateButtons()
        return reply.handled

    def activate(self):
        self._controller()
        self._updateButtons()

    def deactivate(self):
        # Esc (Segment Editor shortcut) and switching effects both end here: discard prompts and preview
        self.onStop()
        if self.controller is not None:
            self.controller.reset()
        for viewWidget, band in self.rubberBands.items():
            self.scriptedEffect.removeActor2D(viewWidget, band.actor)
        self.rubberBands = {}
        self._updateButtons()

    def sourceVolumeNodeChanged(self):
        if self.controller is not None:
            self._show(self.controller.source_changed())

    def referenceGeometryChanged(self):
        if self.controller is not None:
            self._show(self.controller.reset("The segmentation geometry changed: prompts and preview were discarded."))

    def layoutChanged(self):
        # views may have been destroyed: forget their rubber bands (their renderers went with them)
        self.rubberBands = {}

    # ------------------------------------------------------------------ interaction

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self.propagating:
            return False
        c = self._controller()
        if c is None:
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            return self._withWaitCursor(lambda: c.key(callerInteractor.GetKeySym()))
        xy = callerInteractor.GetEventPosition()
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        event = ViewEvent(sliceNode.GetID(), vtk_matrix_to_numpy(sliceNode.GetSliceToRAS()), sliceNode.GetSliceOffset(),
                          tuple(self.xyToRas(xy, viewWidget)), (int(xy[0]), int(xy[1])))
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            return self._show(c.press(event, "left", bool(callerInteractor.GetShiftKey()),
                                      bool(callerInteractor.GetControlKey()), bool(callerInteractor.GetAltKey())))
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            reply = c.move(event)
            if reply.rubber_band is not None:
                self._drawRubberBand(viewWidget, *reply.rubber_band)
            return reply.handled
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            self._hideRubberBands()
            return self._withWaitCursor(lambda: c.release(event))
        if eventId == vtk.vtkCommand.LeftButtonDoubleClickEvent and c.has_prompts:
            return True  # a double click would maximize the view in the middle of prompting
        return False

    def _withWaitCursor(self, call):
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            reply = call()
        finally:
            slicer.app.restoreOverrideCursor()
        return self._show(reply)

    def _drawRubberBand(self, viewWidget, xy0, xy1):
        from UniUltraSegmentLib.rubber_band import RubberBand

        if viewWidget not in self.rubberBands:
            band = RubberBand(line_width=2)
            self.scriptedEffect.addActor2D(viewWidget, band.actor)
            self.rubberBands[viewWidget] = band
        self.rubberBands[viewWidget].show(xy0, xy1)
        self.scriptedEffect.forceRender(viewWidget)

    def _hideRubberBands(self):
        for viewWidget, band in self.rubberBands.items():
            if band.hide():
                self.scriptedEffect.forceRender(viewWidget)

    # ------------------------------------------------------------------ engine

    def _settings(self):
        from UniUltraSegmentLib.engine import DEFAULT_MODEL

        settings = qt.QSettings()
        return str(settings.value(SETTINGS_MODEL, DEFAULT_MODEL)), str(settings.value(SETTINGS_DEVICE, "cpu"))

    def _getEngine(self):
        """The engine, loaded on the main thread once per model/device (None: not available).

        Errors are shown here and swallowed: `slicer.util.tryWithErrorDisplay` re-raises after its
        dialog (Base/Python/slicer/util.py), and an exception escaping processInteractionEvents
        makes the C++ side fall back to the default event handling."""
        model, device = self._settings()
        if self.engine is not None and self.engineKey == (model, device):
            return self.engine
        import UniUltraSegment

        if not UniUltraSegment.UniUltraSegmentLogic.ensureDependencies():
            return None
        from UniUltraSegmentLib.engine import PredictorEngine, load_predictor

        try:
            with slicer.util.tryWithErrorDisplay(f"UniUltra could not load the model '{model}'.", waitCursor=True):
                self.engine = PredictorEngine(load_predictor(model, device))
                self.engineKey = (model, device)
        except Exception:  # noqa: BLE001 - already shown to the user
            return None
        return self.engine

    # ------------------------------------------------------------------ buttons

    def _segmentVisibleConfirmed(self):
        confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
        return confirmed != self.scriptedEffect.NotConfirmed

    def onApply(self):
        c = self._controller()
        if c is None or not self._segmentVisibleConfirmed():
            return
        self._withWaitCursor(c.apply)

    def onUndoPrompt(self):
        c = self._controller()
        if c is not None:
            self._withWaitCursor(c.undo_prompt)

    def onCancel(self):
        c = self._controller()
        if c is not None:
            self._show(c.reset("Prompts and preview discarded."))

    def onNegativeToggled(self, on):
        c = self._controller()
        if c is not None:
            self._show(c.set_negative_mode(on))

    def onUndoCine(self):
        c = self._controller()
        if c is not None:
            self._withWaitCursor(c.undo_cine_write)

    def onStop(self):
        if self.controller is not None:
            self.controller.cancel()

    def onPropagate(self):
        c = self._controller()
        if c is None or self.propagating or not self._segmentVisibleConfirmed():
            return
        if self._getEngine() is None:
            return
        self.propagating = True
        self.progressBar.value = 0
        self._updateButtons()
        self.statusLabel.text = "Propagating... (Stop ends it; nothing is written then)"

        def progress(fraction):
            self.progressBar.value = int(100 * fraction)

        try:
            # main thread, one frame per step; processEvents between frames keeps Stop and the views live
            reply = c.propagate(self.directionCombo.currentText, progress, slicer.app.processEvents)
        finally:
            self.propagating = False
        self._show(reply)
        self._updateButtons()
