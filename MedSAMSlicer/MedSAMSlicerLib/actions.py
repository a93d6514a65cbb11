"""The MedSAM effect's actions without Qt: from a dragged box or a key press to slices in the segment.

``ActionRunner`` turns the user's requests (a box on a slice view, propagate, re-propagate,
interpolate key slices, segment in a ROI) into jobs for the inference worker (``jobs``), and applies
what comes back on the main thread, through the Segment Editor's modify path (``writing``), under
one undo state per action. The Qt effect only translates widgets and events into these calls and
shows the status, progress and outlines the runner hands it; tests drive the same class with
slicer-core's scene, editor node and editor logic.

The rules a running action keeps (each checked before every write):
- it writes into the segmentation node and segment that were selected when it was submitted; when
  the selection changes, the job is stopped on the worker and nothing more is written;
- the segment holds what the action last wrote: an undo (or any other edit) mid-job stops it;
- the source image is the one the job runs on: a source-volume change stops it;
- a failure (of the job, or of a write) ends the action and cancels the job on the worker, so the
  next box never waits behind an orphan.

Host protocol (the effect, or a test's stand-in), all called on the main thread:
    editor_node() -> vtkMRMLSegmentEditorNode      source_image() -> vtkOrientedImageData or None
    save_state_for_undo()                          modifier(segmentation_node, segment_id) -> modify()
    provider() -> engines.EngineProvider           window_spec() -> jobs.window_spec(...)
    status(text, error=False)                      progress(percent or None: hide)
    show_preview(action, mask)                     (optional) the preview outline
"""
from __future__ import annotations

import logging
import weakref
from typing import Dict, Optional

from . import engines, geometry, jobs, worker, writing

# keysym -> action, while the mouse is over a slice view and the effect is active. The Segment
# Editor owns (as main-window shortcuts, so the view never sees them) Escape (leave the effect),
# Space, 0-9, Shift+0-9, z, y, q, w, / * , . < > and i (intensity-range mask); slice views own f b g
# t v V r [ ] { } and the arrows (qMRMLSegmentEditorWidget::installKeyboardShortcuts and
# vtkMRMLSliceIntersectionWidget, Slicer 5.8 to 5.10). These keys are free in both.
SHORTCUTS = {
    "u": "up",
    "j": "down",
    "p": "both",
    "k": "interpolate",
    "c": "cancel",
    "Return": "accept",
    "KP_Enter": "accept",
}
EDITOR_KEYS = frozenset("0123456789zyqwi/*,.<>") | {"Escape", "space"}
VIEW_KEYS = frozenset("fbgtvVr") | {"Left", "Right", "Up", "Down", "bracketleft", "bracketright", "braceleft",
                                    "braceright"}


class ActionStopped(RuntimeError):
    """The action cannot go on (the target, the segment or the source image changed)."""


class Action:
    """One user request and what it has written so far."""

    def __init__(self, kind: str, axis: str, label: str, index: Optional[int] = None, box=None,
                 preview: bool = False, view=None):
        self.kind = kind  # "slice", "propagate", "repropagate", "keys", "box3d"
        self.axis = axis
        self.label = label
        self.index = index
        self.box = box
        self.preview = preview
        self.view = view  # opaque for the runner: the view widget the box was drawn in
        self.segmentation_node = None
        self.segment_id: Optional[str] = None
        self.image = None
        self.image_key = None
        self.session_key = None
        self.segment_state = None
        self.undo_saved = False
        self.written: Dict[int, object] = {}  # index -> mask as written
        self.job = None

    def __repr__(self) -> str:
        return f"Action({self.kind}, {self.axis}, {self.label!r})"


def image_key(volume_node, image):
    """What identifies the source image a job runs on (volume, voxels, geometry)."""
    voxels = volume_node.GetImageData() if volume_node is not None else None
    return (volume_node.GetID() if volume_node is not None else None, image.GetMTime(),
            voxels.GetMTime() if voxels is not None else 0, tuple(image.GetExtent()))


