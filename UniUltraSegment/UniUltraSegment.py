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
SETTINGS_CACHE = "UniUltra/CacheFolder"
PIP_REQUIREMENTS = ["SimpleITK", "hydra-core", "iopath", "pillow", "tqdm", "sam2"]


class UniUltraSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UniUltra Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Sequences"]
        self.parent.contributors = ["UniUltra developers"]
        self.parent.helpText = """Box-prompt segmentation of 2D, colour, cine and 3D ultrasound with a
parameter-efficient SAM2 model. Use the "UniUltra" effect in the Segment Editor; manage models and
label cine loops here."""
        self.parent.acknowledgementText = """Built on Meta's SAM2 (Apache-2.0). Sample data: Momot 2022,
common carotid artery ultrasound (CC BY 4.0)."""
        slicer.app.connect("startupCompleted()", registerEditorEffect)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerEditorEffect():
    """Register the effect with the Segment Editor (called once the application is up)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    effectFilename = MODULE_DIR / "UniUltraSegmentLib" / "SegmentEditorEffect.py"
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
        self.openFolderButton = qt.QPushButton("Open folder")
        self.clearButton = qt.QPushButton("Clear downloads")
        for b in (self.useButton, self.downloadButton, self.openFolderButton, self.clearButton):
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
        self.openFolderButton.connect("clicked()", self.onOpenFolder)
        self.clearButton.connect("clicked()", self.onClear)
        self.cancelDownloadButton.connect("clicked()", self.onCancelDownload)
        self.checkpointSelector.connect("currentPathChanged(QString)", self.onCheckpointChosen)
        self.deviceCombo.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.downloadCancelled = False

    def refreshModels(self):
        from UniUltraSegmentLib import models

        self.entries = models.load_registry(cache_dir=self.logic.cacheDir())
        cache = self.logic.cacheDir()
        self.modelTable.setRowCount(len(self.entries))
        for row, entry in enumerate(self.entries):
            self.modelTable.setItem(row, 0, qt.QTableWidgetItem(entry.name))
            self.modelTable.setItem(row, 1, qt.QTableWidgetItem(models.model_state(entry, cache)))
            self.modelTable.setItem(row, 2, qt.QTableWidgetItem(entry.license))
        self.activeModelLabel.text = str(self.settings.value(SETTINGS_MODEL, "uniultra-mini-us (bundled)"))

    def selectedEntry(self):
        row = self.modelTable.currentRow()
        return self.entries[row] if 0 <= row < len(self.entries) else None

    def onUseModel(self):
        from UniUltraSegmentLib import models

        entry = self.selectedEntry()
        if entry is None:
            return
        path = models.model_path(entry, self.logic.cacheDir())
        self.settings.setValue(SETTINGS_MODEL, str(path) if path.exists() else entry.name)
        self.refreshModels()

    def onDownload(self):
        from UniUltraSegmentLib import models

        entry = self.selectedEntry()
        if entry is None:
            slicer.util.infoDisplay("Select a model in the table first.")
            return
        if not entry.url:
            slicer.util.infoDisplay(f"'{entry.name}' is {models.model_state(entry, self.logic.cacheDir())}: "
                                    "there is nothing to download.")
            return
        dest = models.model_path(entry, self.logic.cacheDir())
        if not slicer.util.confirmOkCancelDisplay(
            f"Download '{entry.name}' ({entry.license}) from\n{entry.url}\ninto\n{dest}?\n\n"
            "The file is checked against its SHA-256 before it is used."
        ):
            return
        self.downloadCancelled = False
        self.downloadProgress.visible = self.cancelDownloadButton.visible = True
        self.downloadButton.enabled = False

        def progress(done, total):
            self.downloadProgress.maximum = max(total, 0) if total > 0 else 0
            self.downloadProgress.value = done if total > 0 else 0
            slicer.app.processEvents()  # keeps the Cancel button responsive during the download

        try:
            models.download(entry.url, dest, entry.sha256 or None, progress, lambda: self.downloadCancelled)
            self.settings.setValue(SETTINGS_MODEL, str(dest))
        except models.DownloadCancelled:
            slicer.util.showStatusMessage("Download cancelled", 3000)
        except (OSError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc))
        finally:
            self.downloadProgress.visible = self.cancelDownloadButton.visible = False
            self.downloadButton.enabled = True
            self.refreshModels()

    def onCancelDownload(self):
        self.downloadCancelled = True

    def onOpenFolder(self):
        folder = self.logic.cacheDir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClear(self):
        from UniUltraSegmentLib import models

        if slicer.util.confirmYesNoDisplay(f"Delete all downloaded models in {self.logic.cacheDir()}?"):
            n = models.clear_cache(self.logic.cacheDir())
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
        editorNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
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


class UniUltraSegmentLogic(ScriptedLoadableModuleLogic):
    """Slicer-side services for the widget and the effect; heavy work is in the Qt-free modules."""

    def context(self):
        from UniUltraSegmentLib.context import slicer_app_context

        return slicer_app_context()

    @staticmethod
    def cacheDir() -> Path:
        from UniUltraSegmentLib import models

        custom = qt.QSettings().value(SETTINGS_CACHE, "")
        return Path(custom) if custom else models.default_cache_dir()

    @staticmethod
    def ensureDependencies() -> bool:
        """Install torch (PyTorch extension) and the engine's packages, only after the user agrees."""
        from UniUltraSegmentLib.engine import missing_dependencies

        missing = missing_dependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            "UniUltra needs these Python packages: " + ", ".join(missing) + ".\n"
            "Install them now? (This downloads several hundred MB and may take a few minutes.)"
        ):
            return False
        with slicer.util.tryWithErrorDisplay("Installing UniUltra's dependencies failed.", waitCursor=True):
            if "torch" in missing:
                try:
                    import PyTorchUtils
                except ImportError:
                    slicer.util.errorDisplay("Install the 'PyTorch' extension from the Extensions Manager, restart, and try again.")
                    return False
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    return False
            if any(m != "torch" for m in missing):
                os.environ.setdefault("SAM2_BUILD_CUDA", "0")  # sam2 builds from source: skip its CUDA extension
                slicer.util.pip_install(" ".join(PIP_REQUIREMENTS))  # a string works on every Slicer 5.x
        still = missing_dependencies()
        if still:
            logging.error("UniUltra: still missing %s", still)
        return not still


