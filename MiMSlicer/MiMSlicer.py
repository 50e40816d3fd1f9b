"""MiMSlicer: segment CT with MiM (Mask in Mask) networks, preview the mask-in-mask levels
of a pre-trained model, and fine-tune on local annotated cases.

This file is GUI wiring only (Module, parameter node, Widget, Logic, Test). Everything that
computes lives in MiMSlicerLib (MRML <-> arrays, the background job runner, results to
nodes) and in the bundled mimcore package, which runs in a child process.
"""

import logging
import sys
import time
import unittest
from collections import deque
from pathlib import Path
from typing import Annotated

import ctk
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

from MiMSlicerLib import dependencies, fields, modelinfo, views
from MiMSlicerLib.progress import format_seconds

DEVICE_CHOICES = list(dependencies.DEVICE_CHOICES)

# Parameters that the widget code keeps up to date itself instead of binding a widget
# through SlicerParameterName: the model lists change at run time (a combo box bound by
# the wrapper needs fixed choices) and the fine-tuning cases are shown in a table.
# Testing/slicer/test_ui_bindings.py checks every other parameter has a bound widget.
# segmentFast / segmentShow3D: check boxes made in setup() (not in the .ui), kept in sync by code.
WIDGET_MANAGED_PARAMETERS = ("modelName", "finetuneInitModel", "finetuneVolumes", "finetuneSegmentations",
                             "segmentFast", "segmentShow3D")

# Item of the "Start from" combo box that means "the pre-training checkpoint below".
CHECKPOINT_INIT_ITEM = "__checkpoint__"

