"""UniUltraTrain: fine-tune (and distill) UniUltra on the user's own labelled ultrasound, inside Slicer.

Three steps, each a panel: curate (segmentations in the scene, or a folder of .seg.nrrd +
images, exported as the engine's dataset layout with a summary table and a preview), train
(`uniultra train` in a `PythonSlicer` subprocess: live progress, loss/Dice chart, log, Cancel
and Resume), and results (validation Dice before/after next to the box baselines; register
the model so UniUltraSegment can use it at once).  A fourth panel distills a small student.

All logic lives in the Qt-free `UniUltraTrainLib` (tested on slicer-core); this file only wires
widgets to it.  Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import datetime as _dt
import logging
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
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
SETTINGS_MODEL = "UniUltra/Model"  # the model UniUltraSegment uses (shared setting)
SETTINGS_DEVICE = "UniUltra/Device"
SETTINGS_WORKDIR = "UniUltraTrain/WorkFolder"
POLL_MS = 500
CHART_EVERY_MS = 2000


class UniUltraTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UniUltra Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Sequences"]
        self.parent.contributors = ["UniUltra developers"]
        self.parent.helpText = _("""Fine-tune UniUltra on your own labelled ultrasound: export segmentations
(2D, colour, 3D, cine) as a training dataset, train with a parameter-efficient method (CH-Adapter by
default) in a background process, compare validation Dice before and after, and register the model for
UniUltra Segment. Distill a small student for fast CPU use.""")
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _("""Built on Meta's SAM2 (Apache-2.0).""")


def _checkableList():
    w = qt.QListWidget()
    w.setSelectionMode(qt.QAbstractItemView.NoSelection)
    w.setMaximumHeight(110)
    return w


def _checkedTexts(listWidget):
    return [listWidget.item(i).text() for i in range(listWidget.count)
            if listWidget.item(i).checkState() == qt.Qt.Checked]


def _fillTable(table, rows, columns=None):
    """Show a list of dicts in a QTableWidget (numbers with 3 decimals)."""
    columns = columns or (list(rows[0].keys()) if rows else [])
    table.clear()
    table.setColumnCount(len(columns))
    table.setHorizontalHeaderLabels(columns)
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, key in enumerate(columns):
            v = row.get(key)
            text = "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
            table.setItem(r, c, qt.QTableWidgetItem(text))
    table.resizeColumnsToContents()


class UniUltraTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = UniUltraTrainLogic()
        self.settings = qt.QSettings()
        self.session = None  # UniUltraTrainLib.session.TrainSession of the last Start (its stages and results)
        self.chart = None
        self.lastChart = 0
        self.exportResult = None
        self._setupDataPanel()
        self._setupTrainPanel()
        self._setupResultPanel()
        self._setupDistillPanel()
        self.layout.addStretch(1)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        self.refreshSegmentations()

    def cleanup(self):
        self.timer.stop()
        self.removeObservers()
        if self.session is not None and self.session.active:
            logging.info("UniUltraTrain: leaving the training or evaluation process running in the background")

    def workFolder(self) -> Path:
        return Path(self.settings.value(SETTINGS_WORKDIR, str(Path.home() / "UniUltra")))

    # ------------------------------------------------------------------ 1. data
    def _setupDataPanel(self):
        import ctk

        box = ctk.ctkCollapsibleButton()
        box.text = "1. Training data"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)

        self.sceneRadio = qt.QRadioButton("Segmentations in the scene")
        self.folderRadio = qt.QRadioButton("Folder of .seg.nrrd + images")
        self.sceneRadio.checked = True
        row = qt.QHBoxLayout()
        row.addWidget(self.sceneRadio)
        row.addWidget(self.folderRadio)
        form.addRow(row)

        self.segmentationList = _checkableList()
        self.segmentationList.toolTip = ("Segmentations to export. Each is one case (its volume, or its cine "
                                         "loop when it is a per-frame segmentation in a sequence browser).")
        form.addRow("Segmentations:", self.segmentationList)
        self.segmentList = _checkableList()
        self.segmentList.toolTip = "Segments to learn: one target is written as 255, several as 1, 2, ... in this order"
        form.addRow("Target segments:", self.segmentList)
        self.inputFolder = ctk.ctkPathLineEdit()
        self.inputFolder.filters = ctk.ctkPathLineEdit.Dirs
        self.inputFolder.enabled = False
        form.addRow("Input folder:", self.inputFolder)

        self.orientationCombo = qt.QComboBox()
        self.orientationCombo.addItems(["axial", "sagittal", "coronal"])
        self.orientationCombo.toolTip = "3D volumes are cut into slices along their own axis closest to this view"
        form.addRow("3D slicing:", self.orientationCombo)
        self.valFraction = qt.QDoubleSpinBox()
        self.valFraction.setRange(0.0, 0.9)
        self.valFraction.setSingleStep(0.05)
        self.valFraction.value = 0.2
        self.valFraction.toolTip = "Share of cases (not frames) kept for validation; a case never straddles splits"
        form.addRow("Validation share:", self.valFraction)
        self.seedSpin = qt.QSpinBox()
        self.seedSpin.setRange(0, 10**6)
        form.addRow("Seed:", self.seedSpin)
        self.datasetFolder = ctk.ctkPathLineEdit()
        self.datasetFolder.filters = ctk.ctkPathLineEdit.Dirs
        self.datasetFolder.currentPath = str(self.workFolder() / "datasets" / _dt.date.today().isoformat())
        form.addRow("Dataset folder:", self.datasetFolder)

        self.exportButton = qt.QPushButton("Export dataset")
        form.addRow(self.exportButton)
        self.summaryTable = qt.QTableWidget()
        self.summaryTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.summaryTable.setMaximumHeight(160)
        form.addRow(self.summaryTable)
        self.previewLabel = qt.QLabel()
        self.previewLabel.setAlignment(qt.Qt.AlignCenter)
        form.addRow(self.previewLabel)

        self.sceneRadio.connect("toggled(bool)", self.onSourceToggled)
        self.segmentationList.connect("itemChanged(QListWidgetItem*)", lambda _item: self.refreshSegments())
        self.exportButton.connect("clicked()", self.onExport)

    def onSourceToggled(self, scene):
        self.segmentationList.enabled = self.segmentList.enabled = scene
        self.inputFolder.enabled = not scene

    def onSceneClosed(self, caller=None, event=None):
        self.chart = None  # its nodes went with the scene; a new chart is made for the next run

    def onSceneChanged(self, caller=None, event=None):
        qt.QTimer.singleShot(0, self.refreshSegmentations)  # after the node is fully added/removed

    def refreshSegmentations(self):
        checked = set(_checkedTexts(self.segmentationList))
        self.segmentationList.blockSignals(True)
        self.segmentationList.clear()
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            if not node.GetHideFromEditors():
                item = qt.QListWidgetItem(node.GetName())
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if node.GetName() in checked else qt.Qt.Unchecked)
                self.segmentationList.addItem(item)
        self.segmentationList.blockSignals(False)
        self.refreshSegments()

    def selectedSegmentations(self):
        names = set(_checkedTexts(self.segmentationList))
        return [n for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode") if n.GetName() in names]

    def refreshSegments(self):
        from UniUltraTrainLib.curate import segment_names

        checked = set(_checkedTexts(self.segmentList))
        names = []
        for node in self.selectedSegmentations():
            names += [n for n in segment_names(node) if n not in names]
        self.segmentList.clear()
        for name in names:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if (name in checked or len(names) == 1) else qt.Qt.Unchecked)
            self.segmentList.addItem(item)

    def onExport(self):
        out = self.datasetFolder.currentPath
        if not out:
            slicer.util.errorDisplay("Choose a dataset folder first.")
            return
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            if self.folderRadio.checked:
                result = self.logic.exportFolder(self.inputFolder.currentPath, out, self.orientationCombo.currentText,
                                                 self.valFraction.value, self.seedSpin.value)
            else:
                targets = _checkedTexts(self.segmentList)
                result = self.logic.exportScene(self.selectedSegmentations(), targets, out,
                                                self.orientationCombo.currentText, self.valFraction.value,
                                                self.seedSpin.value)
            self.exportResult = result
            _fillTable(self.summaryTable, result.summary)
            if result.preview is not None:
                pixmap = qt.QPixmap(str(result.preview))
                self.previewLabel.setPixmap(pixmap.scaledToWidth(min(pixmap.width(), 480)))
            self.trainData.currentPath = str(result.out)
            counts = ", ".join(f"{v} {k}" for k, v in sorted(result.counts.items()))
            slicer.util.showStatusMessage(f"Exported {counts} frames to {result.out}", 5000)

    # ------------------------------------------------------------------ 2. train
    def _setupTrainPanel(self):
        import ctk
        from UniUltraTrainLib.runner import METHODS

        box = ctk.ctkCollapsibleButton()
        box.text = "2. Train"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)

        self.trainData = ctk.ctkPathLineEdit()
        self.trainData.filters = ctk.ctkPathLineEdit.Dirs
        form.addRow("Dataset:", self.trainData)
        self.baseCombo = qt.QComboBox()
        self.baseCombo.editable = True
        self.baseCombo.toolTip = "Registry name (bundled default, SAM2/SAM2.1, a model trained earlier) or a checkpoint file"
        form.addRow("Base model:", self.baseCombo)
        self.baseFile = ctk.ctkPathLineEdit()
        self.baseFile.filters = ctk.ctkPathLineEdit.Files
        self.baseFile.nameFilters = ["Checkpoints (*.pt *.pth *.ckpt)"]
        self.baseFile.toolTip = "A SAM2/SAM2.1 checkpoint file or an earlier trained model.pt (overrides the name)"
        form.addRow("  or checkpoint:", self.baseFile)
        self.methodCombo = qt.QComboBox()
        self.methodCombo.addItems(list(METHODS))
        form.addRow("Adaptation:", self.methodCombo)
        self.epochsSpin = qt.QSpinBox()
        self.epochsSpin.setRange(1, 10000)
        self.epochsSpin.value = 20
        form.addRow("Epochs:", self.epochsSpin)
        self.lrEdit = qt.QLineEdit("1e-4")
        form.addRow("Learning rate:", self.lrEdit)
        self.sizeCombo = qt.QComboBox()
        self.sizeCombo.addItems(["model default", "256", "512", "1024"])
        form.addRow("Image size:", self.sizeCombo)
        self.deviceCombo = qt.QComboBox()
        self.deviceCombo.addItems(["auto", "cpu", "cuda", "mps"])
        form.addRow("Device:", self.deviceCombo)
        self.measureBefore = qt.QCheckBox("Measure validation Dice of the base model first")
        self.measureBefore.checked = True
        form.addRow(self.measureBefore)
        self.runFolder = ctk.ctkPathLineEdit()
        self.runFolder.filters = ctk.ctkPathLineEdit.Dirs
        self.defaultRunFolder = self._newRunFolder()
        self.runFolder.currentPath = self.defaultRunFolder
        form.addRow("Run folder:", self.runFolder)

        buttons = qt.QHBoxLayout()
        self.startButton = qt.QPushButton("Start")
        self.cancelButton = qt.QPushButton("Cancel")
        self.resumeButton = qt.QPushButton("Resume")
        self.cancelButton.enabled = False
        for b in (self.startButton, self.cancelButton, self.resumeButton):
            buttons.addWidget(b)
        form.addRow(buttons)
        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 1)
        self.progressBar.value = 0
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)

        self.plotView = slicer.qMRMLPlotView()
        self.plotView.setMRMLScene(slicer.mrmlScene)
        self.plotView.setMinimumHeight(220)
        form.addRow(self.plotView)
        self.logView = qt.QPlainTextEdit()
        self.logView.readOnly = True
        self.logView.setMaximumBlockCount(5000)
        self.logView.setMinimumHeight(120)
        form.addRow(self.logView)

        self.startButton.connect("clicked()", lambda: self.onStart(resume=False))
        self.resumeButton.connect("clicked()", lambda: self.onStart(resume=True))
        self.cancelButton.connect("clicked()", self.onCancel)
        self.refreshBases()

    def refreshBases(self):
        current = self.baseCombo.currentText
        self.baseCombo.clear()
        from UniUltraTrainLib.runner import BASES

        names = list(BASES) + [n for n in self.logic.userModels() if n not in BASES]
        self.baseCombo.addItems(names)
        if current:
            self.baseCombo.setCurrentText(current)

    def trainOptions(self, resume=False):
        from UniUltraTrainLib.runner import TrainOptions

        try:
            lr = float(self.lrEdit.text)
        except ValueError:
            raise ValueError(f"learning rate '{self.lrEdit.text}' is not a number: use e.g. 1e-4") from None
        size = self.sizeCombo.currentText
        return TrainOptions(
            data=[self.trainData.currentPath],
            out=self.runFolder.currentPath,
            base=self.baseFile.currentPath or self.baseCombo.currentText,
            method=self.methodCombo.currentText,
            epochs=self.epochsSpin.value,
            lr=lr,
            image_size=None if not size.isdigit() else int(size),
            device=self.deviceCombo.currentText,
            seed=self.seedSpin.value,
            resume=resume,
        )

    def _newRunFolder(self):
        return str(self.workFolder() / "runs" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))

    def onStart(self, resume=False, distill=False):
        if self.session is not None and self.session.active:
            slicer.util.infoDisplay("A training run is still going: cancel it first.")
            return
        if not self.logic.ensureDependencies():
            return
        if not resume and self.runFolder.currentPath == self.defaultRunFolder and self.logic.canResume(self.defaultRunFolder):
            # the default folder was made when the panel was built: a second run gets a fresh one
            self.defaultRunFolder = self._newRunFolder()
            self.runFolder.currentPath = self.defaultRunFolder
        try:
            self._start(resume, distill)
        except Exception:  # noqa: BLE001 - shown by tryWithErrorDisplay, which re-raises after its dialog
            self._setRunning(False)

    def _start(self, resume, distill):
        from UniUltraTrainLib.session import TrainSession

        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            options = self.distillOptions(resume) if distill else self.trainOptions(resume)
            options.check()
            if resume and not self.logic.canResume(options.out):
                raise ValueError(f"'{options.out}' has no resume state (last.pt): start a new run instead")
            if not resume and self.logic.canResume(options.out):
                raise ValueError(f"'{options.out}' already holds a run: press Resume, or choose another run folder")
            base = options.teacher if distill else options.base
            device = self.deviceCombo.currentText
            self.session = TrainSession(
                options, distill=distill,
                measure_before=self.measureBefore.checked and not resume and self.logic.hasWeights(base),
                start_training=self.logic.startTraining,
                start_evaluation=lambda model, data: self.logic.startEvaluation(model, data, device))
            self.logView.clear()
            self._showResults()
            self._setRunning(True)
            self.timer.start()
            self._show(self.session.start())  # a launch that fails ends the session: timer off, buttons back

    def onCancel(self):
        if self.session is not None:
            self._show(self.session.cancel())

    def appendLog(self, text):
        self.logView.appendPlainText(text)

    def _setRunning(self, running):
        self.startButton.enabled = self.resumeButton.enabled = not running
        self.distillButton.enabled = not running
        self.cancelButton.enabled = running

    def onPoll(self):
        import time

        if self.session is None:
            self.timer.stop()
            return
        update = self.session.poll()
        run = self.session.run
        now = time.monotonic() * 1000
        if run is not None and self.chart is not None and (
                update.training_ended or (run.running and now - self.lastChart > CHART_EVERY_MS)):
            self.lastChart = now
            self.chart.update(run.metrics())
        self._show(update)

    def _show(self, update):
        """Show what the session reports (UniUltraTrainLib.session.Update)."""
        for line in update.log:
            self.appendLog(line)
        if update.training_started:
            self._resetChart()
        if update.progress:
            done, total = update.progress
            self.progressBar.setRange(0, total)
            self.progressBar.value = done
        if update.status is not None:
            self.statusLabel.text = update.status
        if update.results_changed:
            self._showResults()
        if update.ended:
            self.timer.stop()
            self._setRunning(False)
            self._showResults()
        if update.models_changed:
            self.refreshBases()
        if update.error:
            slicer.util.errorDisplay(update.error)

    def _resetChart(self):
        from UniUltraTrainLib.chart import TrainingChart

        if self.chart is None:
            self.chart = TrainingChart.create(slicer.mrmlScene)
            viewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            viewNode.SetSaveWithScene(False)
            viewNode.SetPlotChartNodeID(self.chart.chart.GetID())
            self.plotView.setMRMLPlotViewNode(viewNode)
        self.chart.update({})

    def _showResults(self):
        from UniUltraTrainLib.runner import comparison_rows

        session = self.session
        results = session.results if session is not None else {}
        if session is not None and session.distill:
            rows = comparison_rows(results.get("teacher"), results.get("after"), ("teacher", "student"))
            _fillTable(self.distillTable, rows, ["model", "dice", "seconds_per_image"])
        rows = comparison_rows(results.get("before"), results.get("after"))
        _fillTable(self.resultTable, rows, ["model", "dice", "seconds_per_image"])
        self.registerButton.enabled = session is not None and session.can_register

    # ------------------------------------------------------------------ 3. results
    def _setupResultPanel(self):
        import ctk

        box = ctk.ctkCollapsibleButton()
        box.text = "3. Result"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)
        self.resultTable = qt.QTableWidget()
        self.resultTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.resultTable.setMaximumHeight(140)
        form.addRow(self.resultTable)
        note = qt.QLabel("Validation Dice with hand-drawn-like boxes (10% jitter). A model is only worth "
                         "using where it clearly beats the ellipse-in-box baseline.")
        note.wordWrap = True
        form.addRow(note)
        self.modelName = qt.QLineEdit(f"my-us-{_dt.date.today().strftime('%Y%m%d')}")
        form.addRow("Model name:", self.modelName)
        self.useAfterRegister = qt.QCheckBox("Use it in UniUltra Segment")
        self.useAfterRegister.checked = True
        form.addRow(self.useAfterRegister)
        self.registerButton = qt.QPushButton("Register model")
        self.registerButton.enabled = False
        form.addRow(self.registerButton)
        self.registerButton.connect("clicked()", self.onRegister)

    def onRegister(self):
        if self.session is None or not self.session.can_register:
            return
        with slicer.util.tryWithErrorDisplay("Registering the model failed.", waitCursor=True):
            session = self.session
            entry = self.logic.register(self.modelName.text.strip(), session.run, session.results.get("before"),
                                        session.results.get("after"))
            if self.useAfterRegister.checked:
                self.settings.setValue(SETTINGS_MODEL, entry.name)
            self.refreshBases()
            slicer.util.showStatusMessage(f"Registered '{entry.name}'", 5000)

    # ------------------------------------------------------------------ 4. distill
    def _setupDistillPanel(self):
        import ctk
        from UniUltraTrainLib.runner import BASES, DEFAULT_STUDENT, STUDENTS

        box = ctk.ctkCollapsibleButton()
        box.text = "4. Distill a small model"
        box.collapsed = True
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)
        self.teacherCombo = qt.QComboBox()
        self.teacherCombo.editable = True
        self.teacherCombo.addItems(BASES)
        form.addRow("Teacher:", self.teacherCombo)
        self.studentCombo = qt.QComboBox()
        self.studentCombo.addItems(list(STUDENTS))
        self.studentCombo.setCurrentText(DEFAULT_STUDENT)
        form.addRow("Student size:", self.studentCombo)
        self.distillButton = qt.QPushButton("Start distillation")
        form.addRow(self.distillButton)
        self.distillTable = qt.QTableWidget()
        self.distillTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.distillTable.setMaximumHeight(140)
        form.addRow(self.distillTable)
        self.distillButton.connect("clicked()", lambda: self.onStart(resume=False, distill=True))

    def distillOptions(self, resume=False):
        from UniUltraTrainLib.runner import DistillOptions

        t = self.trainOptions(resume)
        return DistillOptions(data=t.data, out=t.out, teacher=self.teacherCombo.currentText,
                              student=self.studentCombo.currentText, epochs=t.epochs, lr=t.lr,
                              image_size=t.image_size, device=t.device, seed=t.seed, resume=resume)