class UniUltraSegmentTest(ScriptedLoadableModuleTest):
    """Drives the UniUltra effect with synthetic mouse events on the sample image (stand-in predictor)."""

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

        class BoxPredictor:  # stand-in engine: the mask is the box itself
            def set_image(self, image):
                self.shape = image.shape[:2]

            def predict(self, boxes=None, points=None, labels=None, refine=False):
                masks = np.zeros((len(boxes or [1]), *self.shape), bool)
                for i, (x0, y0, x1, y1) in enumerate(boxes or []):
                    masks[i, y0 : y1 + 1, x0 : x1 + 1] = True

                class R:
                    pass

                r = R()
                r.masks, r.scores = masks, np.ones(len(masks))
                return r

        from UniUltraSegmentLib.engine import DEFAULT_MODEL

        effectSelf.predictor = BoxPredictor()
        effectSelf.predictorKey = (qt.QSettings().value(SETTINGS_MODEL, DEFAULT_MODEL), qt.QSettings().value(SETTINGS_DEVICE, "cpu"))

        sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
        slicer.app.processEvents()
        sliceWidget.sliceController().fitSliceToBackground()
        view = sliceWidget.sliceView()
        w, h = view.width, view.height
        slicer.util.clickAndDrag(sliceWidget, start=(int(w * 0.4), int(h * 0.4)), end=(int(w * 0.6), int(h * 0.6)), steps=5)
        for _ in range(100):  # wait for the worker thread
            slicer.app.processEvents()
            if effectSelf.previewMask is not None:
                break
            qt.QThread.msleep(20)
        self.assertIsNotNone(effectSelf.previewMask, "no preview after the box drag")
        effectSelf.onApply()
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertGreater(int(labelmap.sum()), 0)
        editorWidget.undo()
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertEqual(int(labelmap.sum()), 0, "Ctrl+Z (undo) did not remove the applied mask")
        self.delayDisplay("UniUltra effect test passed")
