"""The "MedSAM" Segment Editor effect: box prompts on slices, propagation in 3D.

Thin Qt glue. Geometry, writing, intensity, the engine factory and the inference worker live in
MedSAMSlicerLib (plain functions tested with slicer-core; numpy only at import); the engine (torch)
only runs on the persistent worker thread and is imported there, never when Slicer loads this file.
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
# keysym -> action, while the mouse is over a slice view and the effect is active
SHORTCUTS = {
    "u": "up",
    "j": "down",
    "p": "both",
    "i": "interpolate",
    "Return": "accept",
    "KP_Enter": "accept",
    "Escape": "cancel",
}


def _ensure_lib_path():
    """MedSAMSlicerLib and medsam_slicer live in the MedSAMSlicer module folder (a sibling when run from
    source; the same folder once the extension is installed)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(os.path.dirname(here), "MedSAMSlicer"), os.path.dirname(here), here):
        if os.path.isdir(os.path.join(candidate, "MedSAMSlicerLib")) and candidate not in sys.path:
            sys.path.insert(0, candidate)


_ensure_lib_path()
from MedSAMSlicerLib import engines, geometry, intensity, worker, writing  # noqa: E402


class _Outline:
    """A yellow polyline (vtkActor2D) in one slice view, in display XY."""

    def __init__(self, scriptedEffect, viewWidget, color=(1.0, 0.85, 0.0), width=2):
        self.scriptedEffect = scriptedEffect
        self.viewWidget = viewWidget
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
        self.points.Modified()
        self.lines.Modified()
        self.polyData.Modified()

    def setSegments(self, segments):
        self.points.Reset()
        self.lines.Reset()
        for a, b in segments:
            i0 = self.points.InsertNextPoint(float(a[0]), float(a[1]), 0.0)
            i1 = self.points.InsertNextPoint(float(b[0]), float(b[1]), 0.0)
            self.lines.InsertNextCell(2)
            self.lines.InsertCellPoint(i0)
            self.lines.InsertCellPoint(i1)
        self.points.Modified()
        self.lines.Modified()
        self.polyData.Modified()

    def remove(self):
        self.scriptedEffect.removeActor2D(self.viewWidget, self.actor)


class _SessionHolder:
    """The engine session for the current source image and window. Touched on the worker thread only."""

    def __init__(self):
        self.key = None
        self.session = None

    def get(self, provider, key, volume, window_spec):
        choice, display_wl, custom = window_spec
        window = intensity.window_for(choice, volume, display_wl=display_wl, custom=custom)
        if self.session is None or self.key != key or volume is not None:
            if volume is None:
                raise RuntimeError("the source image changed: draw the box again")
            if self.session is not None:
                self.session.close()
            self.session = provider.session(volume, window)
            self.key = key
        elif getattr(self.session, "window", None) != window:
            self.session.set_window(window)
        return self.session, window


def _job_slice(job, holder, provider, key, volume, window_spec, axis, index, box):
    session, window = holder.get(provider, key, volume, window_spec)
    mask, score = session.segment_slice(axis, index, box)
    # The next prompt is usually a neighbour (a redraw, propagation): embed them in the background.
    session.focus(axis, index)
    return {"masks": {index: mask}, "score": score, "window": window}


def _stop_rules(max_slices, overrides=None):
    from medsam_slicer.propagation import StopRules

    options = dict(overrides or {})
    options["max_slices"] = max_slices if max_slices and max_slices > 0 else None
    return StopRules(**options)