# Path parameters and their ctkPathLineEdit. The line edit reports a path only when its text is
# acceptable input, and empty text is not: clearing the field leaves the old path in the parameter
# node. The widget code treats an empty field as unset and resets the parameter when the user is
# not typing. An unset Path parameter is Path() == ".", which the wrapper writes into the field:
# _showUnsetPathsEmpty (an observer that runs after the wrapper's) shows it as an empty field
# (MiMSlicerLib.fields).
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

    Segment: inputVolume, modelName (library model), segmentDevice, outputSegmentation, segmentFast
        (mim segment --fast; on by default where no GPU was found), segmentShow3D (show each
        result in 3D).
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
    segmentFast: bool = True
    segmentShow3D: bool = False

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
    return fields.path_is_set(path)


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
    GPU_FOUND_SETTING = "MiMSlicer/GpuFound"  # what the last "auto" device check found

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
        self._savedViews = None  # the user's layout and slice views, kept while the preview shows
        self._metricsPlot = None  # MiMSlicerLib.plots.MetricsPlot of the running fine-tuning
        self._models = {}  # library name -> entry, as the logic lists them
        self._timer = None
        self._fastInitialized = False
        self._quietDeviceCheck = False  # the automatic first check: no pop-up if it fails
        self._modulesBeforeInstall = ()

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
        self._addWidgets()
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
        self.ui.previewCenterSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                              self.previewCenterPlaceWidget.setCurrentNode)

        self.ui.wheelhousePathLineEdit.currentPath = str(
            qt.QSettings().value(self.WHEELHOUSE_SETTING, "") or dependencies.default_wheelhouse() or "")

        # The tasks run in child processes; this timer reads their progress without blocking the GUI.
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTasks)

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()
        self.refreshModels()
        self.previewCenterPlaceWidget.setCurrentNode(self.ui.previewCenterSelector.currentNode())
        self._checkSlicerVersion()
        self._findGpuOnce()

    def _findGpuOnce(self) -> None:
        """Where no device check has run yet, run one quietly in the background ("auto"), so that
        "Fast (CPU)" starts unticked on a computer with a usable GPU."""
        if self._gpuFoundSetting() is not None:
            return
        try:
            if dependencies.find_problems(dependencies.load_requirements(self.resourcePath("requirements.txt"))):
                return  # packages missing: the first Segment installs them, then checks the device
            self._quietDeviceCheck = True
            self._startDeviceCheck("auto")
        except Exception:  # never let this stop the module from opening
            logging.exception("MiMSlicer: the background device check could not start")

    def _addWidgets(self) -> None:
        """Widgets made here rather than in the .ui (WIDGET_MANAGED_PARAMETERS for their parameters)."""
        segmentForm = self.ui.segmentCollapsibleButton.layout()
        # the model's details (labels, spacing, size, provenance, licence), or the first-run guidance
        self.modelDetailsBox = ctk.ctkCollapsibleGroupBox()
        self.modelDetailsBox.title = _("Model details")
        self.modelDetailsBox.collapsed = True  # opened by the user; opens itself only for an empty library
        detailsLayout = qt.QVBoxLayout(self.modelDetailsBox)
        self.modelDetailsLabel = qt.QLabel()
        self.modelDetailsLabel.wordWrap = True
        self.modelDetailsLabel.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        detailsLayout.addWidget(self.modelDetailsLabel)
        segmentForm.insertRow(2, self.modelDetailsBox)
        # progress of adding a model (a download can take minutes)
        self.libraryProgressBar = qt.QProgressBar()
        self.libraryStatusLabel = qt.QLabel()
        self.libraryStatusLabel.wordWrap = True
        segmentForm.insertRow(4, self.libraryProgressBar)
        segmentForm.insertRow(5, self.libraryStatusLabel)
        # Fast (CPU), show in 3D
        optionsRow = qt.QHBoxLayout()
        self.segmentFastCheckBox = qt.QCheckBox(_("Fast (CPU)"))
        self.segmentFastCheckBox.toolTip = _("The fast profile for a computer without a GPU (mim segment --fast): "
                                             "the network runs only where the body is (air is background), in "
                                             "OpenVINO where Slicer's Python has it (fp32: the same labels, "
                                             "0.7x the time), else in PyTorch with bf16 on CPUs that have it. "
                                             "On by default when no GPU was found.")
        self.segmentShow3DCheckBox = qt.QCheckBox(_("Show 3D automatically"))
        self.segmentShow3DCheckBox.toolTip = _("Show each new result as surfaces in the 3D view.")
        self.show3DButton = qt.QPushButton(_("Show 3D"))
        self.show3DButton.checkable = True
        self.show3DButton.toolTip = _("Show or hide the output segmentation as surfaces in the 3D view.")
        for widget in (self.segmentFastCheckBox, self.segmentShow3DCheckBox, self.show3DButton):
            optionsRow.addWidget(widget)
        segmentForm.insertRow(7, optionsRow)
        self.segmentFastCheckBox.connect("toggled(bool)", self.onFastToggled)
        self.segmentShow3DCheckBox.connect("toggled(bool)", self.onShow3DAutoToggled)
        self.show3DButton.connect("toggled(bool)", self.onShow3DToggled)

        # place the preview's centre point without leaving the module
        previewForm = self.ui.previewCollapsibleButton.layout()
        self.previewCenterPlaceWidget = slicer.qSlicerMarkupsPlaceWidget()
        self.previewCenterPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.previewCenterPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.previewCenterPlaceWidget.buttonsVisible = False
        self.previewCenterPlaceWidget.placeButton().show()
        self.previewCenterPlaceWidget.toolTip = _("Click, then click in a slice view to put the centre point "
                                                  "(the crosshair is used when no point list is selected).")
        previewForm.insertRow(3, _("Place centre:"), self.previewCenterPlaceWidget)
        self.restoreViewsButton = qt.QPushButton(_("Restore my views"))
        self.restoreViewsButton.toolTip = _("Put back the layout and slice views as they were before the preview "
                                            "(also done when you leave the module).")
        self.restoreViewsButton.enabled = False
        self.restoreViewsButton.connect("clicked(bool)", self.onRestoreViews)
        previewForm.addRow(self.restoreViewsButton)

        # progress of installing packages and of the device check
        self.setupProgressBar = qt.QProgressBar()
        self.ui.setupCollapsibleButton.layout().addRow(self.setupProgressBar)

        self._taskWidgets["addmodel"] = (self.ui.addModelFromRegistryButton, self.libraryProgressBar,
                                         self.libraryStatusLabel, self.ui.addModelFromRegistryButton.text)
        self._taskWidgets["install"] = (self.ui.installDependenciesButton, self.setupProgressBar,
                                        self.ui.setupStatusLabel, self.ui.installDependenciesButton.text)
        self._taskWidgets["device"] = (self.ui.checkDeviceButton, self.setupProgressBar, self.ui.setupStatusLabel,
                                       self.ui.checkDeviceButton.text)

    def _checkSlicerVersion(self) -> None:
        """Say it plainly where this Slicer is older than the module supports (fields.MINIMUM_SLICER)."""
        problem = fields.slicer_version_problem((int(slicer.app.majorVersion), int(slicer.app.minorVersion)),
                                                tuple(sys.version_info[:2]))
        if problem:
            self._log(problem)
            self.ui.setupStatusLabel.text = problem

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
        self.onRestoreViews()
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
        self._savedViews = None  # the scene's views go with it
        self.restoreViewsButton.enabled = False
        self._metricsPlot = None

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
        if not self._fastInitialized:  # once per session: what the last device check found
            self._fastInitialized = True
            self._parameterNode.segmentFast = fields.default_fast(self._gpuFoundSetting())

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
            # priority -1: after the wrapper's own observer, which writes "." into unset path fields
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified,
                             priority=-1.0)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._showUnsetPathsEmpty()
        self._updateLevelIndexRange()
        self._updateButtonStates()
        self._updateCasesTable()
        self._syncWidgetManagedSelections()
        if self._previewResult is not None:
            self._showPreviewLevel()

    def _showUnsetPathsEmpty(self) -> None:
        """An unset path parameter shows an empty field, not the wrapper's "." (MiMSlicerLib.fields)."""
        p = self._parameterNode
        if not p:
            return
        for name, widgetName in PATH_FIELDS:
            widget = getattr(self.ui, widgetName)
            if not fields.path_is_set(getattr(p, name)) and widget.currentPath and \
                    not fields.path_is_set(widget.currentPath):
                wasBlocked = widget.blockSignals(True)
                widget.currentPath = fields.path_text(getattr(p, name))
                widget.blockSignals(wasBlocked)

    def _updateLevelIndexRange(self) -> None:
        """The spin box range of the level's volumes (the wrapper resets it to 0..15 on each connect)."""
        p = self._parameterNode
        if p:
            low, high = views.level_index_range(self._previewResult, p.previewLevel)
            self.ui.previewIndexSpinBox.setRange(low, high)

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

        addingWith = self._taskWidgets["addmodel"][0] if "addmodel" in running else None
        for button in (self.ui.addModelFromFileButton, self.ui.addModelFromRegistryButton):
            button.enabled = button is addingWith if addingWith else "install" not in running
        self.ui.installDependenciesButton.enabled = "install" in running or not running.keys() & {"device", "addmodel"}
        self.ui.checkDeviceButton.enabled = "device" in running or "install" not in running
        output = p.outputSegmentation
        self.show3DButton.enabled = bool(output)
        wasBlocked = self.show3DButton.blockSignals(True)
        self.show3DButton.checked = bool(output) and self._shows3D(output)
        self.show3DButton.blockSignals(wasBlocked)

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
                combo.addItem(name, name)
                combo.setItemData(combo.count - 1, modelinfo.model_details(model), qt.Qt.ToolTipRole)
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
        self._showModelDetails()

    def _showModelDetails(self) -> None:
        """The selected model's details, or - with an empty library - the three ways to get one."""
        usable = [m for m in self._models.values() if not m.get("error")]
        self.ui.modelComboBox.enabled = bool(self._models)
        if not usable:
            try:
                where = self.logic.models_dir
            except Exception:  # the library folder is unknown until the packages are installed
                where = None
            self.modelDetailsLabel.text = modelinfo.empty_library_guidance(where, self.logic.registry)
            self.modelDetailsBox.collapsed = False
            self.modelDetailsBox.title = _("Getting a model")
            return
        self.modelDetailsBox.title = _("Model details")
        model = self._models.get(self._parameterNode.modelName if self._parameterNode else "")
        self.modelDetailsLabel.text = modelinfo.model_details(model) if model else ""
        self.ui.modelComboBox.toolTip = self.modelDetailsLabel.text

    def _syncWidgetManagedSelections(self) -> None:
        p = self._parameterNode
        if not p:
            return
        for checkBox, value in ((self.segmentFastCheckBox, p.segmentFast),
                                (self.segmentShow3DCheckBox, p.segmentShow3D)):
            if checkBox.checked != bool(value):
                wasBlocked = checkBox.blockSignals(True)
                checkBox.checked = bool(value)
                checkBox.blockSignals(wasBlocked)
        for combo, value in ((self.ui.modelComboBox, p.modelName), (self.ui.finetuneInitComboBox, p.finetuneInitModel)):
            index = combo.findData(value)
            if index >= 0 and combo.currentIndex != index:
                wasBlocked = combo.blockSignals(True)
                combo.currentIndex = index
                combo.blockSignals(wasBlocked)

    def onModelSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemData(index) or ""
            self._showModelDetails()

    def onFinetuneInitSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.finetuneInitModel = self.ui.finetuneInitComboBox.itemData(index) or ""

    def onAddModelFromFile(self) -> None:
        if self._cancelIfRunning("addmodel"):
            return
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Add a model bundle"), "",
            _("Model bundles (model.json *.zip);;All files (*)"))
        if not path:
            return
        source = str(Path(path).parent) if Path(path).name == "model.json" else path
        self._addModel(source, button=self.ui.addModelFromFileButton)

    def onAddModelFromRegistry(self) -> None:
        """Pick a model of a registry (a JSON file or URL listing bundles with their sha256);
        the logic's registry ($MIM_MODEL_REGISTRY) if it has one, else the one given last time."""
        if self._cancelIfRunning("addmodel"):
            return
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
        # A dialog instance, not the static getItem: PythonQt's getItem returns the current item
        # when the user cancels (there is no "ok" flag), which would add that model anyway.
        dialog = qt.QInputDialog(self.parent)
        dialog.setWindowTitle(_("Add from registry"))
        dialog.setLabelText(_("Model:"))
        dialog.setComboBoxItems(names)
        dialog.setComboBoxEditable(False)
        if not dialog.exec_():
            return
        name = dialog.textValue()
        if name:
            self._addModel(str(name), registry=registry, button=self.ui.addModelFromRegistryButton)

    def _addModel(self, source: str, registry: str = None, button=None) -> None:
        """Add a model with a background task (a registry download shows its progress; Cancel stops it)."""
        button = button or self.ui.addModelFromRegistryButton
        with slicer.util.tryWithErrorDisplay(_("Failed to add the model."), waitCursor=True):
            if not self._ensureDependencies():
                return
            task = self.logic.start_add_model(source, registry=registry, on_event=self._eventSink("addmodel"))
            self._taskWidgets["addmodel"] = (button, self.libraryProgressBar, self.libraryStatusLabel, button.text)
            self._startedTask("addmodel", task, _("Adding {source} to the model library").format(source=source))

    def _onAddModelDone(self, task) -> None:
        self._log(_("Added model {name} to the library.").format(name=task.result))
        self.refreshModels(select=task.result)

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
        """On first use: find missing packages, ask the user once, and start installing them in the
        background (a task with progress and Cancel; Segment etc. are clicked again when it is done).
        True when the module can run now."""
        if self._dependenciesReady and not force:
            return True
        if "install" in self._tasks:
            slicer.util.infoDisplay(_("The Python packages are being installed; try again when that is done."))
            return False
        requirements = dependencies.load_requirements(self.resourcePath("requirements.txt"))
        problems = dependencies.find_problems(requirements)
        if not problems:
            self._dependenciesReady = True
            self.ui.setupStatusLabel.text = _("All Python packages are installed.")
            return True
        steps = dependencies.plan_install(problems, wheelhouse=self._wheelhouse(),
                                          have_pytorchutils=dependencies.has_pytorchutils(),
                                          have_pip_ensure=dependencies.has_pip_ensure())
        plan = dependencies.describe_plan(problems, steps)
        self._log(plan)
        if not slicer.util.confirmOkCancelDisplay(
                _("MiMSlicer needs Python packages that are not installed yet (see details). "
                  "Install them now? This can take several minutes; the progress is shown in the "
                  "'Python packages and device' section."),
                windowTitle=_("MiMSlicer - Install Python packages"), detailedText=plan):
            self.ui.setupStatusLabel.text = _("Python packages not installed: MiMSlicer cannot run without them.")
            return False
        self._modulesBeforeInstall = tuple(sys.modules)
        installers = dependencies.slicer_installers() if any(
            st.via == dependencies.VIA_PYTORCHUTILS for st in steps) else None
        task = dependencies.InstallRun(steps, installers, on_event=self._eventSink("install"))
        self._startedTask("install", task, _("Installing Python packages ({count} steps)").format(count=len(steps)))
        self.ui.setupCollapsibleButton.collapsed = False
        return False

    def _onInstallDone(self, task) -> None:
        restart = fields.restart_needed(task.installed, self._modulesBeforeInstall)
        if restart:
            if slicer.util.confirmYesNoDisplay(
                    _("Installed {packages}, which this Slicer had loaded already: Slicer must restart to use "
                      "them. Restart now?").format(packages=", ".join(restart)),
                    windowTitle=_("MiMSlicer - Restart Slicer")):
                slicer.util.restart()
            self.ui.setupStatusLabel.text = _("Restart Slicer to finish installing: {packages}.").format(
                packages=", ".join(restart))
            return
        requirements = dependencies.load_requirements(self.resourcePath("requirements.txt"))
        remaining = dependencies.find_problems(requirements)
        if remaining:
            text = "\n".join(p.describe() for p in remaining)
            self._log(text)
            slicer.util.errorDisplay(_("Some packages are still missing or outdated; restart Slicer and try "
                                       "again:\n{packages}").format(packages=text))
            return
        self._dependenciesReady = True
        self.ui.setupStatusLabel.text = _("All Python packages are installed.")
        self.refreshModels()  # the library folder could not be found before (platformdirs)
        self._startDeviceCheck(self._parameterNode.segmentDevice if self._parameterNode else "auto")

    def onInstallDependencies(self) -> None:
        if self._cancelIfRunning("install"):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to check the Python packages."), waitCursor=True):
            if self._ensureDependencies(force=True):
                slicer.util.infoDisplay(_("All Python packages MiMSlicer needs are installed."))

    def onCheckDevice(self) -> None:
        if self._cancelIfRunning("device"):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to test the device."), waitCursor=True):
            if self._ensureDependencies():
                self._startDeviceCheck(self._parameterNode.segmentDevice)

    def _startDeviceCheck(self, device: str) -> None:
        """Run the device check in the background (it can take minutes on a first CUDA start)."""
        task = dependencies.DeviceCheckRun(device).start()
        self._startedTask("device", task, _("Testing PyTorch on the device '{device}'").format(device=device))

    def _onDeviceCheckDone(self, task) -> None:
        check = task.result
        self._log(check.message)
        self.ui.setupStatusLabel.text = check.message
        if check.requested == "auto" and check.ok:
            found = fields.gpu_found(check)
            qt.QSettings().setValue(self.GPU_FOUND_SETTING, "true" if found else "false")
            if self._parameterNode:
                self._parameterNode.segmentFast = fields.default_fast(found)
        quiet, self._quietDeviceCheck = self._quietDeviceCheck, False
        if not check.ok and not quiet:
            slicer.util.warningDisplay(check.message, windowTitle=_("MiMSlicer - Device check"))

    def _gpuFoundSetting(self):
        value = str(qt.QSettings().value(self.GPU_FOUND_SETTING, "") or "")
        return {"true": True, "false": False}.get(value.lower())

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
                                            on_event=self._eventSink("segment"), fast=p.segmentFast)
            self._startedTask("segment", task, _("Segmenting {volume} with {model}{fast}").format(
                volume=p.inputVolume.GetName(), model=p.modelName, fast=_(" (fast)") if p.segmentFast else ""))

    def _onSegmentDone(self, task) -> None:
        segmentationNode = task.result
        if segmentationNode is not None and hasattr(segmentationNode, "IsA") and segmentationNode.IsA(
                "vtkMRMLSegmentationNode"):
            self._parameterNode.outputSegmentation = segmentationNode
            self._log(_("Segmentation written to {node}.").format(node=segmentationNode.GetName()))
            if self._parameterNode.segmentShow3D:
                self._show3D(segmentationNode, True)

    # ------------------------------------------------------------------ options and 3D

    def onFastToggled(self, checked) -> None:
        if self._parameterNode:
            self._parameterNode.segmentFast = bool(checked)

    def onShow3DAutoToggled(self, checked) -> None:
        if self._parameterNode:
            self._parameterNode.segmentShow3D = bool(checked)
            if checked and self._parameterNode.outputSegmentation:
                self._show3D(self._parameterNode.outputSegmentation, True)

    def onShow3DToggled(self, checked) -> None:
        if self._parameterNode and self._parameterNode.outputSegmentation:
            self._show3D(self._parameterNode.outputSegmentation, bool(checked))

    def _show3D(self, segmentationNode, show: bool) -> None:
        from MiMSlicerLib.segmentations import show_3d

        with slicer.util.tryWithErrorDisplay(_("Failed to show the segmentation in 3D."), waitCursor=True):
            show_3d(segmentationNode, show)
        self._updateButtonStates()

    @staticmethod
    def _shows3D(segmentationNode) -> bool:
        from MiMSlicerLib.segmentations import shows_3d

        return shows_3d(segmentationNode)

    # ------------------------------------------------------------------ Mask-in-mask preview

    def onPreviewButton(self) -> None:
        if self._cancelIfRunning("preview"):
            return
        self._resetClearedPaths()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the preview."), waitCursor=True):
            if not self._ensureDependencies():
                return
            centerRas, source = views.preview_center_ras(slicer.mrmlScene, p.previewVolume, p.previewCenter)
            self._log(_("Preview centre: {source} at {center}").format(
                source=source, center=", ".join(f"{c:.1f}" for c in centerRas)))
            task = self.logic.start_preview(str(p.previewCheckpoint), p.previewVolume, center_ras=centerRas,
                                            device=p.previewDevice, on_event=self._eventSink("preview"))
            self._startedTask("preview", task, _("Reconstructing the levels of {volume} around {center}").format(
                volume=p.previewVolume.GetName(), center=", ".join(f"{c:.1f}" for c in centerRas)))

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
        index = min(index, len(volumes) - 1)
        self._shownPreview = (level, index)
        if self._savedViews is None:  # the user's views, put back by "Restore my views" or leaving the module
            self._savedViews = views.save_views(slicer.mrmlScene)
            self.restoreViewsButton.enabled = True
        shown = views.show_preview_volumes(slicer.mrmlScene, volumes[index])
        layoutManager = slicer.app.layoutManager()
        for viewName in shown:
            sliceWidget = layoutManager.sliceWidget(viewName) if layoutManager else None
            if sliceWidget:
                sliceWidget.sliceLogic().FitSliceToAll()

    def onRestoreViews(self) -> None:
        """Put back the layout and slice views the preview borrowed."""
        if self._savedViews is None:
            return
        views.restore_views(slicer.mrmlScene, self._savedViews)
        self._savedViews = None  # choosing another level or volume shows the preview again
        self.restoreViewsButton.enabled = False

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
            from MiMSlicerLib.plots import start_with_plot

            # the curves' nodes and the plot layout only once the job has started (a failed start adds nothing)
            task, self._metricsPlot = start_with_plot(
                lambda: self.logic.start_finetune(cases, init, p.finetuneSteps, device=p.finetuneDevice,
                                                  name=p.finetuneName.strip() or None, label_names=labelNames,
                                                  on_event=self._eventSink("finetune")),
                slicer.mrmlScene, _("MiM fine-tuning"))
            slicer.modules.plots.logic().ShowChartInLayout(self._metricsPlot.chart)
            self._startedTask("finetune", task, _("Fine-tuning for {steps} steps from {init}").format(
                steps=p.finetuneSteps, init=init or _("random weights")))

    def _onFinetuneDone(self, task) -> None:
        result = task.result
        name = result.get("name") if isinstance(result, dict) else result
        self._log(_("New model {name} added to the library.").format(name=name))
        self.refreshModels(select=name if isinstance(name, str) else None)

    def _plotMetrics(self, event) -> None:
        """One table row per training progress event (loss) and per validation (Dice)."""
        if self._metricsPlot is not None:
            self._metricsPlot.add(event)

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
        task.cancel(wait=False)  # returns at once; the process tree is killed in the background
        return True

    def onPollTasks(self) -> None:
        for kind, task in list(self._tasks.items()):
            pollError = None
            if getattr(task, "blocking_next", False):  # Slicer's own installer runs in this thread
                self._taskWidgets[kind][2].text = _("Installing {what}; Slicer may respond slowly until it is done "
                                                    "(several minutes).").format(what=task.next_step.describe())
                slicer.app.processEvents()
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
        eta = format_seconds(task.eta_s)
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
                     "finetune": self._onFinetuneDone, "addmodel": self._onAddModelDone,
                     "install": self._onInstallDone, "device": self._onDeviceCheckDone}[kind](task)
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
    does not install them: runTest then skips, saying so) and about a minute on a CPU.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    TIMEOUT_S = 900

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here. Where the Python packages are not installed
        (Slicer's testing mode on the Extensions build servers does not install them), the test
        is skipped with a message that says so, instead of failing."""
        self.setUp()
        reason = dependencies.self_test_skip_reason(dependencies.find_problems(dependencies.load_requirements()))
        if reason:
            logging.warning(reason)
            if slicer.app.testingEnabled():
                raise unittest.SkipTest(reason)
            self.delayDisplay(reason, msec=3000)  # "Reload and Test" in the GUI: say it, do not fail
            return
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
