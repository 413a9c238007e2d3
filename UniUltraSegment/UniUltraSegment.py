"""UniUltraSegment: SAM2-based box-prompt segmentation for ultrasound in 3D Slicer.

The module registers the "UniUltra" Segment Editor effect, manages model weights (download
with consent, progress, cancel and SHA-256 into a per-user cache) and offers cine batch
labeling.  Nothing heavy is imported at module import time: torch, sam2 and the engine are
loaded only when a segmentation is requested, after the user agreed to install them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

MODULE_DIR = Path(__file__).resolve().parent
SAMPLE_DIR = MODULE_DIR / "Resources" / "SampleData"
SETTINGS_MODEL = "UniUltra/Model"
SETTINGS_DEVICE = "UniUltra/Device"
# sam2 1.1.0 needs torch>=2.5.1 / torchvision>=0.20.1 (its METADATA) and builds from source: install
# torch first through the PyTorch extension with those bounds, then sam2 without build isolation
# (as the project's Makefile does), so that pip neither replaces torch nor builds in a bare env.
TORCH_REQUIREMENT = ">=2.5.1"
TORCHVISION_REQUIREMENT = ">=0.20.1"
PIP_REQUIREMENTS = "SimpleITK hydra-core iopath pillow tqdm"
PIP_SAM2 = "--no-build-isolation sam2==1.1.0"
MIN_SLICER = (5, 10)  # scriptedEffect.modifySegmentByLabelmap = vtkSlicerSegmentEditorLogic from 5.10


def slicerVersionProblem() -> str:
    """A sentence for the user when this Slicer is too old for UniUltra, else ""."""
    version = (int(getattr(slicer.app, "majorVersion", 0)), int(getattr(slicer.app, "minorVersion", 0)))
    if version >= MIN_SLICER:
        return ""
    return (f"UniUltra needs 3D Slicer {MIN_SLICER[0]}.{MIN_SLICER[1]} or later; this is "
            f"{version[0]}.{version[1]}. Install a current Slicer release to use the UniUltra effect.")


class UniUltraSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UniUltra Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Sequences"]
        self.parent.contributors = ["UniUltra developers"]
        self.parent.helpText = _("""Box- and point-prompt segmentation of 2D, colour, cine and 3D ultrasound with