def _job_3d(job, holder, provider, key, volume, window_spec, kind, axis, args, max_slices, rule_overrides=None):
    session, window = holder.get(provider, key, volume, window_spec)

    def progress(index, mask, done, total):
        job.report((int(index), mask, int(done), int(total)))

    common = dict(progress=progress, cancel=job.cancel_event)
    if kind == "propagate":
        seed_index, seed_box, seed_mask, direction = args
        result = session.propagate(axis, seed_index, seed_box=seed_box, seed_mask=seed_mask, direction=direction,
                                   rules=_stop_rules(max_slices, rule_overrides), **common)
    elif kind == "box3d":
        box2d, first, last = args
        result = session.segment_box3d(axis, box2d, first, last, **common)
    elif kind == "keys":
        (key_boxes,) = args
        result = session.segment_key_slices(axis, key_boxes, **common)
    elif kind == "repropagate":
        masks, corrected_index, corrected_mask, seed_index = args
        result = session.repropagate(axis, masks, corrected_index, corrected_mask, seed_index,
                                     rules=_stop_rules(max_slices, rule_overrides), **common)
    else:
        raise ValueError(kind)
    return {"masks": dict(result.masks), "stop_reasons": dict(result.stop_reasons), "cancelled": result.cancelled,
            "window": window}


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """MedSAM: draw a box, get the structure; propagate in 3D."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedSAM"  # effects are looked up by this name: keep it untranslated
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.drag = None  # {"view", "xy0", "xy1", "outline", "preview"}
        self.outlines = {}  # viewWidget -> _Outline of the last box / preview contour
        self.holder = _SessionHolder()
        self.sessionKey = None
        self.job = None  # the running job and its action context
        self.action = None
        self.lastSeed = None  # (axis, index, box) of the last box written
        self.lastView = None
        self.keyBoxes = {}  # axis -> {index: box}
        self.previewResult = None  # (axis, index, mask, viewWidget, image key)
        self.active = False
        self.ruleOverrides = {}  # StopRules fields to override (the self-test relaxes them)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.pollWorker)

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
        return """<html>Segment with <b>MedSAM</b> (ViT-B) from a box.<br>