class UniUltraTrainLogic(ScriptedLoadableModuleLogic):
    """Slicer-side services; the work itself is in UniUltraTrainLib (Qt-free, tested on slicer-core)."""

    def context(self):
        from UniUltraSegmentLib.context import slicer_app_context

        return slicer_app_context()

    def exportScene(self, segmentationNodes, targets, out, orientation="axial", valFraction=0.2, seed=0):
        from UniUltraTrainLib import curate

        ctx = self.context()
        cases = [curate.make_case(ctx, node) for node in segmentationNodes]
        return curate.export_dataset(cases, targets, out, valFraction, seed, orientation)

    def exportFolder(self, folder, out, orientation="axial", valFraction=0.2, seed=0):
        """Load every .seg.nrrd + image pair of `folder` into a private scene and export all segments."""
        from UniUltraSegmentLib.context import create_context
        from UniUltraTrainLib import curate

        # a scratch scene: the user's scene is not touched; no second Segmentations logic (its
        # converter rules are process-wide and Slicer's own module registered them already)
        ctx = create_context(register_converters=False)
        try:
            cases = curate.cases_from_folder(ctx, folder)
            names = []
            for c in cases:
                names += [n for n in curate.segment_names(c.seg_node) if n not in names]
            return curate.export_dataset(cases, names, out, valFraction, seed, orientation)
        finally:
            ctx.scene.Clear(1)

    @staticmethod
    def ensureDependencies() -> bool:
        try:
            from UniUltraSegment import UniUltraSegmentLogic
        except ImportError:
            slicer.util.errorDisplay("UniUltraTrain needs the UniUltraSegment module (same extension).")
            return False
        return UniUltraSegmentLogic.ensureDependencies()

    @staticmethod
    def canResume(out) -> bool:
        from UniUltraTrainLib.runner import can_resume

        return can_resume(out)

    @staticmethod
    def hasWeights(model) -> bool:
        """True for a checkpoint file or a registry model whose weights are on this machine."""
        if str(model).endswith((".pt", ".pth", ".ckpt")):
            return Path(model).is_file()
        try:
            from uniultra.registry import load_registry  # torch-free

            entry = load_registry().get(model)
            return entry is not None and entry.installed
        except Exception:  # noqa: BLE001 - no engine yet: skip the "before" measurement
            return False

    @staticmethod
    def userModels() -> list:
        """Names of the models the user trained or registered (the engine's one registry)."""
        from UniUltraSegmentLib import models

        return [e.name for e in models.load_registry() if e.source == "user"]

    @staticmethod
    def startTraining(options):
        from UniUltraTrainLib.runner import TrainingRun

        return TrainingRun(options).start()

    @staticmethod
    def startEvaluation(model, data, device="auto"):
        from UniUltraTrainLib.runner import EngineProcess, evaluate_args

        return EngineProcess(evaluate_args(model, data, "val", device)).start()

    @staticmethod
    def register(name, run, before=None, after=None):
        from UniUltraTrainLib.runner import register_model

        return register_model(name, run.out, run.options, before, after)