a parameter-efficient SAM2 model. Use the "UniUltra" effect in the Segment Editor; manage models and
label cine loops here.""")
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _("""Built on Meta's SAM2 (Apache-2.0). Sample data: Momot 2022,
common carotid artery ultrasound (CC BY 4.0).""")
        slicer.app.connect("startupCompleted()", registerEditorEffect)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerEditorEffect():
    """Register the effect with the Segment Editor (called once the application is up).

    As Slicer's ScriptedSegmentEditorEffect template: the effect file sits in its own folder,
    which Slicer loads as a module of that name (SegmentEditorUniUltraLib), so it cannot shadow
    the UniUltraSegmentLib package the effect and the module panels import."""
    problem = slicerVersionProblem()
    if problem:
        logging.error(problem)
        return
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    effectFilename = MODULE_DIR / "SegmentEditorUniUltraLib" / "SegmentEditorEffect.py"
    instance.setPythonSource(str(effectFilename).replace("\\", "/"))
    instance.self().register()


def registerSampleData():
    """Sample Data module: the carotid image and cine (see UniUltraSegmentLib/sampledata.py)."""
    from UniUltraSegmentLib.sampledata import register_sample_data

    register_sample_data()


class UniUltraSegmentWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = UniUltraSegmentLogic()
        self.settings = qt.QSettings()
        self._setupModelPanel()
        self._setupCinePanel()
        self.layout.addStretch(1)
        self.refreshModels()

    # ------------------------------------------------------------------ model manager

    def _setupModelPanel(self):
        import ctk

        box = ctk.ctkCollapsibleButton()
        box.text = "Models"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)

        self.modelTable = qt.QTableWidget(0, 3)
        self.modelTable.setHorizontalHeaderLabels(["Model", "State", "License"])
        self.modelTable.horizontalHeader().setStretchLastSection(True)
        self.modelTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.modelTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        form.addRow(self.modelTable)

        buttons = qt.QHBoxLayout()
        self.useButton = qt.QPushButton("Use selected")
        self.downloadButton = qt.QPushButton("Download...")
        self.importButton = qt.QPushButton("Import weights from a file...")
        self.importButton.toolTip = "Install a registry model from a file you already have (no internet needed)"
        self.openFolderButton = qt.QPushButton("Open folder")
        self.clearButton = qt.QPushButton("Clear downloads")
        self.clearButton.toolTip = "Delete downloaded weights only; models trained here are kept"
        for b in (self.useButton, self.downloadButton, self.importButton, self.openFolderButton, self.clearButton):
            buttons.addWidget(b)
        form.addRow(buttons)

        self.checkpointSelector = ctk.ctkPathLineEdit()
        self.checkpointSelector.filters = ctk.ctkPathLineEdit.Files
        self.checkpointSelector.nameFilters = ["Checkpoints (*.pt *.pth *.ckpt)"]
        self.checkpointSelector.toolTip = "Use your own (fine-tuned) checkpoint instead of a registry model"
        form.addRow("Checkpoint:", self.checkpointSelector)

        self.deviceCombo = qt.QComboBox()
        self.deviceCombo.addItems(["cpu", "cuda", "mps"])
        self.deviceCombo.currentText = str(self.settings.value(SETTINGS_DEVICE, "cpu"))
        form.addRow("Device:", self.deviceCombo)

        self.activeModelLabel = qt.QLabel()
        form.addRow("In use:", self.activeModelLabel)

        progressRow = qt.QHBoxLayout()
        self.downloadProgress = qt.QProgressBar()
        self.downloadProgress.visible = False
        self.cancelDownloadButton = qt.QPushButton("Cancel")
        self.cancelDownloadButton.visible = False
        progressRow.addWidget(self.downloadProgress)
        progressRow.addWidget(self.cancelDownloadButton)
        form.addRow(progressRow)

        self.useButton.connect("clicked()", self.onUseModel)
        self.downloadButton.connect("clicked()", self.onDownload)
        self.importButton.connect("clicked()", self.onImportWeights)
        self.openFolderButton.connect("clicked()", self.onOpenFolder)
        self.clearButton.connect("clicked()", self.onClear)
        self.cancelDownloadButton.connect("clicked()", self.onCancelDownload)
        self.checkpointSelector.connect("currentPathChanged(QString)", self.onCheckpointChosen)
        self.deviceCombo.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.downloadCancelled = False

    def refreshModels(self):
        from UniUltraSegmentLib import models

        self.entries = models.load_registry()
        self.modelTable.setRowCount(len(self.entries))
        for row, entry in enumerate(self.entries):
            try:
                state = models.model_state(entry)
            except Exception as exc:  # noqa: BLE001 - one odd entry must not hide the table
                state = f"unknown ({exc})"
            self.modelTable.setItem(row, 0, qt.QTableWidgetItem(entry.name))
            self.modelTable.setItem(row, 1, qt.QTableWidgetItem(state))
            self.modelTable.setItem(row, 2, qt.QTableWidgetItem(entry.license))
        from UniUltraSegmentLib.engine import DEFAULT_MODEL

        self.activeModelLabel.text = str(self.settings.value(SETTINGS_MODEL, f"{DEFAULT_MODEL} (bundled)"))

    def selectedEntry(self):
        row = self.modelTable.currentRow()
        return self.entries[row] if 0 <= row < len(self.entries) else None

    def onUseModel(self):
        entry = self.selectedEntry()
        if entry is None:
            return
        path = entry.local_path()
        self.settings.setValue(SETTINGS_MODEL, str(path) if path is not None and path.is_file() else entry.name)
        self.refreshModels()

    def _setModelPanelBusy(self, busy):
        for w in (self.useButton, self.downloadButton, self.importButton, self.openFolderButton, self.clearButton,
                  self.checkpointSelector, self.deviceCombo, self.modelTable):
            w.enabled = not busy
        self.downloadProgress.visible = self.cancelDownloadButton.visible = busy

    def _runWhilePumping(self, work):
        """Run `work(progress, cancelled)` on a Python thread while this (main) thread pumps Qt events.

        A timer-polled worker would starve: PythonQt keeps the GIL while the main thread waits in
        the Qt event loop.  Here the main thread blocks in `join(0.05)`, which releases the GIL,
        so the worker runs; between joins `processEvents` repaints and delivers the Cancel click.
        The worker touches no Qt or MRML object; progress is copied into the bar from here."""
        import threading

        state = {"done": 0, "total": -1}

        def progress(done, total):
            state["done"], state["total"] = done, total

        def run():
            try:
                state["result"] = work(progress, lambda: self.downloadCancelled)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                state["error"] = exc

        self.downloadCancelled = False
        self._setModelPanelBusy(True)
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.05)
                total = state["total"]
                self.downloadProgress.maximum = total if total > 0 else 0
                self.downloadProgress.value = state["done"] if total > 0 else 0
                slicer.app.processEvents()
                if self.downloadCancelled:
                    break  # a stuck connection must not hold the panel; the thread cleans up after itself
        finally:
            self._setModelPanelBusy(False)
        if self.downloadCancelled and worker.is_alive():
            from UniUltraSegmentLib import models

            raise models.DownloadCancelled("cancelled")
        if "error" in state:
            raise state["error"]
        return state.get("result")

    def onDownload(self):
        from UniUltraSegmentLib import models

        entry = self.selectedEntry()
        if entry is None:
            slicer.util.infoDisplay("Select a model in the table first.")
            return
        if not entry.url or entry.source != "official":
            slicer.util.infoDisplay(f"'{entry.name}' is {models.model_state(entry)}: there is nothing to download.")
            return
        dest = models.model_path(entry)
        check = ("The file is checked against its SHA-256 before it is used." if models.can_check(entry) else
                 "The registry has no SHA-256 for this file, so it cannot be checked: download it only "
                 "from a network you trust.")
        if not slicer.util.confirmOkCancelDisplay(
            f"Download '{entry.name}' ({entry.license}) from\n{entry.url}\ninto\n{dest}?\n\n{check}"
        ):
            return
        self._installWhilePumping(lambda progress, cancelled: models.install_model(entry, progress, cancelled),
                                  "Download cancelled")

    def onImportWeights(self):
        from UniUltraSegmentLib import models

        entry = self.selectedEntry()
        if entry is None or entry.source != "official":
            slicer.util.infoDisplay("Select a downloadable model in the table first.")
            return
        path = qt.QFileDialog.getOpenFileName(None, f"Weights of {entry.name}", "", "Checkpoints (*.pt *.pth *.ckpt)")
        if not path:
            return
        self._installWhilePumping(lambda progress, cancelled: models.import_weights(entry, path), "Import cancelled")

    def _installWhilePumping(self, work, cancelledMessage):
        """Download or import weights (``work(progress, cancelled)`` returns the installed file) with
        the UI live; the installed model becomes the chosen one; errors shown, the table refreshed."""
        from UniUltraSegmentLib import models

        try:
            path = self._runWhilePumping(work)
            self.settings.setValue(SETTINGS_MODEL, str(path))
        except models.DownloadCancelled:
            slicer.util.showStatusMessage(cancelledMessage, 3000)
        except (OSError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc))
        finally:
            self.refreshModels()

    def onCancelDownload(self):
        self.downloadCancelled = True

    def onOpenFolder(self):
        from UniUltraSegmentLib import models

        folder = models.default_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClear(self):
        from UniUltraSegmentLib import models

        folder = models.registry().downloads_dir()
        if slicer.util.confirmYesNoDisplay(f"Delete the downloaded model weights in {folder}?\n"
                                           "Models trained here are kept."):
            n = models.clear_downloads()
            slicer.util.showStatusMessage(f"Removed {n} files", 3000)
            self.refreshModels()

    def onCheckpointChosen(self, path):
        if path and os.path.isfile(path):
            self.settings.setValue(SETTINGS_MODEL, path)
            self.refreshModels()

    def onDeviceChanged(self, _index):
        self.settings.setValue(SETTINGS_DEVICE, self.deviceCombo.currentText)

    # ------------------------------------------------------------------ cine batch labeling

    def _setupCinePanel(self):
        import ctk

        box = ctk.ctkCollapsibleButton()
        box.text = "Cine batch labeling"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)
        self.loadDicomButton = qt.QPushButton("Load ultrasound DICOM cine...")
        form.addRow(self.loadDicomButton)
        self.exportFolder = ctk.ctkPathLineEdit()
        self.exportFolder.filters = ctk.ctkPathLineEdit.Dirs
        form.addRow("Export folder:", self.exportFolder)
        exportRow = qt.QHBoxLayout()
        self.exportPngButton = qt.QPushButton("Export masks as PNG")
        self.exportSegButton = qt.QPushButton("Export .seg.nrrd per frame")
        exportRow.addWidget(self.exportPngButton)
        exportRow.addWidget(self.exportSegButton)
        form.addRow(exportRow)
        hint = qt.QLabel(
            "Draw a box on a key frame with the UniUltra effect, press Propagate, scrub to check, "
            "refine single frames, then export."
        )
        hint.wordWrap = True
        form.addRow(hint)
        self.loadDicomButton.connect("clicked()", self.onLoadDicom)
        self.exportPngButton.connect("clicked()", lambda: self.onExport("png"))
        self.exportSegButton.connect("clicked()", lambda: self.onExport("seg"))
        self._setupBatchPanel(form)

    def onLoadDicom(self):
        from UniUltraSegmentLib.sequences import load_dicom_cine

        path = qt.QFileDialog.getOpenFileName(None, "Ultrasound DICOM", "", "DICOM (*.dcm *);;All files (*)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not load the DICOM cine.", waitCursor=True):
            cine = load_dicom_cine(self.logic.context(), path)
            slicer.util.setSliceViewerLayers(background=cine.proxy, fit=True)
            slicer.modules.sequences.toolBar().setActiveBrowserNode(cine.browser)

    def onExport(self, kind):
        from UniUltraSegmentLib.geometry import slice_geometry
        from UniUltraSegmentLib.sequences import (
            export_frame_masks_png,
            export_frame_masks_seg_nrrd,
            find_cine,
        )

        folder = self.exportFolder.currentPath
        if not folder:
            slicer.util.errorDisplay("Choose an export folder first.")
            return
        # the Segment Editor module's own parameter node (Modules/Scripted/SegmentEditor/SegmentEditor.py)
        editorNode = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        volume = editorNode.GetSourceVolumeNode() if editorNode else None
        seg = editorNode.GetSegmentationNode() if editorNode else None
        cine = find_cine(self.logic.context(), volume) if volume else None
        if cine is None or seg is None or cine.browser.GetSequenceNode(seg) is None:
            slicer.util.errorDisplay("Select a cine (sequence proxy) and its per-frame segmentation in the Segment Editor.")
            return
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            if kind == "png":
                sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
                geometry = slice_geometry(volume, sliceNode.GetSliceToRAS(), sliceNode.GetSliceOffset())
                paths = export_frame_masks_png(cine, seg, editorNode.GetSelectedSegmentID(), geometry, folder)
            else:
                paths = export_frame_masks_seg_nrrd(cine, seg, folder)
            slicer.util.showStatusMessage(f"Exported {len(paths)} frames to {folder}", 5000)


    # ------------------------------------------------------------------ many clips: `uniultra batch`
    # A thin adaptor over UniUltraSegmentLib/batch.py (manifest from the scene, BatchRun, load_result).
    # The batch runs in its own process; the timer only reads its events and log files (BatchRun.poll
    # never blocks and starts no thread, so PythonQt's GIL on the main thread is no obstacle).

    def _setupBatchPanel(self, form):
        import ctk

        group = qt.QGroupBox("Label many clips in the background (uniultra batch)")
        bform = qt.QFormLayout(group)
        form.addRow(group)
        hint = qt.QLabel(
            "Label a key frame of each cine (UniUltra effect or any effect; each segment is a structure, each "
            "piece a box), then write the manifest from the scene, or choose a manifest file (CSV / JSON Lines, "
            "see the README). Running again resumes: finished clips are skipped."
        )
        hint.wordWrap = True
        bform.addRow(hint)
        self.batchOutput = ctk.ctkPathLineEdit()
        self.batchOutput.filters = ctk.ctkPathLineEdit.Dirs
        self.batchOutput.toolTip = "One folder per clip is written here (as one unit), plus summary.csv"
        bform.addRow("Output folder:", self.batchOutput)
        self.batchFromSceneButton = qt.QPushButton("Write manifest from the scene's cines")
        bform.addRow(self.batchFromSceneButton)
        self.batchManifest = ctk.ctkPathLineEdit()
        self.batchManifest.filters = ctk.ctkPathLineEdit.Files
        self.batchManifest.nameFilters = ["Manifests (*.csv *.jsonl *.ndjson *.json)"]
        bform.addRow("Manifest:", self.batchManifest)
        self.batchPrompts = ctk.ctkPathLineEdit()
        self.batchPrompts.filters = ctk.ctkPathLineEdit.Files
        self.batchPrompts.nameFilters = ["Prompts (*.csv)"]
        self.batchPrompts.toolTip = "Only when the manifest is a folder of clips: the prompts CSV for them"
        bform.addRow("Prompts (folder of clips):", self.batchPrompts)
        options = qt.QHBoxLayout()
        self.batchSaveFrames = qt.QCheckBox("Save frames")
        self.batchSaveFrames.checked = True
        self.batchSaveFrames.toolTip = "Keep each clip's frames next to its labels, so it can be reviewed later"
        self.batchPng = qt.QCheckBox("PNG masks")
        self.batchRedo = qt.QCheckBox("Redo finished clips")
        for w in (self.batchSaveFrames, self.batchPng, self.batchRedo):
            options.addWidget(w)
        bform.addRow(options)
        buttons = qt.QHBoxLayout()
        self.batchRunButton = qt.QPushButton("Run")
        self.batchCancelButton = qt.QPushButton("Cancel")
        self.batchCancelButton.enabled = False
        buttons.addWidget(self.batchRunButton)
        buttons.addWidget(self.batchCancelButton)
        bform.addRow(buttons)
        self.batchProgress = qt.QProgressBar()
        self.batchProgress.setRange(0, 1000)
        self.batchProgress.value = 0
        bform.addRow(self.batchProgress)
        self.batchStatus = qt.QLabel("")
        self.batchStatus.wordWrap = True
        bform.addRow(self.batchStatus)
        self.batchTable = qt.QTableWidget(0, 4)
        self.batchTable.setHorizontalHeaderLabels(["Clip", "Status", "Frames", "Warnings / error"])
        self.batchTable.horizontalHeader().setStretchLastSection(True)
        self.batchTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.batchTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        bform.addRow(self.batchTable)
        resultButtons = qt.QHBoxLayout()
        self.batchLoadButton = qt.QPushButton("Load selected for review")
        self.batchLoadButton.toolTip = ("Adds the clip's labels as a segmentation sequence in its cine's browser: "
                                        "scrub to review, correct in the Segment Editor (saved per frame)")
        self.batchRefreshButton = qt.QPushButton("Refresh")
        resultButtons.addWidget(self.batchLoadButton)
        resultButtons.addWidget(self.batchRefreshButton)
        bform.addRow(resultButtons)
        self.batchLog = qt.QPlainTextEdit()
        self.batchLog.readOnly = True
        self.batchLog.setMaximumBlockCount(2000)
        self.batchLog.setMaximumHeight(100)
        bform.addRow(self.batchLog)
        self.batchRun = None  # UniUltraSegmentLib.batch.BatchRun being followed
        self.batchRows = []
        self._batchLinesShown = 0
        self.batchTimer = qt.QTimer()
        self.batchTimer.setInterval(300)
        self.batchTimer.connect("timeout()", self.onBatchPoll)
        self.batchFromSceneButton.connect("clicked()", self.onBatchFromScene)
        self.batchRunButton.connect("clicked()", self.onBatchRun)
        self.batchCancelButton.connect("clicked()", self.onBatchCancel)
        self.batchLoadButton.connect("clicked()", self.onBatchLoad)
        self.batchRefreshButton.connect("clicked()", self.refreshBatchResults)
        self.batchManifest.connect("currentPathChanged(QString)", lambda _path: self.refreshBatchResults())
        self.batchOutput.connect("currentPathChanged(QString)", lambda _path: self.refreshBatchResults())

    def cleanup(self):
        if hasattr(self, "batchTimer"):
            self.batchTimer.stop()
        run = getattr(self, "batchRun", None)
        if run is not None and run.running:
            logging.info("UniUltraSegment: the batch keeps running in the background; run it again to follow or resume it")

    def batchSettings(self):
        from UniUltraSegmentLib.batch import BatchSettings
        from UniUltraSegmentLib.engine import DEFAULT_MODEL

        model = str(self.settings.value(SETTINGS_MODEL, DEFAULT_MODEL) or DEFAULT_MODEL)  # the effect's model
        return BatchSettings(manifest=self.batchManifest.currentPath, out_dir=self.batchOutput.currentPath,
                             prompts=self.batchPrompts.currentPath or None, model=model,
                             device=self.deviceCombo.currentText, png=self.batchPng.checked,
                             save_frames=self.batchSaveFrames.checked, redo=self.batchRedo.checked)

    def onBatchFromScene(self):
        from UniUltraSegmentLib.batch import write_scene_manifest

        out = self.batchOutput.currentPath
        if not out:
            slicer.util.errorDisplay("Choose the output folder first: the manifest and the frames go there.")
            return
        try:
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
            try:
                m = write_scene_manifest(self.logic.context(), out)
            finally:
                qt.QApplication.restoreOverrideCursor()
        except (ValueError, OSError) as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.batchManifest.currentPath = str(m.path)
        self.batchPrompts.currentPath = ""
        prompts = sum(len(c.prompts) for c in m.clips)
        text = f"Manifest: {len(m.clips)} cines, {prompts} key-frame boxes."
        if m.skipped:
            text += " Skipped: " + "; ".join(f"'{name}' ({why})" for name, why in m.skipped)
        self.batchStatus.text = text
        self.refreshBatchResults()

    def onBatchRun(self):
        from UniUltraSegmentLib.batch import BatchRun, progress_of

        if self.batchRun is not None and self.batchRun.running:
            return
        try:
            run = BatchRun(self.batchSettings())  # the manifest is read and checked here, nothing starts yet
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        if not self.logic.ensureDependencies():
            return
        before = progress_of(run.jobs, run.settings.out_dir)
        try:
            run.start()
        except OSError as exc:
            slicer.util.errorDisplay(f"Could not start the batch: {exc}")
            return
        self.batchRun = run
        self._batchLinesShown = 0
        self.batchLog.appendPlainText(f"$ {' '.join(run.cmd)}")
        resumed = before["done"] and not run.settings.redo
        self.batchStatus.text = (f"Resuming: {before['done']} of {before['clips']} clips are done already."
                                 if resumed else f"Starting: {before['clips']} clips.")
        self.batchProgress.value = 0
        self._setBatchRunning(True)
        self.batchTimer.start()

    def onBatchCancel(self):
        if self.batchRun is not None and self.batchRun.running:
            self.batchRun.cancel()
            self.batchStatus.text = "Stopping: the clip in progress is dropped, finished clips are kept."

    def _setBatchRunning(self, running):
        for w in (self.batchRunButton, self.batchFromSceneButton, self.batchManifest, self.batchPrompts,
                  self.batchOutput, self.batchSaveFrames, self.batchPng, self.batchRedo):
            w.enabled = not running
        self.batchCancelButton.enabled = running

    def onBatchPoll(self):
        run = self.batchRun
        if run is None:
            self.batchTimer.stop()
            return
        new = run.poll()
        for line in run.lines[self._batchLinesShown:]:
            self.batchLog.appendPlainText(line)
        self._batchLinesShown = len(run.lines)
        self.batchProgress.value = int(round(run.fraction * 1000))
        self.batchStatus.text = run.status_text()
        if any(e.get("event") in ("clip_done", "clip_failed") for e in new):
            self.refreshBatchResults()
        if run.running:
            return
        self.batchTimer.stop()
        self._setBatchRunning(False)
        self.batchStatus.text = run.status_text()
        self.refreshBatchResults()
        if run.status == "error":
            slicer.util.errorDisplay("The batch stopped: " + run.error_message())
        elif run.status in ("finished", "finished with failures") and any(r["status"] == "done" for r in self.batchRows):
            self.batchStatus.text += " Select a clip and press 'Load selected for review'."

    def refreshBatchResults(self):
        from UniUltraSegmentLib.batch import read_results

        out = self.batchOutput.currentPath
        jobs = None
        if self.batchManifest.currentPath:
            try:
                jobs = self.batchSettings().check()
            except ValueError as exc:
                self.batchStatus.text = str(exc)
        self.batchRows = read_results(out, jobs) if out else []
        self.batchTable.setRowCount(len(self.batchRows))
        for r, row in enumerate(self.batchRows):
            note = row["error"] or "; ".join(row["warnings"])
            cells = (row["name"], row["status"], "" if row["frames"] is None else str(row["frames"]), note)
            for c, text in enumerate(cells):
                self.batchTable.setItem(r, c, qt.QTableWidgetItem(text))
        done = sum(r["status"] == "done" for r in self.batchRows)
        if jobs and 0 < done < len(jobs):
            self.batchRunButton.text = f"Resume ({done} of {len(jobs)} done)"
        else:
            self.batchRunButton.text = "Run"
        self.batchLoadButton.enabled = done > 0

    def onBatchLoad(self):
        from UniUltraSegmentLib.batch import flagged_frames, load_result

        row = self.batchTable.currentRow()
        if not 0 <= row < len(self.batchRows) or self.batchRows[row]["status"] != "done":
            slicer.util.infoDisplay("Select a labelled clip (status 'done') in the table first.")
            return
        folder = self.batchRows[row]["folder"]
        try:
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
            try:
                res = load_result(self.logic.context(), folder)
            finally:
                qt.QApplication.restoreOverrideCursor()
        except (ValueError, OSError) as exc:
            slicer.util.errorDisplay(str(exc))
            return
        slicer.util.setSliceViewerLayers(background=res.cine.proxy, fit=True)
        slicer.modules.sequences.toolBar().setActiveBrowserNode(res.cine.browser)
        # the Segment Editor module's own parameter node (Modules/Scripted/SegmentEditor/SegmentEditor.py)
        editorNode = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if editorNode is not None:
            editorNode.SetAndObserveSourceVolumeNode(res.cine.proxy)
            editorNode.SetAndObserveSegmentationNode(res.segmentation)
        flags = flagged_frames(folder)
        check = "; ".join(f"{s}: frames {', '.join(map(str, fr[:12]))}{' ...' if len(fr) > 12 else ''}"
                          for s, fr in flags.items())
        self.batchStatus.text = (f"Loaded '{res.segmentation.GetName()}': scrub the cine to review; correct frames in "
                                 "the Segment Editor (each frame is saved as you edit)."
                                 + (f" Check first (flagged): {check}." if check else ""))


class UniUltraSegmentLogic(ScriptedLoadableModuleLogic):
    """Slicer-side services for the widget and the effect; heavy work is in the Qt-free modules."""

    def context(self):
        from UniUltraSegmentLib.context import slicer_app_context

        return slicer_app_context()

    @staticmethod
    def ensureDependencies() -> bool:
        """Install torch (PyTorch extension) and the engine's packages, only after the user agrees.

        Returns False (never raises) when the user declines or the installation fails: the error
        was shown by `tryWithErrorDisplay`, which re-raises after its dialog."""
        from UniUltraSegmentLib.engine import missing_dependencies

        missing = missing_dependencies()
        if not missing:
            return True
        problem = slicerVersionProblem()
        if problem:
            slicer.util.errorDisplay(problem)
            return False
        if not slicer.util.confirmOkCancelDisplay(
            "UniUltra needs these Python packages: " + ", ".join(missing) + ".\n"
            "Install them now? (This downloads several hundred MB and may take a few minutes.)"
        ):
            return False
        try:
            with slicer.util.tryWithErrorDisplay("Installing UniUltra's dependencies failed.", waitCursor=True):
                if "torch" in missing:
                    try:
                        import PyTorchUtils
                    except ImportError:
                        slicer.util.errorDisplay("Install the 'PyTorch' extension from the Extensions Manager, "
                                                 "restart, and try again.")
                        return False
                    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                        askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT,
                        torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
                    if torch is None:
                        return False
                if any(m != "torch" for m in missing):
                    os.environ.setdefault("SAM2_BUILD_CUDA", "0")  # sam2 builds from source: skip its CUDA extension
                    slicer.util.pip_install(PIP_REQUIREMENTS)
                    slicer.util.pip_install(PIP_SAM2)
        except Exception:  # noqa: BLE001 - already shown to the user
            return False
        still = missing_dependencies()
        if still:
            logging.error("UniUltra: still missing %s", still)
        return not still


class UniUltraSegmentTest(ScriptedLoadableModuleTest):
    """Drives the real UniUltra effect in Slicer: synthetic mouse events on the sample image, with a
    stand-in engine (the mask is the box).  The effect's controller is the one the pytest suite
    drives on slicer-core; this test adds what only the application has: the registered effect,
    PythonQt event translation, the editor widget's write route and its undo."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_EffectBoxToSegment()

    def test_EffectBoxToSegment(self):
        import numpy as np

        self.delayDisplay("Loading sample image")
        volume = slicer.util.loadVolume(str(SAMPLE_DIR / "CarotidUS.png"))
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("vessel")

        slicer.util.selectModule("SegmentEditor")
        editorWidget = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editorWidget.setSegmentationNode(segmentation)
        editorWidget.setSourceVolumeNode(volume)
        editorWidget.setCurrentSegmentID(segmentId)
        editorWidget.setActiveEffectByName("UniUltra")
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect, "UniUltra effect is not registered")
        effectSelf = effect.self()

        class BoxEngine:  # stand-in engine: the mask is the union of the boxes
            def predict(self, image, boxes, points, labels):
                mask = np.zeros(image.shape[:2], bool)
                for x0, y0, x1, y1 in boxes:
                    mask[y0 : y1 + 1, x0 : x1 + 1] = True
                return mask

            def propagate(self, frames, key_boxes, direction="both", progress=None, cancel=None):
                return [None] * len(frames)

        effectSelf.engine = BoxEngine()
        effectSelf.engineKey = effectSelf._settings()

        sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
        slicer.app.processEvents()
        sliceWidget.sliceController().fitSliceToBackground()
        view = sliceWidget.sliceView()
        w, h = view.width, view.height
        slicer.util.clickAndDrag(sliceWidget, start=(int(w * 0.4), int(h * 0.4)), end=(int(w * 0.6), int(h * 0.6)), steps=5)
        controller = effectSelf.controller
        self.assertIsNotNone(controller.preview_mask(), "no preview after the box drag")  # synchronous: no waiting
        self.assertTrue(controller.preview_mask().any())
        preview = slicer.mrmlScene.GetFirstNodeByName("UniUltra preview")
        self.assertIsNotNone(preview)
        self.assertFalse(preview.GetSaveWithScene())
        effectSelf.onApply()
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertGreater(int(labelmap.sum()), 0)
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByName("UniUltra preview"))
        editorWidget.undo()
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertEqual(int(labelmap.sum()), 0, "undo did not remove the applied mask")
        editorWidget.setActiveEffectByName("")
        self.delayDisplay("UniUltra effect test passed")