def segment_state(segmentation_node, segment_id):
    """The segment's binary labelmap as (object, modification time): any change to the segment (a
    write, an undo, which restores copies) changes it."""
    segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
    segment = segmentation.GetSegment(segment_id) if segmentation is not None and segment_id else None
    if segment is None:
        return None
    representation = segment.GetRepresentation(segmentation.GetSourceRepresentationName())
    if representation is None:
        return ("empty", segment.GetMTime())
    return (representation.GetAddressAsString("vtkObject"), representation.GetMTime())


def describe_error(exc) -> str:
    try:
        from medsam_slicer.errors import MedSAMError

        if isinstance(exc, MedSAMError):
            return str(exc)
    except ImportError:
        pass
    if isinstance(exc, ImportError):
        return f"A Python package is missing ({exc}): install it from the MedSAM Slicer module."
    if isinstance(exc, jobs.StaleImageError):
        return str(exc)
    return f"MedSAM failed: {type(exc).__name__}: {exc}"


_RUNNERS: "weakref.WeakSet[ActionRunner]" = weakref.WeakSet()


def first_aligned_view(views, grid):
    """The first of `views` ((view, slice node) pairs, e.g. the layout's visible slice views) whose
    plane follows the volume's axes and cuts it, or None. For requests made without a view."""
    for view, slice_node in views:
        if slice_node is None:
            continue
        try:
            geometry.view_axis_and_slice(slice_node, grid)
        except ValueError:
            continue
        return view, slice_node
    return None


def shutdown_all(timeout: float = 5.0) -> bool:
    """At application exit: stop every runner's action, end the shared worker's thread, then close
    the sessions (their background threads). True when the worker thread ended in time."""
    runners = list(_RUNNERS)
    for runner in runners:
        runner.stop("MedSAM stopped: Slicer is closing.", error=False)
    ended = worker.stop_shared(timeout)
    if ended:  # the worker no longer uses the sessions
        for runner in runners:
            runner.holder.close()
    return ended


