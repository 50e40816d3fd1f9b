"""MiMSlicer: segment CT with MiM (Mask in Mask) networks, preview the mask-in-mask levels
of a pre-trained model, and fine-tune on local annotated cases.

This file is GUI wiring only (Module, parameter node, Widget, Logic, Test). Everything that
computes lives in MiMSlicerLib (MRML <-> arrays, the background job runner, results to
nodes) and in the bundled mimcore package, which runs in a child process.
"""

import logging
import time
from collections import deque
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)

from MiMSlicerLib import dependencies

DEVICE_CHOICES = list(dependencies.DEVICE_CHOICES)

# Parameters that the widget code keeps up to date itself instead of binding a widget
# through SlicerParameterName: the model lists change at run time (a combo box bound by
# the wrapper needs fixed choices) and the fine-tuning cases are shown in a table.
# Testing/slicer/test_ui_bindings.py checks every other parameter has a bound widget.
WIDGET_MANAGED_PARAMETERS = ("modelName", "finetuneInitModel", "finetuneVolumes", "finetuneSegmentations")

# Item of the "Start from" combo box that means "the pre-training checkpoint below".
CHECKPOINT_INIT_ITEM = "__checkpoint__"

# Path parameters and their ctkPathLineEdit. The line edit reports a path only when its text is
# acceptable input, and empty text is not: clearing the field leaves the old path in the parameter
# node. The widget code treats an empty field as unset and resets the parameter when the user is
# not typing (the reset makes the wrapper write "." back into the field).
PATH_FIELDS = (("previewCheckpoint", "previewCheckpointPathLineEdit"), ("finetuneFolder", "finetuneFolderPathLineEdit"),
               ("finetuneInitPath", "finetuneInitPathLineEdit"))


#
# MiMSlicer
#


