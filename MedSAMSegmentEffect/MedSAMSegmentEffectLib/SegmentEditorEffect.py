"""The "MedSAM" Segment Editor effect: box prompts on slices, propagation in 3D.

Widgets and events only. What a request does (jobs on the inference worker, results written through
the editor under one undo state, the checks that stop a job whose target changed) is
MedSAMSlicerLib.actions.ActionRunner, Qt-free and tested with slicer-core; geometry, writing,
intensity, the engine factory and the worker live beside it. The engine (torch) only runs on the
persistent worker thread and is imported there, never when Slicer loads this file.
"""
from __future__ import annotations

import logging
import os
import sys

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

__all__ = ["SegmentEditorEffect"]

POLL_MS = 40


def _ensure_lib_path():
    """MedSAMSlicerLib and medsam_slicer live in the MedSAMSlicer module folder (a sibling when run from
    source; the same folder once the extension is installed)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(os.path.dirname(here), "MedSAMSlicer"), os.path.dirname(here), here):
        if os.path.isdir(os.path.join(candidate, "MedSAMSlicerLib")) and candidate not in sys.path:
            sys.path.insert(0, candidate)


_ensure_lib_path()
from MedSAMSlicerLib import actions, engines, geometry, intensity, jobs, writing  # noqa: E402


class _Outline:
    """A polyline (vtkActor2D) in one slice view. It remembers what it outlines (a voxel box or a mask
    on a slice) and recomputes its display XY when the view pans, zooms or changes slice."""

    def __init__(self, scriptedEffect, viewWidget, color=(1.0, 0.85, 0.0), width=2):
        self.scriptedEffect = scriptedEffect
        self.viewWidget = viewWidget
        self.shape = None  # (grid, axis, index, box or None, mask or None)
        self.points = vtk.vtkPoints()
        self.lines = vtk.vtkCellArray()
        self.polyData = vtk.vtkPolyData()
        self.polyData.SetPoints(self.points)
        self.polyData.SetLines(self.lines)
        mapper = vtk.vtkPolyDataMapper2D()
        mapper.SetInputData(self.polyData)
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(mapper)
        self.actor.GetProperty().SetColor(*color)
        self.actor.GetProperty().SetLineWidth(width)
        scriptedEffect.addActor2D(viewWidget, self.actor)

    def setPolygon(self, xys):
        self.points.Reset()
        self.lines.Reset()
        n = len(xys)
        for x, y in xys:
            self.points.InsertNextPoint(float(x), float(y), 0.0)
        if n:
            self.lines.InsertNextCell(n + 1)
            for i in range(n):
                self.lines.InsertCellPoint(i)
            self.lines.InsertCellPoint(0)
        self.modified()

    def setSegments(self, segments):
        self.points.Reset()
        self.lines.Reset()
        for a, b in segments:
            i0 = self.points.InsertNextPoint(float(a[0]), float(a[1]), 0.0)
            i1 = self.points.InsertNextPoint(float(b[0]), float(b[1]), 0.0)
            self.lines.InsertNextCell(2)
            self.lines.InsertCellPoint(i0)
            self.lines.InsertCellPoint(i1)
        self.modified()

    def modified(self):
        self.points.Modified()
        self.lines.Modified()
        self.polyData.Modified()

    def follow(self, grid, axis, index, box=None, mask=None):
        """Outline a voxel box, or a mask's boundary, on slice `index`; kept in place by update()."""
        self.shape = (grid, axis, index, box, mask)
        self.update()

    def update(self):
        if self.shape is None:
            return
        grid, axis, index, box, mask = self.shape
        sliceNode = self.viewWidget.sliceLogic().GetSliceNode()
        xy = geometry.overlay_xy(sliceNode, grid, axis, index, box2d=box, mask=mask)
        if mask is None:
            self.setPolygon(xy)
        else:
            self.setSegments(xy)

    def remove(self):
        self.scriptedEffect.removeActor2D(self.viewWidget, self.actor)