class ActionRunner:
    """The effect's state: at most one running action, its job, the key slices and the preview."""

    def __init__(self, host, inference_worker: Optional[worker.InferenceWorker] = None):
        _RUNNERS.add(self)
        self.host = host
        self._worker = inference_worker
        self.holder = jobs.SessionHolder()
        self.action: Optional[Action] = None
        self.session_key = None  # the image and settings the holder has a session for (main thread's view)
        self.last_seed = None  # (axis, index, box) of the last box written
        self.key_boxes: Dict[str, Dict[int, tuple]] = {}  # axis -> {index: box}
        self.preview = None  # (action, mask) shown, not written
        self.rule_overrides: Dict[str, object] = {}  # StopRules fields (the self-test relaxes them)

    @property
    def worker(self) -> worker.InferenceWorker:
        return self._worker if self._worker is not None else worker.shared_worker()

    @property
    def busy(self) -> bool:
        """An action is running (the effect polls only then)."""
        return self.action is not None

    # ------------------------------------------------------------------ context

    def status(self, text: str, error: bool = False) -> None:
        self.host.status(text, error)
        if error:
            logging.warning("MedSAM: %s", text)

    def target(self):
        """(segmentation node, selected segment id) of the editor now."""
        node = self.host.editor_node()
        if node is None:
            return None, None
        return node.GetSegmentationNode(), node.GetSelectedSegmentID()

    def source_volume_node(self):
        node = self.host.editor_node()
        return node.GetSourceVolumeNode() if node is not None else None

    def grid(self, image):
        segmentation_node, _ = self.target()
        return geometry.grid_of(image, geometry.image_to_world(image, segmentation_node))

    def source_image(self, tell: bool = True):
        image = self.host.source_image()
        if image is None and tell:
            self.status("Select a source volume first.", error=True)
        return image

    def ready(self) -> bool:
        """Dependencies present and no action running; else False with a message."""
        if self.busy:
            self.status("MedSAM is busy: wait, or press c (or Cancel) to stop it.")
            return False
        provider = self.host.provider()
        mode = getattr(getattr(provider, "settings", None), "mode", "local")
        missing = engines.missing_modules(mode)
        if missing:
            self.status("Missing Python packages ({}): install them from the MedSAM Slicer module.".format(
                ", ".join(missing)), error=True)
            return False
        segmentation_node, segment_id = self.target()
        if segmentation_node is None or not segment_id:
            self.status("Select a segment first.", error=True)
            return False
        return True

    def current_slice(self, slice_node):
        """(axis, index, grid) that a slice view shows, or None after telling the user why not."""
        if slice_node is None:
            self.status("No slice view to work in: click in a slice view first.", error=True)
            return None
        image = self.source_image()
        if image is None:
            return None
        try:
            grid = self.grid(image)
            axis, index = geometry.view_axis_and_slice(slice_node, grid)
        except ValueError as exc:  # oblique view, a plane off the volume, a non-linear transform
            self.status(str(exc), error=True)
            return None
        return axis, index, grid

    def segment_slices(self, axis, indices=None):
        """{index: bool mask} of the selected segment (indices None: its non-empty slices)."""
        segmentation_node, segment_id = self.target()
        return writing.segment_slices(segmentation_node, segment_id, self.host.source_image(), axis, indices)

    def protected_area(self):
        """Where the editor's editable area lets nothing be written (growth stops there), or None
        (also where Slicer cannot compute it: the editor then masks the writes as ever)."""
        try:
            return writing.protected_area(self.host.editor_node(), self.host.source_image())
        except ValueError as exc:
            logging.warning("MedSAM: %s; growth will not stop at protected segments", exc)
            return None

    # ------------------------------------------------------------------ requests

    def draw_box(self, slice_node, xy0, xy1, preview: bool = False, key_slice: bool = False, view=None):
        """A box dragged from display point xy0 to xy1 in a slice view: segment that slice."""
        if abs(xy1[0] - xy0[0]) < 2 or abs(xy1[1] - xy0[1]) < 2:
            self.status("Drag a box around the structure (the box was too small).")
            return None
        if not self.ready():
            return None
        image = self.source_image()
        if image is None:
            return None
        try:
            axis, index, box = geometry.xy_box_to_ijk_box(slice_node, xy0, xy1, self.grid(image))
        except ValueError as exc:  # ObliqueViewError, OutsideVolumeError
            self.status(str(exc), error=True)
            return None
        if key_slice and not preview:
            self.key_boxes.setdefault(axis, {})[index] = box
        action = Action("slice", axis, f"segmenting slice {index}", index=index, box=box, preview=preview, view=view)
        return self.submit(jobs.slice_job, action, axis, index, box)

    def propagate(self, slice_node, direction: str, max_slices: int = 0):
        """Grow the segment from the slice the view shows; direction "up" / "down" as the view's
        slice moves forward / back, or "both"."""
        if not self.ready():
            return None
        current = self.current_slice(slice_node)
        if current is None:
            return None
        axis, index, grid = current
        seed_mask = self.segment_slices(axis, [index])[index]
        seed_box = None
        if not seed_mask.any():
            if self.last_seed and self.last_seed[:2] == (axis, index):
                seed_mask, seed_box = None, self.last_seed[2]
            else:
                self.status(f"Slice {index} of the selected segment is empty: draw a box on it first.", error=True)
                return None
        if direction != "both" and geometry.index_direction_of_view_up(slice_node, grid, axis) < 0:
            direction = "down" if direction == "up" else "up"
        action = Action("propagate", axis, f"propagating from slice {index}")
        return self.submit(jobs.volume_job, action, "propagate", axis, (index, seed_box, seed_mask, direction),
                           max_slices, dict(self.rule_overrides), self.protected_area())

    def repropagate(self, slice_node, max_slices: int = 0):
        """After a slice was corrected by hand: recompute the slices beyond it, away from the seed."""
        if not self.ready():
            return None
        current = self.current_slice(slice_node)
        if current is None:
            return None
        axis, index, _ = current
        masks = self.segment_slices(axis)
        corrected = masks.get(index)
        if corrected is None:
            self.status(f"Correct slice {index} first (it is empty).", error=True)
            return None
        seed = self.last_seed[1] if self.last_seed and self.last_seed[0] == axis else index
        action = Action("repropagate", axis, f"re-propagating from slice {index}")
        return self.submit(jobs.volume_job, action, "repropagate", axis, (masks, index, corrected, seed), max_slices,
                           dict(self.rule_overrides), self.protected_area())

    def interpolate(self, slice_node):
        """Every slice between the key slices of the view's axis."""
        if not self.ready():
            return None
        current = self.current_slice(slice_node)
        if current is None:
            return None
        axis = current[0]
        keys = dict(self.key_boxes.get(axis, {}))
        if len(keys) < 2:
            self.status("Turn on Key slices and draw boxes on at least two slices of this view first.", error=True)
            return None
        action = Action("keys", axis, f"interpolating {len(keys)} key slices")
        return self.submit(jobs.volume_job, action, "keys", axis, (keys,))

    def clear_key_slices(self) -> None:
        self.key_boxes = {}
        self.status("Key slices cleared.")

    def segment_in_roi(self, slice_node, roi_node):
        """Every slice inside a markups ROI, along the axis the view cuts."""
        if not self.ready():
            return None
        if roi_node is None:
            self.status("Select a markups ROI first.", error=True)
            return None
        current = self.current_slice(slice_node)
        if current is None:
            return None
        axis, _, grid = current
        try:
            lo, hi = geometry.ras_box_to_ijk_box3d(grid, *geometry.roi_ras_bounds(roi_node))
        except ValueError as exc:  # the ROI is off the volume, or the segmentation's transform is non-linear
            self.status(str(exc), error=True)
            return None
        xa, ya = geometry.IN_PLANE[axis]
        n = geometry.AXES.index(axis)
        action = Action("box3d", axis, "segmenting the ROI")
        return self.submit(jobs.volume_job, action, "box3d", axis, ((lo[xa], lo[ya], hi[xa], hi[ya]), lo[n], hi[n]))

    def submit(self, fn, action: Action, *args) -> Optional[Action]:
        """Runs fn(job, holder, provider, session key, volume, window spec, *args) on the worker for
        `action`, recording its target segment, source image and the segment's state now."""
        if self.busy:
            self.ready()
            return None
        image = self.source_image()
        if image is None:
            return None
        segmentation_node, segment_id = self.target()
        provider = self.host.provider()
        key = image_key(self.source_volume_node(), image)
        # The image goes to the worker only when the holder does not have it: the first job on an image,
        # new engine settings, or after a job that did not finish (it may not have opened the session).
        session_key = (key, provider.settings.key() if hasattr(provider, "settings") else id(provider))
        # the voxels (a copy) and their own spacing (geometry.grid_of without the segmentation's
        # transform: it never refuses, where a non-linear transform makes self.grid raise)
        volume = (jobs.SourceImage(writing.image_to_array(image), geometry.grid_of(image).spacing)
                  if session_key != self.session_key else None)
        action.segmentation_node, action.segment_id = segmentation_node, segment_id
        action.image, action.image_key, action.session_key = image, key, session_key
        action.segment_state = segment_state(segmentation_node, segment_id)
        # the automatic window is picked, and remembered, per structure: the segment the action writes into
        spec = jobs.for_structure(self.host.window_spec(), (
            segmentation_node.GetID() if segmentation_node is not None else None, segment_id))
        action.job = self.worker.submit(fn, self.holder, provider, session_key, volume, spec, *args, tag=action.kind)
        self.session_key = session_key
        self.action = action
        self.host.progress(None if action.kind == "slice" else 0)
        loading = "" if getattr(provider, "loaded", True) else " (loading the model first: this can take a while)"
        self.status(f"MedSAM: {action.label}...{loading}")
        return action

    # ------------------------------------------------------------------ stopping

    def cancel(self) -> bool:
        """The user's Cancel: the job stops at its next slice; what it finished is post-processed and
        kept (one Ctrl+Z removes it). False when nothing runs."""
        if self.action is None:
            return False
        self.action.job.cancel()
        self.status("Cancelling... (slices already written are kept; Ctrl+Z removes them all)")
        return True

    def stop(self, message: str, error: bool = True) -> None:
        """Ends the running action now: the job is cancelled on the worker, nothing more is written."""
        action = self.action
        if action is None:
            return
        action.job.cancel()
        self._end(reset_session=True)
        self.status(message, error=error)

    def source_changed(self) -> None:
        """The editor's source volume changed: stop what runs on the old one; key slices and the
        preview belong to the old volume."""
        self.stop("The source volume changed: MedSAM stopped; slices already written are kept.")
        self.session_key = None
        self.key_boxes = {}
        self.preview = None

    # ------------------------------------------------------------------ results (main thread)

    def poll(self) -> bool:
        """Applies the running job's events; True while an action runs (keep polling)."""
        action = self.action
        if action is None:
            return False
        pending = {}
        for kind, payload in action.job.poll():
            if self.action is not action:
                break
            try:
                if kind == worker.PROGRESS:
                    if payload[0] == jobs.STATUS:
                        self.status(f"MedSAM: {payload[1]}")
                        continue
                    _, index, mask, done, total = payload
                    pending[index] = mask
                    self.host.progress(int(100 * done / max(total, 1)))
                    self.status(f"MedSAM: {action.label} ({done}/{total})")
                    continue
                if pending:
                    self._write(pending)
                    pending = {}
                if kind == worker.DONE:
                    self._finish(payload)
                elif kind == worker.ERROR:
                    exc, tb = payload
                    if tb:
                        logging.error("MedSAM failed:\n%s", tb)
                    self.stop(describe_error(exc))
                else:  # cancelled before it ran
                    self.stop("Cancelled.", error=False)
            except ActionStopped as exc:
                self.stop(str(exc))
            except Exception as exc:  # writing failed: report, keep Slicer going
                logging.exception("MedSAM: applying the result failed")
                self.stop(f"Writing the result failed: {exc}")
            pending = {}
        if pending and self.action is action:
            try:
                self._write(pending)
            except ActionStopped as exc:
                self.stop(str(exc))
            except Exception as exc:
                logging.exception("MedSAM: writing slices failed")
                self.stop(f"Writing the result failed: {exc}")
        return self.action is not None

    def _check(self, action: Action):
        """The source image to write onto, after checking the action may still write."""
        segmentation_node, segment_id = self.target()
        if segmentation_node is not action.segmentation_node or segment_id != action.segment_id:
            raise ActionStopped("The selected segment changed while MedSAM was running: it stopped, and wrote "
                                "nothing more (Ctrl+Z removes what it wrote).")
        if segment_state(segmentation_node, segment_id) != action.segment_state:
            raise ActionStopped("The segment was changed (undo?) while MedSAM was running: it stopped, and "
                                "wrote nothing more.")
        image = self.host.source_image()
        if image is None or image_key(self.source_volume_node(), image) != action.image_key:
            raise ActionStopped("The source volume or the segmentation's geometry changed while MedSAM was "
                                "running: it stopped, and wrote nothing more.")
        return image

    def _write(self, masks, regions=None) -> None:
        action = self.action
        image = self._check(action)
        if not action.undo_saved:
            self.host.save_state_for_undo()  # once per action: one Ctrl+Z undoes it all
            action.undo_saved = True
        modify = self.host.modifier(action.segmentation_node, action.segment_id)
        writing.write_slices(modify, image, masks, action.axis, regions=regions)
        action.written.update(masks)
        action.segment_state = segment_state(action.segmentation_node, action.segment_id)

    def _finish(self, result) -> None:
        action = self.action
        if action.kind == "slice":
            self._finish_slice(action, result)
        else:
            self._finish_volume(action, result)
        self._end(reset_session=False)

    def _finish_slice(self, action: Action, result) -> None:
        index = action.index
        if result.get("cancelled"):
            self.status("Cancelled.")
            return
        mask, score = result["masks"][index], result["score"]
        score_text = f"score {score:.2f}" if score is not None else "no score"
        if action.preview:
            self.preview = (action, mask)
            show = getattr(self.host, "show_preview", None)
            if callable(show):
                show(action, mask)
            self.status(f"Preview of slice {index} ({score_text}): Enter writes it, c discards it.")
            return
        if not mask.any():
            # nothing to write, and an empty answer must not erase what the slice holds
            self.status(f"MedSAM found nothing in the box on slice {index}; the slice is unchanged.")
            return
        self._write_redraw(action.axis, index, action.box, mask)
        self.last_seed = (action.axis, index, action.box)
        from . import intensity

        window = intensity.describe(result["window"], result.get("window_note"))
        self.status(f"Slice {index} segmented ({score_text}, window {window}). Propagate with u / j / p.")

    def _write_redraw(self, axis, index, box, mask) -> None:
        """A box drawn again on a slice replaces what the box touches; other pieces on the slice stay."""
        image = self._check(self.action)
        segmentation_node, segment_id = self.action.segmentation_node, self.action.segment_id
        old = writing.segment_slices(segmentation_node, segment_id, image, axis, [index])[index]
        self._write({index: mask}, regions={index: writing.redraw_region(old, box, mask)})

    def _finish_volume(self, action: Action, result) -> None:
        # Slices streamed during the run are raw; the final result is post-processed in 3D (components
        # anchored to the seed) and may drop slices: rewrite what differs, clear what was dropped.
        import numpy as np

        masks = result["masks"]
        written = action.written
        fix = {i: m for i, m in masks.items() if i not in written or not np.array_equal(written[i], m)}
        for i, m in written.items():
            if i not in masks:
                fix[i] = np.zeros_like(m)
        if fix:
            self._write(fix)
        reasons = ", ".join("{}: {}".format(*kv) for kv in result.get("stop_reasons", {}).items())
        done = "cancelled, kept" if result.get("cancelled") else "done:"
        window = ""
        if result.get("window_note") and result.get("window") is not None:
            from . import intensity

            window = "; window " + intensity.describe(result["window"], result["window_note"])
        self.status("MedSAM {} {} slices{}{}.".format(done, len(masks), (" (" + reasons + ")") if reasons else "",
                                                      window))

    def _end(self, reset_session: bool) -> None:
        self.action = None
        if reset_session:
            # the job may not have opened a session for this image: send the image with the next job
            self.session_key = None
        self.host.progress(None)

    # ------------------------------------------------------------------ preview

    def accept_preview(self) -> bool:
        """Writes the preview into the selected segment as one undoable action; False if there is none."""
        if self.preview is None:
            return False
        if self.busy:
            self.ready()
            return True
        action, mask = self.preview
        image = self.source_image()
        if image is None or image_key(self.source_volume_node(), image) != action.image_key:
            self.preview = None
            self.status("The source volume changed since the preview: draw the box again.", error=True)
            return True
        segmentation_node, segment_id = self.target()
        if segmentation_node is None or not segment_id:
            self.status("Select a segment first.", error=True)
            return True
        self.preview = None
        if not mask.any():
            self.status(f"The preview of slice {action.index} is empty: nothing written.")
            return True
        write = Action("slice", action.axis, f"writing the preview of slice {action.index}", index=action.index,
                       box=action.box)
        write.segmentation_node, write.segment_id = segmentation_node, segment_id
        write.image, write.image_key = image, action.image_key
        write.segment_state = segment_state(segmentation_node, segment_id)
        self.action = write
        try:
            self._write_redraw(action.axis, action.index, action.box, mask)
            self.last_seed = (action.axis, action.index, action.box)
            self.status(f"Preview written to slice {action.index}.")
        except Exception as exc:  # a key press must not raise into the view's event handling
            logging.exception("MedSAM: writing the preview failed")
            self.status(f"Writing the preview failed: {exc}", error=True)
        finally:
            self.action = None
        return True

    def discard_preview(self) -> bool:
        if self.preview is None:
            return False
        self.preview = None
        self.status("Preview discarded.")
        return True