class MiMSlicer(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MiM Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # the PyTorch extension is optional at run time: see MiMSlicerLib.dependencies
        self.parent.contributors = ["MiM Slicer contributors (https://github.com/mim-slicer/SlicerMiM)"]
        # _() function marks text as translatable to other languages
        self.parent.helpText = _("""
Segment CT volumes with networks pre-trained by MiM (Mask in Mask, hierarchical masked image modelling),
look at what a pre-trained model reconstructs at each of the three mask-in-mask levels, and fine-tune a
model on your own annotated cases. Every job runs in a background process: Slicer stays responsive,
the progress bar shows the stage and the remaining time, and Cancel stops the job.
See the <a href="https://github.com/mim-slicer/SlicerMiM#use-in-3d-slicer">module documentation</a>.
""")
        self.parent.acknowledgementText = _("""
MiM is described in J. Zhuang et al., "MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image
Analysis", IEEE Transactions on Medical Imaging, 2025. The module uses PyTorch, MONAI and SimpleITK, and
follows the structure of 3D Slicer's scripted module template.
""")


#
# MiMSlicerParameterNode
#


@parameterNodeWrapper
class MiMSlicerParameterNode:
    """
    The parameters of the module, saved with the scene.

    Segment: inputVolume, modelName (library model), segmentDevice, outputSegmentation.
    Mask-in-mask preview: previewCheckpoint (pre-training run or checkpoint), previewVolume,
        previewCenter (markups point; the crosshair when empty), previewDevice, previewLevel
        and previewIndex (which level / which volume of the level is shown).
    Fine-tune: finetuneVolumes + finetuneSegmentations (the cases, pairwise), finetuneFolder
        (a folder of cases, used when no pair is listed), finetuneInitModel (library model)
        or finetuneInitPath (pre-training checkpoint), finetuneLabels (segment names, in
        label order), finetuneSteps, finetuneName (the new model's name), finetuneDevice.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    segmentDevice: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode

    previewCheckpoint: Path
    previewVolume: vtkMRMLScalarVolumeNode
    previewCenter: vtkMRMLMarkupsFiducialNode
    previewDevice: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    previewLevel: Annotated[int, WithinRange(1, 3)] = 1
    previewIndex: Annotated[int, WithinRange(0, 15)] = 0

    finetuneVolumes: list[vtkMRMLScalarVolumeNode]
    finetuneSegmentations: list[vtkMRMLSegmentationNode]
    finetuneFolder: Path
    finetuneInitModel: str = ""
    finetuneInitPath: Path
    finetuneLabels: str = ""
    finetuneSteps: Annotated[int, WithinRange(1, 1000000)] = 500
    finetuneName: str = ""
    finetuneDevice: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"


def _isSet(path) -> bool:
    """An empty ctkPathLineEdit gives Path('') == Path('.')."""
    return path is not None and str(path) not in ("", ".")


def _formatSeconds(seconds) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


#
# MiMSlicerWidget
#


class MiMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    POLL_INTERVAL_MS = 200
    WHEELHOUSE_SETTING = "MiMSlicer/Wheelhouse"
    REGISTRY_SETTING = "MiMSlicer/Registry"

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._tasks = {}  # "segment" | "preview" | "finetune" -> running MiMSlicerLib Task
        self._cancelled = set()
        self._events = deque()  # (kind, event) from the tasks' on_event callbacks, drained by the timer
        self._dependenciesReady = False
        self._previewResult = None
        self._shownPreview = None
        self._metricsTable = None
        self._models = {}  # library name -> entry, as the logic lists them
        self._timer = None

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MiMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets (the .ui connects mrmlSceneChanged to each node selector).
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MiMSlicerLogic()

        # Widgets of each background task: start/cancel button, progress bar, status label, idle button text.
        self._taskWidgets = {
            "segment": (self.ui.segmentButton, self.ui.segmentProgressBar, self.ui.segmentStatusLabel, _("Segment")),
            "preview": (self.ui.previewButton, self.ui.previewProgressBar, self.ui.previewStatusLabel,
                        _("Reconstruct levels")),
            "finetune": (self.ui.finetuneButton, self.ui.finetuneProgressBar, self.ui.finetuneStatusLabel,
                         _("Start fine-tuning")),
        }
        for _button, progressBar, _label, _text in self._taskWidgets.values():
            progressBar.hide()

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons and widget-managed selections
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.previewButton.connect("clicked(bool)", self.onPreviewButton)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.addModelFromFileButton.connect("clicked(bool)", self.onAddModelFromFile)
        self.ui.addModelFromRegistryButton.connect("clicked(bool)", self.onAddModelFromRegistry)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.finetuneInitComboBox.connect("currentIndexChanged(int)", self.onFinetuneInitSelected)
        self.ui.finetuneAddCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.finetuneRemoveCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.finetuneLabelsFromSegmentsButton.connect("clicked(bool)", self.onLabelsFromSegments)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.checkDeviceButton.connect("clicked(bool)", self.onCheckDevice)
        self.ui.wheelhousePathLineEdit.connect("currentPathChanged(QString)", self.onWheelhouseChanged)
        # Clearing a path field emits no currentPathChanged (see PATH_FIELDS), only validInputChanged.
        for _name, widgetName in PATH_FIELDS:
            getattr(self.ui, widgetName).connect("validInputChanged(bool)", self.onPathInputValidityChanged)
        self.ui.wheelhousePathLineEdit.connect(
            "validInputChanged(bool)",
            lambda valid: self.onWheelhouseChanged(self.ui.wheelhousePathLineEdit.currentPath))
        self.ui.finetuneCasesTable.horizontalHeader().setStretchLastSection(True)

        self.ui.wheelhousePathLineEdit.currentPath = str(
            qt.QSettings().value(self.WHEELHOUSE_SETTING, "") or dependencies.default_wheelhouse() or "")

        # The tasks run in child processes; this timer reads their progress without blocking the GUI.
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTasks)

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
        if self._timer:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        # Running tasks keep running and keep being polled.
        if self._parameterNode:
            self._resetClearedPaths()
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        self.setParameterNode(None)
        self._previewResult = None
        self._metricsTable = None

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.previewVolume and self._parameterNode.inputVolume:
            self._parameterNode.previewVolume = self._parameterNode.inputVolume

    def setParameterNode(self, inputParameterNode) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateButtonStates()
        self._updateCasesTable()
        self._syncWidgetManagedSelections()
        if self._previewResult is not None:
            self._showPreviewLevel()

    # ------------------------------------------------------------------ button states

    def _updateButtonStates(self) -> None:
        p = self._parameterNode
        if not p:
            return
        running = self._tasks
        segmentButton = self.ui.segmentButton
        if "segment" in running:
            segmentButton.enabled = True
        elif p.inputVolume and p.modelName:
            segmentButton.toolTip = _("Segment the input volume with the selected model; click again to cancel.")
            segmentButton.enabled = True
        else:
            segmentButton.toolTip = _("Select an input volume and a model (add one to the library first).")
            segmentButton.enabled = False

        previewButton = self.ui.previewButton
        previewButton.enabled = "preview" in running or bool(p.previewVolume and self._pathIsSet("previewCheckpoint"))
        if not previewButton.enabled:
            previewButton.toolTip = _("Select a pre-trained checkpoint and a volume.")
        elif "preview" not in running:
            previewButton.toolTip = _("Hide, reconstruct and show the three mask-in-mask levels around the centre "
                                      "point; click again to cancel.")

        finetuneButton = self.ui.finetuneButton
        haveCases = bool(p.finetuneVolumes) or self._pathIsSet("finetuneFolder")
        finetuneButton.enabled = "finetune" in running or haveCases
        if not finetuneButton.enabled:
            finetuneButton.toolTip = _("Add annotated cases (volume + segmentation), or choose a folder of cases.")
        elif "finetune" not in running:
            finetuneButton.toolTip = _("Fine-tune on the cases; click again to cancel.")

        self.ui.finetuneInitPathLineEdit.enabled = p.finetuneInitModel == CHECKPOINT_INIT_ITEM or not p.finetuneInitModel

    # ------------------------------------------------------------------ model library

    def refreshModels(self, select: str = None) -> None:
        """Fill the model combo boxes from the local model library."""
        try:
            models = self.logic.models()
        except Exception as exc:  # a broken library folder must not break the module
            self._log(_("Cannot read the model library: {error}").format(error=exc))
            models = []
        self._models = {m["name"]: m for m in models}
        p = self._parameterNode
        current = select or (p.modelName if p else "")
        for combo, withCheckpoint in ((self.ui.modelComboBox, False), (self.ui.finetuneInitComboBox, True)):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for name, model in self._models.items():
                labels = ", ".join(model.get("labels") or [])
                combo.addItem(name, name)
                combo.setItemData(combo.count - 1, labels, qt.Qt.ToolTipRole)
            if withCheckpoint:
                combo.addItem(_("Pre-training checkpoint (below)"), CHECKPOINT_INIT_ITEM)
            combo.blockSignals(wasBlocked)
        if p:
            if select:
                p.modelName = select
            elif current not in self._models:
                p.modelName = next(iter(self._models), "")
            if p.finetuneInitModel not in self._models and p.finetuneInitModel != CHECKPOINT_INIT_ITEM:
                p.finetuneInitModel = next(iter(self._models), CHECKPOINT_INIT_ITEM)
        self._syncWidgetManagedSelections()
        if not self._models:
            self.ui.segmentStatusLabel.text = _("The model library is empty: add a model from a file or the registry, "
                                                "or fine-tune one below.")

    def _syncWidgetManagedSelections(self) -> None:
        p = self._parameterNode
        if not p:
            return
        for combo, value in ((self.ui.modelComboBox, p.modelName), (self.ui.finetuneInitComboBox, p.finetuneInitModel)):
            index = combo.findData(value)
            if index >= 0 and combo.currentIndex != index:
                wasBlocked = combo.blockSignals(True)
                combo.currentIndex = index
                combo.blockSignals(wasBlocked)

    def onModelSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemData(index) or ""

    def onFinetuneInitSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.finetuneInitModel = self.ui.finetuneInitComboBox.itemData(index) or ""

    def onAddModelFromFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Add a model bundle"), "",
            _("Model bundles (model.json *.zip);;All files (*)"))
        if not path:
            return
        source = str(Path(path).parent) if Path(path).name == "model.json" else path
        self._addModel(source)

    def onAddModelFromRegistry(self) -> None:
        """Pick a model of a registry (a JSON file or URL listing bundles with their sha256);
        the logic's registry ($MIM_MODEL_REGISTRY) if it has one, else the one given last time."""
        settings = qt.QSettings()
        registry = self.logic.registry or settings.value(self.REGISTRY_SETTING, "")
        if not self.logic.registry:
            registry = qt.QInputDialog.getText(self.parent, _("Add from registry"),
                                               _("Model registry (JSON file or URL):"), qt.QLineEdit.Normal, registry)
            if not registry:
                return
            settings.setValue(self.REGISTRY_SETTING, registry)
        names = []
        with slicer.util.tryWithErrorDisplay(_("Failed to read the model registry."), waitCursor=True):
            names = self.logic.registry_models(registry)
        if not names:
            return
        name = qt.QInputDialog.getItem(self.parent, _("Add from registry"), _("Model:"), names, 0, False)
        if name:
            self._addModel(str(name), registry=registry)

    def _addModel(self, source: str, registry: str = None) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the model."), waitCursor=True):
            if not self._ensureDependencies():
                return
            name = self.logic.add_model(source, registry=registry)
            self._log(_("Added model {name} to the library.").format(name=name))
            self.refreshModels(select=name)

    # ------------------------------------------------------------------ fine-tuning cases

    def onAddCase(self) -> None:
        volume = self.ui.finetuneVolumeSelector.currentNode()
        segmentation = self.ui.finetuneSegmentationSelector.currentNode()
        if not volume or not segmentation:
            slicer.util.warningDisplay(_("Select a volume and its segmentation first."))
            return
        p = self._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            p.finetuneVolumes = list(p.finetuneVolumes) + [volume]
            p.finetuneSegmentations = list(p.finetuneSegmentations) + [segmentation]
        if not p.finetuneLabels.strip():
            self.onLabelsFromSegments()

    def onRemoveCase(self) -> None:
        row = self.ui.finetuneCasesTable.currentRow()
        p = self._parameterNode
        if row < 0 or row >= len(p.finetuneVolumes):
            return
        volumes, segmentations = list(p.finetuneVolumes), list(p.finetuneSegmentations)
        del volumes[row], segmentations[row]
        with slicer.util.NodeModify(p.parameterNode):
            p.finetuneVolumes = volumes
            p.finetuneSegmentations = segmentations

    def _updateCasesTable(self) -> None:
        p = self._parameterNode
        table = self.ui.finetuneCasesTable
        pairs = list(zip(p.finetuneVolumes, p.finetuneSegmentations)) if p else []
        table.setRowCount(len(pairs))
        for row, (volume, segmentation) in enumerate(pairs):
            table.setItem(row, 0, qt.QTableWidgetItem(volume.GetName() if volume else _("(deleted)")))
            table.setItem(row, 1, qt.QTableWidgetItem(segmentation.GetName() if segmentation else _("(deleted)")))

    def onLabelsFromSegments(self) -> None:
        p = self._parameterNode
        segmentation = p.finetuneSegmentations[0] if p.finetuneSegmentations else \
            self.ui.finetuneSegmentationSelector.currentNode()
        if not segmentation:
            return
        seg = segmentation.GetSegmentation()
        names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
        p.finetuneLabels = ", ".join(names)

    # ------------------------------------------------------------------ dependencies and device

    def onPathInputValidityChanged(self, valid) -> None:
        self._updateButtonStates()

    def _pathIsSet(self, name: str) -> bool:
        """A path parameter is set and its field was not cleared since (see PATH_FIELDS)."""
        widgetName = dict(PATH_FIELDS)[name]
        return _isSet(getattr(self._parameterNode, name)) and bool(getattr(self.ui, widgetName).currentPath)

    def _resetClearedPaths(self) -> None:
        """Unset the path parameters whose field was cleared (see PATH_FIELDS)."""
        p = self._parameterNode
        if not p:
            return
        for name, widgetName in PATH_FIELDS:
            if not getattr(self.ui, widgetName).currentPath and _isSet(getattr(p, name)):
                setattr(p, name, Path())

    def onWheelhouseChanged(self, path) -> None:
        qt.QSettings().setValue(self.WHEELHOUSE_SETTING, path)

    def _wheelhouse(self):
        path = self.ui.wheelhousePathLineEdit.currentPath
        return Path(path) if path else None

    def _ensureDependencies(self, force: bool = False) -> bool:
        """On first use: find missing packages, ask the user once, install them, then check
        that the chosen device can run PyTorch. True when the module can run."""
        if self._dependenciesReady and not force:
            return True
        requirements = dependencies.load_requirements(self.resourcePath("requirements.txt"))
        problems = dependencies.find_problems(requirements)
        if problems:
            steps = dependencies.plan_install(problems, wheelhouse=self._wheelhouse(),
                                              have_pytorchutils=dependencies.has_pytorchutils(),
                                              have_pip_ensure=dependencies.has_pip_ensure())
            plan = dependencies.describe_plan(problems, steps)
            self._log(plan)
            if not slicer.util.confirmOkCancelDisplay(
                    _("MiMSlicer needs Python packages that are not installed yet (see details). "
                      "Install them now? This can take several minutes."),
                    windowTitle=_("MiMSlicer - Install Python packages"), detailedText=plan):
                self.ui.setupStatusLabel.text = _("Python packages not installed: MiMSlicer cannot run without them.")
                return False
            try:
                with slicer.util.WaitCursor():
                    dependencies.run_plan(steps, dependencies.slicer_installers(), log=self._log)
            except dependencies.DependencyError as exc:
                self._log(str(exc))
                slicer.util.errorDisplay(_("Installing Python packages failed:\n{error}").format(error=exc))
                return False
            remaining = dependencies.find_problems(requirements)
            if remaining:
                text = "\n".join(p.describe() for p in remaining)
                self._log(text)
                slicer.util.errorDisplay(_("Some packages are still missing or outdated; restart Slicer and try "
                                           "again:\n{packages}").format(packages=text))
                return False
            self.refreshModels()  # the library folder could not be found before (platformdirs)
            self._checkDevice(self._parameterNode.segmentDevice if self._parameterNode else "auto")
        self._dependenciesReady = True
        self.ui.setupStatusLabel.text = _("All Python packages are installed.")
        return True

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to check the Python packages."), waitCursor=True):
            self._ensureDependencies(force=True)

    def onCheckDevice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to test the device."), waitCursor=True):
            if self._ensureDependencies():
                self._checkDevice(self._parameterNode.segmentDevice)

    def _checkDevice(self, device: str) -> bool:
        with slicer.util.WaitCursor():
            check = dependencies.check_device(device)
        self._log(check.message)
        self.ui.setupStatusLabel.text = check.message
        if not check.ok:
            slicer.util.warningDisplay(check.message, windowTitle=_("MiMSlicer - Device check"))
        return check.ok

    # ------------------------------------------------------------------ Segment

    def onSegmentButton(self) -> None:
        if self._cancelIfRunning("segment"):
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self._ensureDependencies():
                return
            task = self.logic.start_segment(p.inputVolume, self._models.get(p.modelName, p.modelName),
                                            device=p.segmentDevice,
                                            segmentation_node=p.outputSegmentation,
                                            on_event=self._eventSink("segment"))
            self._startedTask("segment", task, _("Segmenting {volume} with {model}").format(
                volume=p.inputVolume.GetName(), model=p.modelName))

    def _onSegmentDone(self, task) -> None:
        segmentationNode = task.result
        if segmentationNode is not None and hasattr(segmentationNode, "IsA") and segmentationNode.IsA(
                "vtkMRMLSegmentationNode"):
            self._parameterNode.outputSegmentation = segmentationNode
            self._log(_("Segmentation written to {node}.").format(node=segmentationNode.GetName()))

    # ------------------------------------------------------------------ Mask-in-mask preview

    def onPreviewButton(self) -> None:
        if self._cancelIfRunning("preview"):
            return
        self._resetClearedPaths()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the preview."), waitCursor=True):
            if not self._ensureDependencies():
                return
            centerRas = self._previewCenterRas()
            task = self.logic.start_preview(str(p.previewCheckpoint), p.previewVolume, center_ras=centerRas,
                                            device=p.previewDevice, on_event=self._eventSink("preview"))
            self._startedTask("preview", task, _("Reconstructing the levels of {volume} around {center}").format(
                volume=p.previewVolume.GetName(), center=", ".join(f"{c:.1f}" for c in centerRas)))

    def _previewCenterRas(self):
        """The first point of the selected markups, else the crosshair position (RAS, mm)."""
        markups = self._parameterNode.previewCenter
        if markups and markups.GetNumberOfControlPoints() > 0:
            ras = [0.0, 0.0, 0.0]
            markups.GetNthControlPointPositionWorld(0, ras)
            return ras
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        ras = [0.0, 0.0, 0.0]
        if crosshair:
            crosshair.GetCursorPositionRAS(ras)
        return ras

    def _onPreviewDone(self, task) -> None:
        self._previewResult = task.result
        self._shownPreview = None
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.previewLevel = 1
            self._parameterNode.previewIndex = 0
        self._showPreviewLevel(force=True)

    def _showPreviewLevel(self, force: bool = False) -> None:
        """Hidden input, reconstruction and original of the selected level and volume in the
        red, yellow and green views, each fitted to that volume: the three share one
        position in the patient, so the views show the same region side by side."""
        level, index = self._parameterNode.previewLevel, self._parameterNode.previewIndex
        if not force and self._shownPreview == (level, index):
            return
        volumes = self._previewVolumes(level)
        if not volumes:
            return
        self.ui.previewIndexSpinBox.maximum = max(0, len(volumes) - 1)
        index = min(index, len(volumes) - 1)
        self._shownPreview = (level, index)
        nodes = volumes[index]
        layoutManager = slicer.app.layoutManager()
        for viewName, kind in (("Red", "input"), ("Yellow", "reconstruction"), ("Green", "original")):
            node = nodes.get(kind)
            sliceWidget = layoutManager.sliceWidget(viewName) if layoutManager else None
            if not node or not sliceWidget:
                continue
            compositeNode = sliceWidget.mrmlSliceCompositeNode()
            compositeNode.SetBackgroundVolumeID(node.GetID())
            compositeNode.SetForegroundVolumeID(None)
            compositeNode.SetLabelVolumeID(None)
            sliceWidget.mrmlSliceNode().SetOrientation("Axial")
            sliceWidget.sliceLogic().FitSliceToAll()

    def _previewVolumes(self, level: int) -> list:
        """[{"input", "reconstruction", "original": volume node, ...}, ...]: the volumes of one
        level, from the logic's preview result ({level: {"volumes": [...], ...}})."""
        entry = (self._previewResult or {}).get(level)
        return list(entry.get("volumes") or []) if entry else []

    # ------------------------------------------------------------------ Fine-tune

    def onFinetuneButton(self) -> None:
        if self._cancelIfRunning("finetune"):
            return
        self._resetClearedPaths()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning."), waitCursor=True):
            if not self._ensureDependencies():
                return
            if p.finetuneVolumes:
                cases = list(zip(p.finetuneVolumes, p.finetuneSegmentations))
            else:
                cases = str(p.finetuneFolder)
            if p.finetuneInitModel and p.finetuneInitModel != CHECKPOINT_INIT_ITEM:
                init = self._models.get(p.finetuneInitModel, {}).get("path") or p.finetuneInitModel
            elif _isSet(p.finetuneInitPath):
                init = str(p.finetuneInitPath)
            else:
                init = None  # random weights (the logic then trains a tiny model)
            labelNames = [n.strip() for n in p.finetuneLabels.split(",") if n.strip()] or None
            self._resetMetricsPlot()
            task = self.logic.start_finetune(cases, init, p.finetuneSteps, device=p.finetuneDevice,
                                             name=p.finetuneName.strip() or None, label_names=labelNames,
                                             on_event=self._eventSink("finetune"))
            self._startedTask("finetune", task, _("Fine-tuning for {steps} steps from {init}").format(
                steps=p.finetuneSteps, init=init or _("random weights")))

    def _onFinetuneDone(self, task) -> None:
        result = task.result
        name = result.get("name") if isinstance(result, dict) else result
        self._log(_("New model {name} added to the library.").format(name=name))
        self.refreshModels(select=name if isinstance(name, str) else None)

    def _resetMetricsPlot(self) -> None:
        """A table (step, loss, Dice) shown as two curves in a plot view of the layout."""
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("MiM fine-tuning metrics"))
        for name in ("step", "loss", "dice"):
            column = table.AddColumn(vtk.vtkDoubleArray())
            column.SetName(name)
        chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", _("MiM fine-tuning"))
        chart.SetTitle(_("Fine-tuning: loss and validation Dice"))
        chart.SetXAxisTitle(_("step"))
        for name, color in (("loss", (0.85, 0.33, 0.1)), ("dice", (0.0, 0.45, 0.74))):
            series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(name)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleCircle if name == "dice" else series.MarkerStyleNone)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        self._metricsTable = table

    def _plotMetrics(self, event) -> None:
        """One table row per training progress event (loss) and per validation (Dice); the
        other column is NaN so each curve only has its own points."""
        table = self._metricsTable
        if table is None or event.get("step") is None:
            return
        if event.get("event") == "validation":
            loss, dice = None, event.get("dice")
        else:
            loss, dice = (event.get("metrics") or {}).get("loss"), None
        if loss is None and dice is None:
            return
        vtable = table.GetTable()
        row = vtable.InsertNextBlankRow()
        for column, value in (("step", event["step"]), ("loss", loss), ("dice", dice)):
            vtable.SetValueByName(row, column, vtk.vtkVariant(float("nan") if value is None else float(value)))
        table.Modified()

    # ------------------------------------------------------------------ running tasks

    def _eventSink(self, kind):
        """on_event callback for a task: queue the event; the timer shows it (the callback
        may come from a reader thread, and Qt widgets belong to the main thread)."""
        def onEvent(event):
            self._events.append((kind, event))
        return onEvent

    def _startedTask(self, kind, task, message) -> None:
        button, progressBar, statusLabel, _idleText = self._taskWidgets[kind]
        self._tasks[kind] = task
        self._cancelled.discard(kind)
        button.text = _("Cancel")
        button.enabled = True
        progressBar.show()
        progressBar.setRange(0, 0)  # busy until the first progress event says how many steps
        statusLabel.text = _("Starting...")
        self._log(message)
        self._timer.start()

    def _cancelIfRunning(self, kind) -> bool:
        task = self._tasks.get(kind)
        if task is None:
            return False
        self._cancelled.add(kind)
        self._taskWidgets[kind][2].text = _("Cancelling...")
        task.cancel()
        return True

    def onPollTasks(self) -> None:
        for kind, task in list(self._tasks.items()):
            pollError = None
            try:
                running = task.poll()
            except Exception as exc:  # never let the timer die with a task still listed
                logging.exception("MiMSlicer: polling the %s task failed", kind)
                pollError, running = str(exc), False
            self._showProgress(kind, task)
            if not running:
                del self._tasks[kind]
                self._drainEvents()
                self._finishTask(kind, task, pollError)
        self._drainEvents()
        if not self._tasks:
            self._timer.stop()

    def _drainEvents(self) -> None:
        while self._events:
            kind, event = self._events.popleft()
            name = event.get("event")
            if name == "log" or "line" in event or "message" in event:
                text = event.get("line") or event.get("message")
                if text:
                    self._log(f"[{kind}] {text}")
            elif name in ("start", "checkpoint", "done", "error"):
                self._log(f"[{kind}] {name}: " + ", ".join(
                    f"{k}={v}" for k, v in event.items() if k != "event" and not isinstance(v, (dict, list))))
            if kind == "finetune" and name in ("progress", "validation"):
                self._plotMetrics(event)

    def _showProgress(self, kind, task) -> None:
        _button, progressBar, statusLabel, _idleText = self._taskWidgets[kind]
        if kind in self._cancelled:
            return
        total, step = task.total, task.step
        if total:
            progressBar.setRange(0, int(total))
            progressBar.setValue(int(min(step or 0, total)))
        parts = [str(task.stage or _("working"))]
        if total:
            parts.append(f"{int(step or 0)}/{int(total)}")
        eta = _formatSeconds(task.eta_s)
        if eta:
            parts.append(_("about {time} left").format(time=eta))
        metrics = task.last_metrics or {}
        parts += [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and k in ("loss", "dice")]
        statusLabel.text = " - ".join(parts)

    def _finishTask(self, kind, task, pollError=None) -> None:
        button, progressBar, statusLabel, idleText = self._taskWidgets[kind]
        button.text = idleText
        progressBar.hide()
        error = task.error or pollError
        if kind in self._cancelled:
            self._cancelled.discard(kind)
            statusLabel.text = _("Cancelled.")
            self._log(f"[{kind}] " + _("cancelled"))
        elif error:
            statusLabel.text = _("Failed: {error}").format(error=str(error).splitlines()[0])
            self._log(f"[{kind}] " + _("failed:") + f"\n{error}")
            slicer.util.errorDisplay(_("The {task} job failed.").format(task=kind), detailedText=str(error))
        else:
            statusLabel.text = _("Done.")
            try:
                with slicer.util.tryWithErrorDisplay(_("Failed to show the results."), waitCursor=True):
                    {"segment": self._onSegmentDone, "preview": self._onPreviewDone,
                     "finetune": self._onFinetuneDone}[kind](task)
            except Exception:  # tryWithErrorDisplay showed it and re-raises: keep the timer slot alive
                logging.exception("MiMSlicer: showing the %s results failed", kind)
                statusLabel.text = _("Done, but the results could not be shown (see the log).")
        self._updateButtonStates()

    def _log(self, text: str) -> None:
        logging.info(text)
        self.ui.logTextEdit.appendPlainText(text)