class _Host:
    """What ActionRunner asks of the editor, answered through the scripted effect."""

    def __init__(self, effect):
        self.effect = effect

    def editor_node(self):
        return self.effect.scriptedEffect.parameterSetNode()

    def source_image(self):
        # the source volume resampled to the segmentation's geometry: what MedSAM sees and writes onto
        return self.effect.scriptedEffect.sourceVolumeImageData()

    def save_state_for_undo(self):
        self.effect.scriptedEffect.saveStateForUndo()

    def modifier(self, segmentationNode, segmentId):
        # modifySelectedSegmentByLabelmap (Slicer 5.8 and later); the runner has checked that the
        # selected segment is still segmentId before every write
        return writing.effect_modifier(self.effect.scriptedEffect)

    def provider(self):
        return self.effect.provider()

    def window_spec(self):
        return self.effect.windowSpec()

    def status(self, text, error=False):
        self.effect.status(text, error)

    def progress(self, percent):
        self.effect.showProgress(percent)

    def show_preview(self, action, mask):
        self.effect.showPreview(action, mask)


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """MedSAM: draw a box, get the structure; propagate in 3D."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedSAM"  # effects are looked up by this name: keep it untranslated
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.drag = None  # {"view", "xy0", "xy1", "outline", "preview"}
        self.outlines = {}  # viewWidget -> _Outline of the last box / preview contour
        self.lastView = None
        self.runner = actions.ActionRunner(_Host(self))
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.pollWorker)

    @property
    def job(self):
        """The running job, or None (the self-test waits on it)."""
        return self.runner.action.job if self.runner.action is not None else None

    @property
    def ruleOverrides(self):
        return self.runner.rule_overrides

    @ruleOverrides.setter
    def ruleOverrides(self, value):
        self.runner.rule_overrides = dict(value or {})

    def cleanup(self):
        self.timer.stop()
        self.timer.disconnect("timeout()", self.pollWorker)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        cloned = effects.qSlicerSegmentEditorScriptedEffect(None)
        cloned.setPythonSource(__file__.replace("\\", "/"))
        return cloned

    def icon(self):
        for path in (
            os.path.join(os.path.dirname(__file__), "..", "Resources", "Icons", "MedSAMSegmentEffect.png"),
            os.path.join(os.path.dirname(__file__), "Resources", "Icons", "MedSAMSegmentEffect.png"),
        ):
            if os.path.exists(path):
                return qt.QIcon(path)
        return qt.QIcon()

    def helpText(self):
        return """<html>Segment with <b>MedSAM</b> from a box (the model, LiteMedSAM or MedSAM ViT-B, is chosen in
the MedSAM Slicer module).<br>
<b>Left-drag</b> a box around the structure in a slice view: that slice is segmented into the selected
segment (drawing again replaces what the box touches on that slice). <b>Shift-drag</b> (or <i>Preview
only</i>) shows the result without writing it; <b>Enter</b> accepts a preview. <b>c</b> cancels a drag,
a running job or a preview (Esc leaves the effect, which stops a running job too).<br>
3D: <b>u</b> / <b>j</b> / <b>p</b> propagate up / down / both from the current slice; key slices: draw boxes
on several slices with <i>Key slices</i> on, then <b>k</b> (Interpolate); <i>Segment in ROI</i> uses a markups ROI.
After correcting a slice by hand, <i>Re-propagate</i> recomputes the slices beyond it. Growth stops where it
runs into segments the editable area protects (e.g. <i>Outside all segments</i>): contour a neighbour first
(the next vertebra, an adjacent organ) and growth ends at it instead of running on through it.<br>
<i>Intensity</i>: <i>Automatic</i> (the default) lets LiteMedSAM pick the CT window for each segment from its
first box (lungs get a lung window, bone a bone window) and keeps it for that segment; MR gets percentiles.
The status line says which window was used.<br>
A job writes into the segment selected when it started: selecting another segment, undoing or changing
the source volume stops it. The editable area, editable intensity range and overwrite settings apply;
one Ctrl+Z undoes a whole propagation. Engine, device and weights: MedSAM Slicer module.</html>"""

    # ------------------------------------------------------------------ options

    def setupOptionsFrame(self):
        self.windowCombo = qt.QComboBox()
        for value, label in intensity.CHOICES:
            self.windowCombo.addItem(label, value)
        self.windowCombo.toolTip = ("Intensities MedSAM sees. Automatic (the default): on CT with LiteMedSAM the model "
                                    "picks the window for each segment from its first box (and keeps it for that "
                                    "segment); MR and other data get the 0.5-99.5th percentiles, MedSAM ViT-B on CT "
                                    "its training window (W 400, L 40). Or the volume's display window/level, "
                                    "a preset, or a custom width/level.")
        self.windowWidth = qt.QDoubleSpinBox()
        self.windowLevel = qt.QDoubleSpinBox()
        for box in (self.windowWidth, self.windowLevel):
            box.setRange(-100000.0, 100000.0)
            box.setDecimals(1)
        self.windowWidth.setValue(400.0)
        self.windowLevel.setValue(40.0)
        windowRow = qt.QHBoxLayout()
        windowRow.addWidget(self.windowCombo, 1)
        windowRow.addWidget(qt.QLabel("W"))
        windowRow.addWidget(self.windowWidth)
        windowRow.addWidget(qt.QLabel("L"))
        windowRow.addWidget(self.windowLevel)
        self.scriptedEffect.addLabeledOptionsWidget("Intensity:", windowRow)
        self.windowLabel = qt.QLabel("")
        self.scriptedEffect.addLabeledOptionsWidget("", self.windowLabel)

        self.previewCheck = qt.QCheckBox("Preview only (Enter accepts)")
        self.previewCheck.toolTip = "Show MedSAM's result without writing it. Shift-drag does the same once."
        self.keySliceCheck = qt.QCheckBox("Key slices")
        self.keySliceCheck.toolTip = "Remember each box as a key slice; Interpolate segments every slice between them."
        checks = qt.QHBoxLayout()
        checks.addWidget(self.previewCheck)
        checks.addWidget(self.keySliceCheck)
        self.scriptedEffect.addOptionsWidget(checks)

        self.downButton = qt.QPushButton("Propagate down (j)")
        self.bothButton = qt.QPushButton("Propagate both (p)")
        self.upButton = qt.QPushButton("Propagate up (u)")
        row = qt.QHBoxLayout()
        for b in (self.downButton, self.bothButton, self.upButton):
            b.toolTip = ("Grow the selected segment from the current slice of the last used view, slice by "
                         "slice, until the structure ends (stop rules).")
            row.addWidget(b)
        self.scriptedEffect.addOptionsWidget(row)
        self.downButton.connect("clicked()", lambda: self.propagate("down"))
        self.bothButton.connect("clicked()", lambda: self.propagate("both"))
        self.upButton.connect("clicked()", lambda: self.propagate("up"))

        self.maxSlices = qt.QSpinBox()
        self.maxSlices.setRange(0, 10000)
        self.maxSlices.setSpecialValueText("to the end")
        self.maxSlices.toolTip = "At most this many slices per direction (0: until a stop rule or the volume's edge)."
        self.scriptedEffect.addLabeledOptionsWidget("Max slices:", self.maxSlices)

        self.interpolateButton = qt.QPushButton("Interpolate key slices (k)")
        self.clearKeysButton = qt.QPushButton("Clear key slices")
        self.repropagateButton = qt.QPushButton("Re-propagate from this slice")
        self.repropagateButton.toolTip = ("After correcting the current slice by hand: recompute only the slices "
                                          "beyond it, away from the seed.")
        row2 = qt.QHBoxLayout()
        row2.addWidget(self.interpolateButton)
        row2.addWidget(self.clearKeysButton)
        row2.addWidget(self.repropagateButton)
        self.scriptedEffect.addOptionsWidget(row2)
        self.interpolateButton.connect("clicked()", self.interpolateKeySlices)
        self.clearKeysButton.connect("clicked()", self.clearKeySlices)
        self.repropagateButton.connect("clicked()", self.repropagate)

        self.roiSelector = slicer.qMRMLNodeComboBox()
        self.roiSelector.nodeTypes = ["vtkMRMLMarkupsROINode"]
        self.roiSelector.noneEnabled = True
        self.roiSelector.addEnabled = False
        self.roiSelector.removeEnabled = False
        self.roiSelector.setMRMLScene(slicer.mrmlScene)
        self.roiButton = qt.QPushButton("Segment in ROI")
        self.roiButton.toolTip = "Segment every slice inside the ROI (a 3D box) along the last used view's axis."
        roiRow = qt.QHBoxLayout()
        roiRow.addWidget(self.roiSelector, 1)
        roiRow.addWidget(self.roiButton)
        self.scriptedEffect.addLabeledOptionsWidget("ROI:", roiRow)
        self.roiButton.connect("clicked()", self.segmentInRoi)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        self.progressBar.visible = False
        self.cancelButton = qt.QPushButton("Cancel (c)")
        self.cancelButton.visible = False
        self.cancelButton.connect("clicked()", self.cancelJob)
        progressRow = qt.QHBoxLayout()
        progressRow.addWidget(self.progressBar, 1)
        progressRow.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(progressRow)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.settingsButton = qt.QPushButton("Engine and weights settings...")
        self.settingsButton.connect("clicked()", lambda: slicer.util.selectModule("MedSAMSlicer"))
        self.scriptedEffect.addOptionsWidget(self.settingsButton)

        self.windowCombo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.windowWidth.connect("valueChanged(double)", self.updateMRMLFromGUI)
        self.windowLevel.connect("valueChanged(double)", self.updateMRMLFromGUI)
        self.previewCheck.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.maxSlices.connect("valueChanged(int)", self.updateMRMLFromGUI)

    def setMRMLDefaults(self):
        # a parameter saved before Automatic became the default (e.g. "display" in a saved scene) is kept
        self.scriptedEffect.setParameterDefault("Window", intensity.DEFAULT)
        self.scriptedEffect.setParameterDefault("WindowWidth", 400.0)
        self.scriptedEffect.setParameterDefault("WindowLevel", 40.0)
        self.scriptedEffect.setParameterDefault("PreviewOnly", 0)
        self.scriptedEffect.setParameterDefault("MaxSlices", 0)

    def updateGUIFromMRML(self):
        widgets = (self.windowCombo, self.windowWidth, self.windowLevel, self.previewCheck, self.maxSlices)
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            index = self.windowCombo.findData(intensity.choice_of(self.scriptedEffect.parameter("Window")))
            self.windowCombo.setCurrentIndex(max(index, 0))
            self.windowWidth.setValue(self.scriptedEffect.doubleParameter("WindowWidth"))
            self.windowLevel.setValue(self.scriptedEffect.doubleParameter("WindowLevel"))
            self.previewCheck.setChecked(self.scriptedEffect.integerParameter("PreviewOnly") != 0)
            self.maxSlices.setValue(self.scriptedEffect.integerParameter("MaxSlices"))
        finally:
            for w, b in zip(widgets, blocked):
                w.blockSignals(b)
        custom = self.windowCombo.currentData == "custom"
        self.windowWidth.enabled = custom
        self.windowLevel.enabled = custom
        self.updateWindowLabel()

    def updateMRMLFromGUI(self, *args):
        self.scriptedEffect.setParameter("Window", self.windowCombo.currentData or intensity.DEFAULT)
        self.scriptedEffect.setParameter("WindowWidth", self.windowWidth.value)
        self.scriptedEffect.setParameter("WindowLevel", self.windowLevel.value)
        self.scriptedEffect.setParameter("PreviewOnly", 1 if self.previewCheck.checked else 0)
        self.scriptedEffect.setParameter("MaxSlices", self.maxSlices.value)
        custom = self.windowCombo.currentData == "custom"
        self.windowWidth.enabled = custom
        self.windowLevel.enabled = custom
        self.updateWindowLabel()

    def updateWindowLabel(self):
        choice = intensity.choice_of(self.scriptedEffect.parameter("Window"))
        if choice == intensity.DISPLAY:
            wl = intensity.display_width_level(self.sourceVolumeNode())
            self.windowLabel.text = ("display: W {:g} L {:g}".format(*wl)) if wl else "display window unknown: automatic"
        elif choice == "custom":
            self.windowLabel.text = f"custom: W {self.windowWidth.value:g} L {self.windowLevel.value:g}"
        elif choice == intensity.AUTO:
            self.windowLabel.text = "per segment; the status line shows the window used"
        else:
            self.windowLabel.text = ""

    def sourceVolumeNodeChanged(self):
        # what runs on the old volume stops (on the worker too); key slices and the preview are dropped
        self.runner.source_changed()
        self.clearOutlines()
        self.updateWindowLabel()

    def referenceGeometryChanged(self):
        # the segmentation's geometry changed: slice indices and the image the job runs on are stale
        self.sourceVolumeNodeChanged()

    # ------------------------------------------------------------------ activation

    def activate(self):
        self.updateWindowLabel()

    def deactivate(self):
        # Esc (the editor's own shortcut) lands here: nothing may keep writing once the effect and its
        # Cancel button are gone
        self.cancelDrag()
        self.clearOutlines()
        if self.runner.busy:
            self.runner.stop("MedSAM stopped: the effect was left. Slices already written are kept "
                             "(Ctrl+Z removes them).", error=False)
        self.timer.stop()

    def clearOutlines(self):
        for outline in self.outlines.values():
            outline.remove()
            self.scriptedEffect.forceRender(outline.viewWidget)
        self.outlines = {}
        self.runner.preview = None

    # ------------------------------------------------------------------ helpers

    def sourceVolumeNode(self):
        node = self.scriptedEffect.parameterSetNode()
        return node.GetSourceVolumeNode() if node is not None else None

    def status(self, text, error=False):
        self.statusLabel.text = text
        self.statusLabel.setStyleSheet("color: #c0392b" if error else "")

    def showProgress(self, percent):
        """percent: 0..100 shows the bar and Cancel; None hides the bar (Cancel stays while a job runs)."""
        self.progressBar.visible = percent is not None
        if percent is not None:
            self.progressBar.setValue(int(percent))
        self.cancelButton.visible = self.runner.busy

    def windowSpec(self):
        choice = intensity.choice_of(self.scriptedEffect.parameter("Window"))
        displayWL = intensity.display_width_level(self.sourceVolumeNode()) if choice == intensity.DISPLAY else None
        custom = (self.scriptedEffect.doubleParameter("WindowWidth"), self.scriptedEffect.doubleParameter("WindowLevel"))
        return jobs.window_spec(choice, displayWL, custom)

    def provider(self):
        try:
            import MedSAMSlicer

            return MedSAMSlicer.MedSAMSlicerLogic.sharedProvider()
        except Exception:  # module not loaded (e.g. effect used from a custom app): defaults
            logging.debug("MedSAMSlicer module unavailable, default engine settings", exc_info=True)
            return engines.shared_provider()

    def sliceNodeOf(self, viewWidget):
        return viewWidget.sliceLogic().GetSliceNode() if viewWidget is not None else None

    def currentView(self):
        """The slice view a button press works in: the last one used, else the first visible slice view
        of the layout whose plane follows the volume's axes (the layout may have no Red view)."""
        if self.lastView is not None:
            return self.lastView
        image = self.scriptedEffect.sourceVolumeImageData()
        layoutManager = slicer.app.layoutManager()
        if image is None or layoutManager is None:
            return None
        views = []
        for name in layoutManager.sliceViewNames():
            widget = layoutManager.sliceWidget(name)
            if widget is not None and widget.isVisible():
                views.append((widget, widget.mrmlSliceNode()))
        try:
            found = actions.first_aligned_view(views, self.runner.grid(image))
        except ValueError:  # the segmentation is under a non-linear transform: the runner says so
            return None
        return found[0] if found is not None else None

    def started(self, action):
        """After a request: poll only while a job runs."""
        if self.runner.busy:
            self.timer.start()
            self.cancelButton.visible = True
        return action

    # ------------------------------------------------------------------ requests

    def propagate(self, direction):
        view = self.currentView()
        self.started(self.runner.propagate(self.sliceNodeOf(view), direction, self.maxSlices.value))

    def repropagate(self):
        view = self.currentView()
        self.started(self.runner.repropagate(self.sliceNodeOf(view), self.maxSlices.value))

    def interpolateKeySlices(self):
        view = self.currentView()
        self.started(self.runner.interpolate(self.sliceNodeOf(view)))

    def clearKeySlices(self):
        self.runner.clear_key_slices()

    def segmentInRoi(self):
        view = self.currentView()
        self.started(self.runner.segment_in_roi(self.sliceNodeOf(view), self.roiSelector.currentNode()))

    def cancelJob(self):
        self.runner.cancel()

    def pollWorker(self):
        if not self.runner.poll():
            self.timer.stop()
            self.cancelButton.visible = False

    # ------------------------------------------------------------------ outlines

    def grid(self):
        image = self.scriptedEffect.sourceVolumeImageData()
        try:
            return self.runner.grid(image) if image is not None else None
        except ValueError:  # non-linear transform: no outline
            return None

    def outline(self, viewWidget, color):
        outline = self.outlines.get(viewWidget)
        if outline is None:
            outline = self.outlines[viewWidget] = _Outline(self.scriptedEffect, viewWidget, width=1)
        outline.actor.GetProperty().SetColor(*color)
        return outline

    def showBox(self, action):
        grid = self.grid()
        if grid is None or action.view is None:
            return
        self.outline(action.view, (1.0, 0.85, 0.0)).follow(grid, action.axis, action.index, box=action.box)
        self.scriptedEffect.forceRender(action.view)

    def showPreview(self, action, mask):
        grid = self.grid()
        if grid is None or action.view is None:
            return
        self.outline(action.view, (0.2, 1.0, 0.4)).follow(grid, action.axis, action.index, mask=mask)
        self.scriptedEffect.forceRender(action.view)

    def processViewNodeEvents(self, callerViewNode, eventId, viewWidget):
        # pan, zoom, slice change: outlines are kept on their voxels (hidden off their slice)
        outline = self.outlines.get(viewWidget)
        if outline is not None:
            outline.update()

    # ------------------------------------------------------------------ interaction

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            return self.onKey(callerInteractor.GetKeySym(), viewWidget)
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if callerInteractor.GetControlKey() or callerInteractor.GetAltKey():
                return False
            self.cancelDrag()
            xy = callerInteractor.GetEventPosition()
            self.drag = {"view": viewWidget, "xy0": xy, "xy1": xy,
                         "preview": bool(callerInteractor.GetShiftKey()) or self.previewCheck.checked,
                         "outline": _Outline(self.scriptedEffect, viewWidget)}
            self.updateDragOutline()
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self.drag is not None and self.drag["view"] is viewWidget:
            self.drag["xy1"] = callerInteractor.GetEventPosition()
            self.updateDragOutline()
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self.drag is not None:
            self.drag["xy1"] = callerInteractor.GetEventPosition()
            drag = self.drag
            self.drag = None
            drag["outline"].remove()
            self.scriptedEffect.forceRender(viewWidget)
            self.onBox(drag)
            return True
        return False

    def updateDragOutline(self):
        (x0, y0), (x1, y1) = self.drag["xy0"], self.drag["xy1"]
        self.drag["outline"].setPolygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        self.scriptedEffect.forceRender(self.drag["view"])

    def cancelDrag(self):
        if self.drag is not None:
            self.drag["outline"].remove()
            self.scriptedEffect.forceRender(self.drag["view"])
            self.drag = None

    def onKey(self, keysym, viewWidget):
        action = actions.SHORTCUTS.get(keysym)
        if action is None:
            return False
        self.lastView = viewWidget
        if action == "cancel":
            if self.drag is not None:
                self.cancelDrag()
            elif self.runner.cancel():
                pass
            elif self.runner.discard_preview():
                self.clearOutlines()
            else:
                return False
            return True
        if action == "accept":
            if not self.runner.accept_preview():
                return False
            self.clearOutlines()
            return True
        if action == "interpolate":
            self.interpolateKeySlices()
            return True
        self.propagate(action)
        return True

    def onBox(self, drag):
        viewWidget = drag["view"]
        self.lastView = viewWidget
        action = self.runner.draw_box(self.sliceNodeOf(viewWidget), drag["xy0"], drag["xy1"], preview=drag["preview"],
                                      key_slice=self.keySliceCheck.checked, view=viewWidget)
        if action is not None:
            self.showBox(action)
        self.started(action)