class UniUltraTrainTest(ScriptedLoadableModuleTest):
    """Exports a labelled synthetic image from the scene and checks the dataset files."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_ExportScene()
        self.setUp()
        self.test_CommandLine()

    def test_ExportScene(self):
        import csv
        import tempfile

        import numpy as np

        self.delayDisplay("Exporting a labelled image")
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "us")
        image = np.zeros((1, 40, 50), np.uint8)
        image[0, 10:20, 15:30] = 200
        slicer.util.updateVolumeFromArray(volume, image)
        volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "us segmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("lesion")
        slicer.util.updateSegmentBinaryLabelmapFromArray((image > 100).astype(np.uint8), segmentation, segmentId, volume)

        out = Path(tempfile.mkdtemp()) / "dataset"
        result = UniUltraTrainLogic().exportScene([segmentation], ["lesion"], str(out))
        with open(out / "split.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual([r["id"] for r in rows], ["us_0000"])
        from PIL import Image

        mask = np.array(Image.open(out / "masks" / "us_0000.png"))
        img = np.array(Image.open(out / "images" / "us_0000.png"))
        self.assertTrue(np.array_equal(mask > 0, img > 100), "mask and image are not aligned")
        self.assertEqual(result.summary[-1]["frames"], 1)
        self.delayDisplay("Export test passed")

    def test_CommandLine(self):
        import tempfile

        from UniUltraTrainLib.runner import TrainOptions, command, train_args

        data = tempfile.mkdtemp()
        options = TrainOptions(data=[data], out=str(Path(data) / "run"), epochs=2, register="x")
        cmd = command(train_args(options))
        self.assertEqual(cmd[1:3], ["-m", "uniultra.cli"])  # the engine's CLI, whatever the interpreter
        self.assertIn("--config", cmd)  # the runner launches the recipe file it writes
        recipe = options.write_recipe()
        self.assertEqual(cmd[cmd.index("--config") + 1], str(recipe))
        self.assertIn('"epochs": 2', recipe.read_text(encoding="utf-8"))
        self.delayDisplay("Command line test passed")