#
# MiMSlicerLogic
#


def _libraryLogicClass():
    from MiMSlicerLib.logic import MiMLogicCore
    return MiMLogicCore


class MiMSlicerLogic(ScriptedLoadableModuleLogic):
    """The module's logic: the parameter node, plus everything MiMSlicerLib.logic.MiMLogicCore
    does (model library, segment / preview / fine-tune tasks), which it delegates to.
    Can be used without the widget, e.g. from the Python console:

        logic = slicer.util.getModuleLogic("MiMSlicer")
        task = logic.start_segment(volumeNode, logic.models()[0])
        while task.poll(): slicer.app.processEvents()
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._library = None

    @property
    def library(self):
        """MiMSlicerLib.logic.MiMLogicCore on the current scene (created on first use, so
        that opening the module does not import torch)."""
        if self._library is None:
            self._library = _libraryLogicClass()(scene=slicer.mrmlScene)
        return self._library

    def getParameterNode(self):
        return MiMSlicerParameterNode(super().getParameterNode())

    def models(self):
        return self.library.models()

    def add_model(self, source: str, **kwargs) -> str:
        return self.library.add_model(source, **kwargs)

    def start_segment(self, volume_node, model, device="auto", segmentation_node=None, on_event=None, **kwargs):
        return self.library.start_segment(volume_node, model, device=device, segmentation_node=segmentation_node,
                                          on_event=on_event, **kwargs)

    def start_preview(self, checkpoint, volume_node, center_ras=None, device="auto", on_event=None, **kwargs):
        return self.library.start_preview(checkpoint, volume_node, center_ras=center_ras, device=device,
                                          on_event=on_event, **kwargs)

    def start_finetune(self, cases, init, steps, device="auto", name=None, label_names=None, on_event=None,
                       **kwargs):
        return self.library.start_finetune(cases, init, steps, device=device, name=name, label_names=label_names,
                                           on_event=on_event, **kwargs)

    def __getattr__(self, name):
        # anything else the library logic offers (e.g. registry_models)
        if name.startswith("_") or name == "library":  # "library": its property raised AttributeError
            raise AttributeError(name)
        return getattr(self.library, name)


#
# MiMSlicerTest
#


class MiMSlicerTest(ScriptedLoadableModuleTest):
    """
    Real inference on Slicer's sample data: train a tiny model for a few steps on a
    threshold segmentation of the CTChest sample, then segment the same volume with it.
    It checks the plumbing (child processes, MRML conversion, segment names, geometry),
    not accuracy. Needs the packages of Resources/requirements.txt (Slicer's testing mode
    does not install them) and about a minute on a CPU.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    TIMEOUT_S = 900

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_MiMSlicerDependencies()
        self.test_MiMSlicerTrainAndSegment()

    def _wait(self, task):
        start = time.time()
        while task.poll():
            slicer.app.processEvents()
            time.sleep(0.1)
            self.assertLess(time.time() - start, self.TIMEOUT_S, "the task did not finish in time")
        self.assertFalse(task.error, f"task failed: {task.error}")
        return task.result

    def test_MiMSlicerDependencies(self):
        problems = dependencies.find_problems(dependencies.load_requirements())
        self.assertEqual(problems, [], "missing packages: " + ", ".join(p.describe() for p in problems))
        check = dependencies.check_device("cpu")
        self.assertTrue(check.ok, check.message)

    def test_MiMSlicerTrainAndSegment(self):
        import numpy as np
        import shutil
        import tempfile
        import SampleData

        self.delayDisplay("Loading CTChest")
        volume = SampleData.downloadSample("CTChest")
        self.assertIsNotNone(volume)

        # A label we can make without annotation: bone (> 300 HU) on the sample CT itself.
        ct = slicer.util.arrayFromVolume(volume)
        reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference")
        reference.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = reference.GetSegmentation().AddEmptySegment("bone", "bone")
        slicer.util.updateSegmentBinaryLabelmapFromArray((ct > 300).astype(np.uint8), reference, segmentId, volume)

        logic = MiMSlicerLogic()
        modelsDir = tempfile.mkdtemp(prefix="MiMSlicerTest-")  # a library of its own, removed at the end
        logic._library = _libraryLogicClass()(scene=slicer.mrmlScene, models_dir=modelsDir)
        try:
            self.delayDisplay("Fine-tuning a tiny model for a few steps")
            # random weights -> the tiny preset; 4 mm spacing keeps CTChest small for a CPU
            task = logic.start_finetune([(volume, reference)], None, 8, device="cpu", name="selftest-bone",
                                        label_names=["bone"], spacing=[4.0, 4.0, 4.0])
            self._wait(task)
            models = {m["name"]: m for m in logic.models()}
            self.assertIn("selftest-bone", models)
            self.assertEqual(list(models["selftest-bone"]["labels"]), ["bone"])

            self.delayDisplay("Segmenting CTChest")
            task = logic.start_segment(volume, models["selftest-bone"], device="cpu")
            segmentation = self._wait(task)
            self.assertTrue(segmentation.IsA("vtkMRMLSegmentationNode"))
            seg = segmentation.GetSegmentation()
            self.assertEqual([seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())], ["bone"])
            # the result sits on exactly the CT's grid
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, seg.GetNthSegmentID(0), volume)
            self.assertEqual(labelmap.shape, ct.shape)
        finally:
            shutil.rmtree(modelsDir, ignore_errors=True)
        self.delayDisplay("Test passed")