<b>Left-drag</b> a box around the structure in a slice view: that slice is segmented into the selected
segment (drawing again on the slice replaces it). <b>Shift-drag</b> (or <i>Preview only</i>) shows the
result without writing it; <b>Enter</b> accepts a preview. <b>Esc</b> cancels a drag or a running job.<br>
3D: <b>u</b> / <b>j</b> / <b>p</b> propagate up / down / both from the current slice; key slices: draw boxes
on several slices with <i>Key slices</i> on, then <b>i</b> (Interpolate); <i>Segment in ROI</i> uses a markups ROI.
After correcting a slice by hand, <i>Re-propagate</i> recomputes the slices beyond it.<br>
The editable area, editable intensity range and overwrite settings apply; one Ctrl+Z undoes a whole
propagation. Engine, device and weights: MedSAM Slicer module.</html>"""

    # ------------------------------------------------------------------ options

    def setupOptionsFrame(self):
        self.windowCombo = qt.QComboBox()
        for value, label in intensity.CHOICES:
            self.windowCombo.addItem(label, value)
        self.windowCombo.toolTip = "Intensities MedSAM sees: by default the volume's current window/level."
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

        self.interpolateButton = qt.QPushButton("Interpolate key slices (i)")
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
        self.cancelButton = qt.QPushButton("Cancel")
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
        self.scriptedEffect.setParameterDefault("Window", "display")
        self.scriptedEffect.setParameterDefault("WindowWidth", 400.0)
        self.scriptedEffect.setParameterDefault("WindowLevel", 40.0)
        self.scriptedEffect.setParameterDefault("PreviewOnly", 0)
        self.scriptedEffect.setParameterDefault("MaxSlices", 0)

    def updateGUIFromMRML(self):
        widgets = (self.windowCombo, self.windowWidth, self.windowLevel, self.previewCheck, self.maxSlices)
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            index = self.windowCombo.findData(self.scriptedEffect.parameter("Window"))
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
        self.scriptedEffect.setParameter("Window", self.windowCombo.currentData or "display")
        self.scriptedEffect.setParameter("WindowWidth", self.windowWidth.value)
        self.scriptedEffect.setParameter("WindowLevel", self.windowLevel.value)
        self.scriptedEffect.setParameter("PreviewOnly", 1 if self.previewCheck.checked else 0)
        self.scriptedEffect.setParameter("MaxSlices", self.maxSlices.value)
        custom = self.windowCombo.currentData == "custom"
        self.windowWidth.enabled = custom
        self.windowLevel.enabled = custom
        self.updateWindowLabel()

    def updateWindowLabel(self):
        choice = self.scriptedEffect.parameter("Window") or "display"
        if choice == "display":
            wl = intensity.display_width_level(self.sourceVolumeNode())
            self.windowLabel.text = ("display: W {:g} L {:g}".format(*wl)) if wl else "display window unknown: automatic"
        elif choice == "custom":
            self.windowLabel.text = f"custom: W {self.windowWidth.value:g} L {self.windowLevel.value:g}"
        else:
            self.windowLabel.text = ""

    def sourceVolumeNodeChanged(self):
        self.sessionKey = None
        self.keyBoxes = {}
        self.updateWindowLabel()

    # ------------------------------------------------------------------ activation

    def activate(self):
        self.active = True
        self.timer.start()
        self.updateWindowLabel()

    def deactivate(self):
        self.active = False
        self.cancelDrag()
        self.clearOutlines()
        if self.job is None:
            self.timer.stop()
        # a running job keeps streaming into the segment; Esc or Cancel stops it

    def clearOutlines(self):
        for outline in self.outlines.values():
            outline.remove()
        self.outlines = {}
        self.previewResult = None

    # ------------------------------------------------------------------ helpers

    def sourceVolumeNode(self):
        node = self.scriptedEffect.parameterSetNode()
        return node.GetSourceVolumeNode() if node is not None else None

    def sourceImage(self):
        """The source volume resampled to the segmentation's geometry: what MedSAM sees and writes onto."""
        return self.scriptedEffect.sourceVolumeImageData()

    def segmentationNode(self):
        node = self.scriptedEffect.parameterSetNode()
        return node.GetSegmentationNode() if node is not None else None

    def grid(self, image):
        return geometry.grid_of(image, geometry.image_to_world(image, self.segmentationNode()))

    def status(self, text, error=False):
        self.statusLabel.text = text
        self.statusLabel.setStyleSheet("color: #c0392b" if error else "")
        if error:
            logging.warning("MedSAM: %s", text)

    def windowSpec(self):
        choice = self.scriptedEffect.parameter("Window") or "display"
        display_wl = intensity.display_width_level(self.sourceVolumeNode()) if choice == "display" else None
        custom = (self.scriptedEffect.doubleParameter("WindowWidth"), self.scriptedEffect.doubleParameter("WindowLevel"))
        return (choice, display_wl, custom if choice == "custom" else None)

    def imageKey(self, image):
        volume = self.sourceVolumeNode()
        return (volume.GetID() if volume else None, image.GetMTime(),
                volume.GetImageData().GetMTime() if volume and volume.GetImageData() else 0, tuple(image.GetExtent()))

    def readyToRun(self):
        """The module's dependency/weights check; False (with a message) when something is missing."""
        provider = self.provider()
        missing = engines.missing_modules(provider.settings.mode)
        if missing:
            self.status("Missing Python packages ({}): install them from the MedSAM Slicer module.".format(", ".join(missing)),
                        error=True)
            return False
        if self.job is not None:
            self.status("MedSAM is busy: wait or press Cancel (Esc).")
            return False
        return True

    def provider(self):
        try:
            import MedSAMSlicer

            return MedSAMSlicer.MedSAMSlicerLogic.sharedProvider()
        except Exception:  # module not loaded (e.g. effect used from a custom app): defaults
            logging.debug("MedSAMSlicer module unavailable, default engine settings", exc_info=True)
            return engines.shared_provider()

    def submit(self, fn, action, *args):
        """Runs fn(job, holder, provider, sessionKey, volume, windowSpec, *args) on the worker; action: context."""
        image = self.sourceImage()
        key = self.imageKey(image)
        provider = self.provider()
        # A new session (with the image sent again) when the image or the engine settings changed: the old
        # session still holds the engine that was loaded for the old settings.
        sessionKey = (key, provider.settings.key())
        volume = None
        if sessionKey != self.sessionKey or self.holder.session is None:
            volume = writing.image_to_array(image)  # a copy: the worker never sees VTK memory
        action.update({"key": key, "image": image, "undoSaved": False, "written": {}})
        self.action = action
        self.job = worker.shared_worker().submit(fn, self.holder, provider, sessionKey, volume, self.windowSpec(), *args,
                                                 tag=action.get("kind"))
        self.sessionKey = sessionKey
        self.timer.start()
        busy = action.get("kind") != "slice"
        self.progressBar.visible = busy
        self.cancelButton.visible = busy
        self.progressBar.setValue(0)
        loading = "" if provider.loaded else " (loading the model first: this can take a while)"
        self.status("MedSAM: {}...{}".format(action.get("label", "working"), loading))

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
        action = SHORTCUTS.get(keysym)
        if action is None:
            return False
        self.lastView = viewWidget
        if action == "cancel":
            if self.drag is not None:
                self.cancelDrag()
            elif self.job is not None:
                self.cancelJob()
            elif self.previewResult is not None:
                self.clearOutlines()
                self.scriptedEffect.forceRender(viewWidget)
            else:
                return False
            return True
        if action == "accept":
            if self.previewResult is None:
                return False
            self.acceptPreview()
            return True
        if action == "interpolate":
            self.interpolateKeySlices()
            return True
        self.propagate(action)
        return True

    def onBox(self, drag):
        viewWidget = drag["view"]
        if abs(drag["xy1"][0] - drag["xy0"][0]) < 2 or abs(drag["xy1"][1] - drag["xy0"][1]) < 2:
            self.status("Drag a box around the structure (the box was too small).")
            return
        image = self.sourceImage()
        if image is None:
            self.status("Select a source volume first.", error=True)
            return
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        try:
            axis, index, box = geometry.xy_box_to_ijk_box(sliceNode, drag["xy0"], drag["xy1"], self.grid(image))
        except (geometry.ObliqueViewError, geometry.OutsideVolumeError) as exc:
            self.status(str(exc), error=True)
            return
        if not self.readyToRun():
            return
        self.lastView = viewWidget
        self.showBox(viewWidget, axis, index, box, image)
        preview = drag["preview"]
        if self.keySliceCheck.checked and not preview:
            self.keyBoxes.setdefault(axis, {})[index] = box
        self.submit(_job_slice, {"kind": "slice", "axis": axis, "index": index, "box": box, "preview": preview,
                                 "view": viewWidget, "label": f"segmenting slice {index}"},
                    axis, index, box)

    def showBox(self, viewWidget, axis, index, box, image):
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        outline = self.outlines.get(viewWidget)
        if outline is None:
            outline = self.outlines[viewWidget] = _Outline(self.scriptedEffect, viewWidget, color=(1.0, 0.85, 0.0), width=1)
        outline.setPolygon(geometry.box_outline_xy(sliceNode, self.grid(image), axis, index, box))
        self.scriptedEffect.forceRender(viewWidget)

    def showPreview(self, viewWidget, axis, index, mask, image):
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        segments = geometry.mask_outline_segments(mask)
        grid = self.grid(image)
        xy = geometry.slice_points_to_xy(sliceNode, grid, axis, index, segments.reshape(-1, 2)).reshape(-1, 2, 2)
        outline = self.outlines.get(viewWidget)
        if outline is None:
            outline = self.outlines[viewWidget] = _Outline(self.scriptedEffect, viewWidget, width=1)
        outline.actor.GetProperty().SetColor(0.2, 1.0, 0.4)
        outline.setSegments(xy)
        self.previewResult = (axis, index, mask, viewWidget, self.imageKey(image))
        self.scriptedEffect.forceRender(viewWidget)

    def acceptPreview(self):
        axis, index, mask, viewWidget, key = self.previewResult
        image = self.sourceImage()
        if image is None or self.imageKey(image) != key:
            self.status("The source volume changed since the preview: draw the box again.", error=True)
            return
        self.scriptedEffect.saveStateForUndo()
        self.writeMasks({index: mask}, axis, image)
        self.clearOutlines()
        self.scriptedEffect.forceRender(viewWidget)
        self.status(f"Preview written to slice {index}.")

    # ------------------------------------------------------------------ 3D actions

    def currentSlice(self):
        """(view, axis, index) of the last used slice view (else Red), or None after telling the user why
        there is none (no source volume, oblique view, plane outside the volume)."""
        view = self.lastView
        if view is None:
            view = slicer.app.layoutManager().sliceWidget("Red")
        image = self.sourceImage()
        if image is None:
            self.status("Select a source volume first.", error=True)
            return None
        try:
            axis, index = geometry.view_axis_and_slice(view.sliceLogic().GetSliceNode(), self.grid(image))
        except ValueError as exc:
            self.status(str(exc), error=True)
            return None
        return view, axis, index

    def segmentSlices(self, axis, indices=None):
        """{index: bool mask} of the selected segment (indices None: its non-empty slices)."""
        node = self.scriptedEffect.parameterSetNode()
        return writing.segment_slices(self.segmentationNode(), node.GetSelectedSegmentID(), self.sourceImage(), axis,
                                      indices)

    def propagate(self, direction):
        current = self.currentSlice()
        if current is None or not self.readyToRun():
            return
        view, axis, index = current
        seedMask = self.segmentSlices(axis, [index])[index]
        seedBox = None
        if not seedMask.any():
            if self.lastSeed and self.lastSeed[:2] == (axis, index):
                seedMask, seedBox = None, self.lastSeed[2]
            else:
                self.status(f"Slice {index} of the selected segment is empty: draw a box on it first.", error=True)
                return
        if direction != "both":
            # "up" = the direction in which the view's slice moves forward
            sign = geometry.index_direction_of_view_up(view.sliceLogic().GetSliceNode(), self.grid(self.sourceImage()), axis)
            if sign < 0:
                direction = "down" if direction == "up" else "up"
        self.submit(_job_3d, {"kind": "propagate", "axis": axis, "label": f"propagating from slice {index}"},
                    "propagate", axis, (index, seedBox, seedMask, direction), self.maxSlices.value,
                    self.ruleOverrides)

    def repropagate(self):
        current = self.currentSlice()
        if current is None or not self.readyToRun():
            return
        view, axis, index = current
        masks = self.segmentSlices(axis)
        corrected = masks.get(index)
        if corrected is None:
            self.status(f"Correct slice {index} first (it is empty).", error=True)
            return
        seed = self.lastSeed[1] if self.lastSeed and self.lastSeed[0] == axis else index
        self.submit(_job_3d, {"kind": "repropagate", "axis": axis, "label": f"re-propagating from slice {index}"},
                    "repropagate", axis, (masks, index, corrected, seed), self.maxSlices.value,
                    self.ruleOverrides)

    def interpolateKeySlices(self):
        current = self.currentSlice()
        if current is None:
            return
        view, axis, index = current
        keys = dict(self.keyBoxes.get(axis, {}))
        if len(keys) < 2:
            self.status("Turn on Key slices and draw boxes on at least two slices of this view first.", error=True)
            return
        if not self.readyToRun():
            return
        self.submit(_job_3d, {"kind": "keys", "axis": axis, "label": f"interpolating {len(keys)} key slices"},
                    "keys", axis, (keys,), 0)

    def clearKeySlices(self):
        self.keyBoxes = {}
        self.status("Key slices cleared.")

    def segmentInRoi(self):
        roi = self.roiSelector.currentNode()
        if roi is None:
            self.status("Select a markups ROI first.", error=True)
            return
        current = self.currentSlice()
        if current is None:
            return
        view, axis, index = current
        try:
            lo, hi = geometry.ras_box_to_ijk_box3d(self.grid(self.sourceImage()), *geometry.roi_ras_bounds(roi))
        except ValueError as exc:  # the ROI is off the volume, or the segmentation's transform is non-linear
            self.status(str(exc), error=True)
            return
        if not self.readyToRun():
            return
        xa, ya = geometry.IN_PLANE[axis]
        n = geometry.AXES.index(axis)
        box2d = (lo[xa], lo[ya], hi[xa], hi[ya])
        self.submit(_job_3d, {"kind": "box3d", "axis": axis, "label": "segmenting the ROI"},
                    "box3d", axis, (box2d, lo[n], hi[n]), 0)

    def cancelJob(self):
        if self.job is not None:
            self.job.cancel()
            self.status("Cancelling... (slices already written are kept; Ctrl+Z removes them all)")

    # ------------------------------------------------------------------ results (main thread)

    def writeMasks(self, masks, axis, image):
        writing.write_slices(writing.effect_modifier(self.scriptedEffect), image, masks, axis)

    def writeForAction(self, masks):
        action = self.action
        image = self.sourceImage()
        if image is None or self.imageKey(image) != action["key"]:
            raise RuntimeError("the source volume or segmentation geometry changed while MedSAM was running; "
                               "the result was not written")
        if not action["undoSaved"]:
            self.scriptedEffect.saveStateForUndo()  # once per user action: one Ctrl+Z undoes it all
            action["undoSaved"] = True
        self.writeMasks(masks, action["axis"], image)
        action["written"].update(masks)  # index -> mask as written

    def pollWorker(self):
        if self.job is None:
            if not self.active:
                self.timer.stop()
            return
        events = self.job.poll()
        pending = {}
        for kind, payload in events:
            if self.job is None:
                break
            try:
                if kind == worker.PROGRESS:
                    index, mask, done, total = payload
                    pending[index] = mask
                    self.progressBar.setValue(int(100 * done / max(total, 1)))
                    self.status(f"MedSAM: {self.action.get('label')} ({done}/{total})")
                elif kind == worker.DONE:
                    if pending:
                        self.writeForAction(pending)
                        pending = {}
                    self.finishAction(payload)
                elif kind in (worker.ERROR, worker.CANCELLED):
                    if pending:
                        self.writeForAction(pending)
                        pending = {}
                    self.failAction(payload if kind == worker.ERROR else None)
            except Exception as exc:  # writing failed: report, keep Slicer going
                logging.exception("MedSAM: applying the result failed")
                self.failAction((exc, ""))
                pending = {}
        if pending and self.action is not None:
            try:
                self.writeForAction(pending)
            except Exception as exc:
                logging.exception("MedSAM: writing slices failed")
                self.status(str(exc), error=True)

    def finishAction(self, result):
        if self.action["kind"] == "slice":
            self.finishSlice(result)
        else:
            self.finishVolume(result)
        self.endAction()

    def finishSlice(self, result):
        action = self.action
        index = action["index"]
        mask = result["masks"][index]
        score = result["score"]
        if not mask.any():
            self.status(f"MedSAM found nothing in the box on slice {index}.")
        if action["preview"]:
            self.showPreview(action["view"], action["axis"], index, mask, action["image"])
            self.status(f"Preview of slice {index} (score {score:.2f}): Enter writes it, Esc discards it.")
        else:
            self.writeForAction({index: mask})
            self.lastSeed = (action["axis"], index, action["box"])
            window = intensity.describe(result["window"])
            self.status(f"Slice {index} segmented (score {score:.2f}, {window}). Propagate with u / j / p.")

    def finishVolume(self, result):
        # Slices streamed during the run are raw; the final result is post-processed in 3D (components
        # anchored to the seed) and may drop slices: rewrite what differs, clear what was dropped.
        import numpy as np

        masks = result["masks"]
        written = self.action["written"]
        fix = {i: m for i, m in masks.items() if i not in written or not np.array_equal(written[i], m)}
        for i, m in written.items():
            if i not in masks:
                fix[i] = np.zeros_like(m)
        if fix:
            self.writeForAction(fix)
        reasons = ", ".join("{}: {}".format(*kv) for kv in result.get("stop_reasons", {}).items())
        done = "cancelled, kept" if result.get("cancelled") else "done:"
        self.status("MedSAM {} {} slices{}.".format(done, len(masks), (" (" + reasons + ")") if reasons else ""))

    def failAction(self, error):
        if error is None:
            written = len(self.action["written"]) if self.action else 0
            self.status(f"Cancelled; {written} slices kept (Ctrl+Z removes them).")
        else:
            exc, tb = error
            if tb:
                logging.error("MedSAM failed:\n%s", tb)
            self.status(self.describeError(exc), error=True)
        self.endAction()

    def describeError(self, exc):
        try:
            from medsam_slicer.errors import MedSAMError

            if isinstance(exc, MedSAMError):
                return str(exc)
        except ImportError:
            pass
        if isinstance(exc, ImportError):
            return f"A Python package is missing ({exc}): install it from the MedSAM Slicer module."
        return f"MedSAM failed: {type(exc).__name__}: {exc}"

    def endAction(self):
        self.job = None
        self.action = None
        self.progressBar.visible = False
        self.cancelButton.visible = False
