"""Propagation: the four modes, stop rules, post-processing, progress and cancel.

Oracle predictors (Testing/oracles.py) answer with a known mask cut to the box: the real CT
sample's expert segmentation and synthetic shapes. Scripted predictors (a model that ignores its
box and returns given masks and scores) trigger the rules an oracle cannot. One test runs the real
SlicePredictor with the tiny random engine.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from medsam_slicer.errors import InputError
from medsam_slicer.propagation import (
    DRIFT_SCORE_LEAD,
    PropagationResult,
    box_with_margin,
    default_margin,
    interpolate_box,
    propagate_from_slice,
    repropagate,
    segment_box3d,
    segment_key_slices,
)
from medsam_slicer.slicing import get_slice, mask_bbox, slice_count
from medsam_slicer.stop_rules import Appearance, StopRules
from oracles import Oracle, degraded_oracle, expert_segments, sphere, splitting_tube, tilted_ellipsoid

NO_RULES = StopRules(min_area=1, max_area_ratio=1e9, check_centroid=False)


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def extent(truth, axis="k"):
    present = [i for i in range(slice_count(truth.shape, axis)) if get_slice(truth, axis, i).any()]
    return present[0], present[-1]


def assert_no_repeat(oracle):
    assert len(set(oracle.requests)) == len(oracle.requests), "a (slice, box) was asked twice"


class Scripted:
    """A model that ignores its box: returns the given mask (and score) for each slice."""

    def __init__(self, masks, shape, n_slices, scores=None):
        self.masks, self.shape, self.n_slices, self.scores = masks, shape, n_slices, scores or {}
        self.slice_shape = shape
        self.calls = []

    def __call__(self, index, box):
        self.calls.append((index, tuple(box)))
        mask = self.masks.get(index)
        return (np.zeros(self.shape, bool) if mask is None else mask.copy()), self.scores.get(index, 0.9)


def disc(shape, cy, cx, r):
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


@pytest.fixture(scope="module")
def segments():
    return expert_segments()


# ---------------------------------------------------------------------------------------------
# geometry helpers


def test_box_with_margin_clips_and_converts_margin():
    assert default_margin((128, 128)) == (2, 2)  # 1.25 px rounds up
    assert default_margin((512, 512)) == (5, 5)
    assert default_margin((1024, 1024)) == (10, 10)
    assert default_margin((512, 256)) == (3, 5)  # (x, y): 2.5 px rounds up on the 256-wide axis
    assert default_margin((16, 16)) == (1, 1)
    mask = np.zeros((20, 30), bool)
    mask[0:4, 25:30] = True
    assert box_with_margin(mask, 3, (20, 30)) == (22, 0, 29, 6)
    assert box_with_margin((5, 6, 7, 8), (2, 1), (20, 30)) == (3, 5, 9, 9)
    assert box_with_margin(np.zeros((20, 30), bool), 3, (20, 30)) is None
    assert interpolate_box((0, 0, 10, 10), (10, 20, 30, 40), 0.5) == (5, 10, 20, 25)
    with pytest.raises(InputError):
        box_with_margin((1, 2, 3, 4), -1, (20, 30))


# ---------------------------------------------------------------------------------------------
# mode a on the real CT sample


@pytest.mark.parametrize("name", ["right lung", "left lung", "thoracic vertebral column", "lumbar vertebral column"])
def test_mode_a_exact_oracle_reaches_targets_on_ct(segments, name):
    truth = segments[name]
    first, last = extent(truth)
    seed = (first + last) // 2
    oracle = Oracle(truth)
    result = propagate_from_slice(oracle, seed, seed_box=mask_bbox(truth[seed]))
    assert dice(result.volume("k", truth.shape), truth) >= 0.95
    assert abs(min(result.masks) - first) <= 1 and abs(max(result.masks) - last) <= 1
    assert set(result.stop_reasons) == {"up", "down"} and not result.cancelled
    assert max(oracle.calls.values()) == 1
    assert oracle.prefetched and oracle.prefetched[0] == seed


def test_mode_a_lung_reaches_volume_edge(segments):
    truth = segments["right lung"]  # runs to the last slice (33)
    result = propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]))
    assert result.stop_reasons["up"] == "volume edge"
    assert max(result.masks) == truth.shape[0] - 1


@pytest.mark.parametrize("kind", ["dilated", "eroded", "dropped", "noisy"])
def test_degraded_oracles_never_overshoot_by_more_than_two(segments, kind):
    for name in ("right lung", "left lung", "lumbar vertebral column", "thoracic vertebral column"):
        truth = segments[name]
        first, last = extent(truth)
        seed = (first + last) // 2
        oracle = degraded_oracle(truth, kind, seed=3, protect=[seed])
        result = propagate_from_slice(oracle, seed, seed_box=mask_bbox(truth[seed]))
        assert result.masks, name
        assert min(result.masks) >= first - 2 and max(result.masks) <= last + 2, (name, kind)


# ---------------------------------------------------------------------------------------------
# directions and axes


def test_directions_up_and_down_only():
    truth = sphere()
    first, last = extent(truth)
    up = propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]), direction="up")
    down = propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]), direction="down")
    assert list(up.stop_reasons) == ["up"] and list(down.stop_reasons) == ["down"]
    assert min(up.masks) == 20 and max(up.masks) >= last - 1
    assert max(down.masks) == 20 and min(down.masks) <= first + 1
    with pytest.raises(InputError):
        propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]), direction="sideways")


@pytest.mark.parametrize("axis", ["i", "j", "k"])
def test_every_axis(axis):
    truth = tilted_ellipsoid(shape=(36, 44, 52))  # distinct sizes so a wrong axis cannot fit
    first, last = extent(truth, axis)
    seed = (first + last) // 2
    oracle = Oracle(truth, axis)
    box = mask_bbox(get_slice(truth, axis, seed))
    result = propagate_from_slice(oracle, seed, seed_box=box)
    volume = result.volume(axis, truth.shape)
    assert dice(volume, truth) >= 0.95
    assert abs(min(result.masks) - first) <= 1 and abs(max(result.masks) - last) <= 1
    assert_no_repeat(oracle)


# ---------------------------------------------------------------------------------------------
# stop rules, one by one


def test_stop_empty_mask_and_near_empty():
    truth = sphere()  # slice areas 1, 69, 137, ... 137, 69, 1 px from k 8 to k 32
    first, last = extent(truth)
    rules = StopRules(min_area=1, max_area_ratio=1e9)
    result = propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]), rules=rules)
    assert result.stop_reasons == {"up": f"empty mask at slice {last + 1}", "down": f"empty mask at slice {first - 1}"}
    assert (min(result.masks), max(result.masks)) == (first, last)
    # a 5 px minimum drops the 1 px poles
    rules = StopRules(min_area=5, max_area_ratio=1e9)
    result = propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]), rules=rules)
    assert result.stop_reasons == {"up": f"near-empty mask (1 px) at slice {last}", "down": f"near-empty mask (1 px) at slice {first}"}
    assert (min(result.masks), max(result.masks)) == (first + 1, last - 1)
    # with the default ratio the pole is a collapse (÷69): kept, and growth stops there
    result = propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]), rules=StopRules(min_area=1))
    assert result.stop_reasons["up"] == f"area collapse ÷69.0 at slice {last}"
    assert max(result.masks) == last


def test_stop_area_jump_drops_the_slice():
    shape = (40, 40)
    masks = {i: disc(shape, 20, 20, 5) for i in range(10)}
    masks[6] = disc(shape, 20, 20, 14)  # a leak: 9x the area
    pred = Scripted(masks, shape, 10)
    result = propagate_from_slice(pred, 3, seed_box=(15, 15, 25, 25), direction="up")
    assert result.stop_reasons["up"].startswith("area jump ×") and result.stop_reasons["up"].endswith("at slice 6")
    assert sorted(result.masks) == [3, 4, 5]


def test_stop_area_collapse_keeps_the_slice():
    shape = (40, 40)
    masks = {i: disc(shape, 20, 20, 10) for i in range(10)}
    masks[2] = disc(shape, 20, 20, 3)  # 317 -> 29 px: ÷10.9
    pred = Scripted(masks, shape, 10)
    result = propagate_from_slice(pred, 5, seed_box=(10, 10, 30, 30), direction="down")
    assert result.stop_reasons["down"] == "area collapse ÷10.9 at slice 2"
    assert sorted(result.masks) == [2, 3, 4, 5]
    relaxed = propagate_from_slice(pred, 5, seed_box=(10, 10, 30, 30), direction="down", rules=StopRules(max_area_ratio=20))
    assert relaxed.stop_reasons["down"] == "volume edge"


def test_stop_centroid_left_previous_box():
    shape = (60, 60)
    masks = {i: disc(shape, 15, 15, 6) for i in range(8)}
    masks[5] = disc(shape, 45, 45, 6)  # same size, another place
    pred = Scripted(masks, shape, 8)
    result = propagate_from_slice(pred, 2, seed_box=(9, 9, 21, 21), direction="up")
    assert result.stop_reasons["up"] == "left previous box at slice 5"
    assert sorted(result.masks) == [2, 3, 4]
    off = propagate_from_slice(
        pred, 2, seed_box=(9, 9, 21, 21), direction="up", rules=StopRules(check_centroid=False), keep_largest=False
    )
    assert off.stop_reasons["up"] == "volume edge"


def test_stop_low_score():
    shape = (40, 40)
    masks = {i: disc(shape, 20, 20, 6) for i in range(10)}
    scores = {i: 0.9 for i in range(10)}
    scores[7] = 0.31
    pred = Scripted(masks, shape, 10, scores)
    pred.score_ranks_quality = True  # as LiteMedSAM's predictor says (its score was measured)
    result = propagate_from_slice(pred, 4, seed_box=(14, 14, 26, 26), rules=StopRules(min_score=0.5))
    assert result.stop_reasons == {"up": "low score 0.31 at slice 7", "down": "volume edge"}
    assert sorted(result.masks) == list(range(0, 7))
    # by default a score under 0.7 of the seed's stops (the slice is dropped); an absolute floor is off
    result = propagate_from_slice(pred, 4, seed_box=(14, 14, 26, 26))
    assert result.stop_reasons["up"] == "score fell to 0.34 of the seed's at slice 7" and max(result.masks) == 6
    rules = StopRules(min_score_ratio=None)
    assert propagate_from_slice(pred, 4, seed_box=(14, 14, 26, 26), rules=rules).stop_reasons["up"] == "volume edge"
    # a model whose score was never measured against the truth gets no say (nor one that does not tell)
    pred.score_ranks_quality = False
    assert propagate_from_slice(pred, 4, seed_box=(14, 14, 26, 26)).stop_reasons["up"] == "volume edge"
    del pred.score_ranks_quality
    assert propagate_from_slice(pred, 4, seed_box=(14, 14, 26, 26)).stop_reasons["up"] == "volume edge"
    # a seed given as a mask has no score to compare with
    pred.score_ranks_quality = True
    seeded = propagate_from_slice(pred, 4, seed_mask=masks[4])
    assert seeded.stop_reasons["up"] == "volume edge"


def test_stop_volume_edge_and_max_slices():
    truth = np.zeros((12, 32, 32), bool)
    truth[:, 10:20, 8:22] = True  # touches both ends of the volume
    result = propagate_from_slice(Oracle(truth), 5, seed_box=(8, 10, 21, 19))
    assert result.stop_reasons == {"up": "volume edge", "down": "volume edge"}
    assert sorted(result.masks) == list(range(12))
    assert np.array_equal(result.volume("k", truth.shape), truth)
    limited = propagate_from_slice(Oracle(truth), 5, seed_box=(8, 10, 21, 19), rules=StopRules(max_slices=3))
    assert limited.stop_reasons == {"up": "max slices", "down": "max slices"}
    assert sorted(limited.masks) == list(range(2, 9))


# ---------------------------------------------------------------------------------------------
# seeds, edges, one-slice volumes


def test_seed_mask_is_used_as_is_and_empty_seed_is_an_error():
    truth = sphere()
    oracle = Oracle(truth)
    result = propagate_from_slice(oracle, 20, seed_mask=truth[20])
    assert 20 not in oracle.calls  # the user's mask is not re-predicted
    assert np.array_equal(result.masks[20], truth[20])
    with pytest.raises(InputError, match="empty"):
        propagate_from_slice(oracle, 20, seed_mask=np.zeros(truth.shape[1:], bool))
    with pytest.raises(InputError):
        propagate_from_slice(oracle, 20)
    with pytest.raises(InputError):
        propagate_from_slice(oracle, 20, seed_mask=np.ones((3, 3), bool))
    with pytest.raises(InputError):
        propagate_from_slice(oracle, 99, seed_box=(1, 1, 5, 5))
    # a box on empty background: an empty result that says why
    empty = propagate_from_slice(oracle, 20, seed_box=(0, 0, 4, 4))
    assert empty.masks == {} and empty.stop_reasons == {"up": "empty mask at slice 20", "down": "empty mask at slice 20"}


def test_one_slice_volume():
    truth = np.zeros((1, 24, 24), bool)
    truth[0, 5:15, 6:12] = True
    result = propagate_from_slice(Oracle(truth), 0, seed_box=(6, 5, 11, 14))
    assert sorted(result.masks) == [0]
    assert result.stop_reasons == {"up": "volume edge", "down": "volume edge"}
    box = segment_box3d(Oracle(truth), (6, 5, 11, 14), 0, 0)
    assert sorted(box.masks) == [0] and np.array_equal(box.volume("k", truth.shape), truth)


def test_box_touching_the_image_edge():
    truth = np.zeros((16, 40, 40), bool)
    for k in range(2, 14):
        truth[k, 0 : 12 + k % 2, 30:40] = True  # touches the top and right borders
    oracle = Oracle(truth)  # asserts every requested box lies inside the image
    result = propagate_from_slice(oracle, 8, seed_box=(30, 0, 39, 13))
    assert np.array_equal(result.volume("k", truth.shape), truth)
    assert all(box[2] == 39 and box[1] == 0 for _, box in oracle.requests)
    with pytest.raises(InputError, match="outside"):
        propagate_from_slice(oracle, 8, seed_box=(30, 0, 40, 13))


# ---------------------------------------------------------------------------------------------
# post-processing


def test_keep_largest_removes_detached_pieces_but_never_the_seeds():
    truth = np.zeros((20, 40, 40), bool)
    truth[2:18, 10:20, 10:20] = True  # the structure
    truth[12:15, 21:23, 10:12] = True  # a detached piece 1 px away, caught by the box margin
    oracle_result = propagate_from_slice(Oracle(truth), 5, seed_box=(10, 10, 19, 19), margin=3)
    vol = oracle_result.volume("k", truth.shape)
    assert not vol[12:15, 21:23, 10:12].any()
    assert vol[2:18, 10:20, 10:20].all()
    loose = propagate_from_slice(Oracle(truth), 5, seed_box=(10, 10, 19, 19), margin=3, keep_largest=False)
    assert loose.volume("k", truth.shape)[12:15, 21:23, 10:12].all()

    # the seed slice's small piece survives although a bigger detached one grows elsewhere
    shape = (60, 60)
    big = disc(shape, 40, 40, 12)
    masks = {i: big for i in range(11, 16)}
    seed_mask = disc(shape, 10, 10, 3)
    pred = Scripted(masks, shape, 16)
    rules = StopRules(check_centroid=False, max_area_ratio=100.0)
    result = propagate_from_slice(pred, 10, seed_mask=seed_mask, direction="up", rules=rules)
    assert np.array_equal(result.masks[10], seed_mask)
    assert all(np.array_equal(result.masks[i], big) for i in range(11, 16))


def test_fill_holes_option():
    truth = np.zeros((10, 40, 40), bool)
    for k in range(10):
        truth[k] = disc((40, 40), 20, 20, 10) & ~disc((40, 40), 20, 20, 4)
    plain = propagate_from_slice(Oracle(truth), 5, seed_box=(10, 10, 30, 30))
    filled = propagate_from_slice(Oracle(truth), 5, seed_box=(10, 10, 30, 30), fill_holes=True)
    assert not plain.masks[3][20, 20]
    assert all(m[20, 20] for m in filled.masks.values())
    assert all(np.array_equal(m, disc((40, 40), 20, 20, 10)) for m in filled.masks.values())


def test_post_processing_matches_scipy_on_real_ct_masks(ct_array):
    """Hole filling and the 26-connected components (SimpleITK) give scipy.ndimage's results on
    thresholded slabs of the CT sample: many pieces, holes, pockets joined only at corners."""
    from scipy import ndimage

    from medsam_slicer.postprocess import fill_holes_2d, keep_anchored_components

    checked = 0
    for low, high in ((-1000, -400), (-100, 100), (200, 3000)):
        slab = (ct_array[10:20] >= low) & (ct_array[10:20] < high)
        for k in range(0, slab.shape[0], 3):
            assert np.array_equal(fill_holes_2d(slab[k]), ndimage.binary_fill_holes(slab[k]))
        masks = {10 + k: slab[k] for k in range(slab.shape[0])}
        labels, count = ndimage.label(slab, structure=np.ones((3, 3, 3), dtype=bool))
        assert count > 1
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = np.isin(labels, [int(np.argmax(sizes))] + list(np.unique(labels[4])))  # slice 14 is an anchor
        kept = keep_anchored_components(masks, anchors=[14])
        assert all(np.array_equal(kept[10 + k], keep[k] & slab[k]) for k in range(slab.shape[0]))
        checked += count
    assert checked > 20


# ---------------------------------------------------------------------------------------------
# progress and cancel


def test_progress_in_order_with_done_and_total():
    truth = sphere()
    first, last = extent(truth)
    calls = []
    result = propagate_from_slice(
        Oracle(truth),
        20,
        seed_box=mask_bbox(truth[20]),
        rules=NO_RULES,
        progress=lambda i, m, d, t: calls.append((i, m.sum(), d, t)),
    )
    order = [c[0] for c in calls]
    assert order == [20] + list(range(21, last + 1)) + list(range(19, first - 1, -1))
    assert [c[2] for c in calls] == list(range(1, len(calls) + 1))
    totals = [c[3] for c in calls]
    assert all(t >= d for _, _, d, t in calls) and totals == sorted(totals, reverse=True)
    assert totals[0] == truth.shape[0]  # the open-ended estimate: every slice to both edges
    assert len(calls) == len(result.masks)

    box_calls = []
    segment_box3d(Oracle(truth), mask_bbox(truth[20]), 10, 30, progress=lambda i, m, d, t: box_calls.append((d, t)))
    assert box_calls == [(d, 21) for d in range(1, 22)]


@pytest.mark.parametrize("style", ["event", "callable"])
def test_cancel_returns_partial(style):
    truth = sphere()
    event = threading.Event()
    seen = []

    def progress(index, mask, done, total):
        seen.append(index)
        if done == 4:
            event.set()

    cancel = event if style == "event" else event.is_set
    result = propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]), progress=progress, cancel=cancel)
    assert result.cancelled
    assert sorted(result.masks) == [20, 21, 22, 23] == sorted(seen)
    assert result.stop_reasons == {"up": "cancelled", "down": "cancelled"}

    event.clear()
    box = segment_box3d(Oracle(truth), mask_bbox(truth[20]), 10, 30, progress=progress, cancel=cancel)
    assert box.cancelled and len(box.masks) == 4 and box.stop_reasons["up"] == "cancelled"


# ---------------------------------------------------------------------------------------------
# mode b


def test_mode_b_box3d_on_ct_lung(segments):
    truth = segments["left lung"]
    first, last = extent(truth)
    roi = mask_bbox(truth.any(axis=0))
    oracle = Oracle(truth)
    result = segment_box3d(oracle, roi, first, last)
    assert sorted(result.masks) == list(range(first, last + 1))
    assert dice(result.volume("k", truth.shape), truth) >= 0.97
    assert result.stop_reasons == {"up": "end of range", "down": "end of range"}
    assert oracle.requests[0] == ((first + last) // 2, roi)
    assert all(first <= i <= last for i, _ in oracle.requests)
    # the next box is the previous (clipped) mask's box plus the margin, not cut to the 3D box: it
    # reaches past the box where the lung touches it, by no more than the margin (2 px here)
    outside = [max(roi[0] - x0, roi[1] - y0, x1 - roi[2], y1 - roi[3]) for _, (x0, y0, x1, y1) in oracle.requests]
    assert 0 < max(outside) <= 2
    # each slice: the propagated box and, for drift, the extent; no (slice, box) is asked twice
    assert max(oracle.calls.values()) == 2 and len(set(oracle.requests)) == len(oracle.requests)
    assert {box for index, box in oracle.requests if oracle.calls[index] == 2} >= {roi}


class DriftingModel(Oracle):
    """An oracle that, prompted with anything but the 3D box's extent on slices past `drift_from`,
    answers a neighbour (the truth shifted sideways) with a lower score, as a real model that slid
    onto the next organ does; the extent prompt still finds the structure with a high score."""

    def __init__(self, truth, roi, drift_from: int):
        super().__init__(truth)
        self.roi, self.drift_from = tuple(roi), drift_from

    def __call__(self, index, box):
        mask, _ = super().__call__(index, box)
        if tuple(int(v) for v in box) == self.roi or index < self.drift_from:
            return mask, 0.95
        return np.roll(mask, 12, axis=1), 0.6


def test_mode_b_finds_its_way_back_when_the_extent_scores_clearly_higher():
    truth = sphere()
    first, last = extent(truth)
    roi = mask_bbox(truth.any(axis=0))
    drift_from = (first + last) // 2 + 2
    recovered = segment_box3d(DriftingModel(truth, roi, drift_from), roi, first, last, clip_to_box=False)
    followed = segment_box3d(DriftingModel(truth, roi, drift_from), roi, first, last, clip_to_box=False, recover=False)
    assert dice(recovered.volume("k", truth.shape), truth) >= 0.97
    assert dice(followed.volume("k", truth.shape), truth) < 0.9  # without recovery the drift stays


class EndInsideTheBox:
    """A structure (bright, 10 x 10 px) that ends inside its 3D box: on its last slice it is 3 x 3 px
    in a square region of the same tissue (`region_side` px). Prompted with the previous mask's box
    there the model answers a dark speck (unlike the start slice); prompted with the whole box, the
    bright region (like the start slice) with `extent_score`. As at the caudates' ends with real
    weights (LOOK_ALONE_EVIDENCE)."""

    def __init__(self, extent_score: float, region_side: int = 24):
        n, shape = 9, (40, 40)
        self.n_slices, self.slice_shape = n, shape
        self.img = np.full((n,) + shape, 100, np.uint8)
        self.truth = np.zeros((n,) + shape, bool)
        self.truth[:8, 15:25, 15:25] = True
        self.truth[8, 18:21, 18:21] = True
        self.region = np.zeros(shape, bool)
        lo = 20 - region_side // 2
        self.region[lo : lo + region_side, lo : lo + region_side] = True
        self.img[self.truth] = 200
        self.img[8][self.region] = 200
        self.img[8, 5:7, 5:7] = 30
        self.roi = (8, 8, 31, 31)
        self.extent_score = extent_score

    def image(self, index):
        return self.img[index]

    def __call__(self, index, box):
        whole = tuple(int(v) for v in box) == self.roi
        if index < 8:
            return self.truth[index].copy(), 0.9
        if whole:
            return self.region.copy(), self.extent_score
        speck = np.zeros(self.slice_shape, bool)
        speck[5:7, 5:7] = True
        return speck, 0.8


@pytest.mark.parametrize("region_side", [24, 14])
def test_mode_b_does_not_swap_on_a_change_of_look_alone(region_side):
    """LOOK_ALONE_EVIDENCE: the propagated mask no longer looking like the start slice's does not by
    itself swap in the extent's mask (5.8 or 2 times the previous slice's mask here); with the
    score's lead, the region still dwarfs the 4-px speck (EXTENT_LEAK_EVIDENCE)."""
    for extent_score in (0.8, 0.8 + DRIFT_SCORE_LEAD + 0.05):
        model = EndInsideTheBox(extent_score, region_side)
        result = segment_box3d(model, model.roi, 0, 8, keep_largest=False, clip_to_box=False)
        assert result.masks[8].sum() == 4  # kept the propagated speck, not the region
        assert dice(result.volume("k", model.truth.shape)[:8], model.truth[:8]) == 1.0


class Shrinking:
    """Mode b on a 16 x 16 square through 9 slices. Prompted with the whole 3D box the model finds
    the square (score 0.9 on the start slice, `extent_score` elsewhere) or, with `extent_side`, a
    square of that side; prompted with anything else it answers an 8 x 8 part of it (score 0.6):
    the propagated mask has shrunk and the extent's mask scores clearly higher."""

    def __init__(self, extent_side: int = 16, extent_score: float = 0.9):
        self.n_slices, self.slice_shape = 9, (48, 48)
        self.truth = np.zeros((9, 48, 48), bool)
        self.truth[:, 16:32, 16:32] = True
        self.roi = (16, 16, 31, 31)
        self.extent = np.zeros(self.slice_shape, bool)
        lo = 24 - extent_side // 2
        self.extent[lo : lo + extent_side, lo : lo + extent_side] = True
        self.extent_score = extent_score

    def __call__(self, index, box):
        if tuple(int(v) for v in box) == self.roi:
            return (self.truth[index].copy(), 0.9) if index == 4 else (self.extent.copy(), self.extent_score)
        part = np.zeros(self.slice_shape, bool)
        part[20:28, 20:28] = True
        return part, 0.6


def test_mode_b_swaps_on_the_scores_lead_unless_the_extent_dwarfs_the_propagated_mask():
    """A swap needs the score's lead (DRIFT_SCORE_LEAD) and an extent's mask at most
    DEFAULT_MAX_AREA_RATIO times the propagated one (EXTENT_LEAK_EVIDENCE): the 16-px square (4
    times the 8-px part) comes back; a 24-px region (9 times) is a leak and is not taken."""
    back = Shrinking()
    result = segment_box3d(back, back.roi, 0, 8, keep_largest=False, clip_to_box=False)
    assert dice(result.volume("k", back.truth.shape), back.truth) == 1.0
    level = Shrinking(extent_score=0.6 + DRIFT_SCORE_LEAD - 0.02)  # no clear lead: the part stays
    result = segment_box3d(level, level.roi, 0, 8, keep_largest=False, clip_to_box=False)
    assert all(result.masks[k].sum() == 64 for k in range(9) if k != 4)
    leak = Shrinking(extent_side=24)
    result = segment_box3d(leak, leak.roi, 0, 8, keep_largest=False, clip_to_box=False)
    assert all(result.masks[k].sum() == 64 for k in range(9) if k != 4)


class SureOfTheNeighbour:
    """Mode b on a square that fills its 3D box's middle; prompted with the whole box on any other
    slice, the model answers a larger region of other tissue with a higher score (`extent_score`),
    while the propagated prompt finds the square with `propagated_score`. The start slice (prompted
    with the whole box) finds the square with 0.8."""

    def __init__(self, propagated_score: float, extent_score: float = 0.95):
        self.n_slices, self.slice_shape = 9, (40, 40)
        self.truth = np.zeros((9, 40, 40), bool)
        self.truth[:, 12:28, 12:28] = True
        self.roi = (8, 8, 31, 31)
        self.scores = propagated_score, extent_score

    def __call__(self, index, box):
        if tuple(int(v) for v in box) != self.roi:
            return self.truth[index].copy(), self.scores[0]
        if index == 4:
            return self.truth[index].copy(), 0.8
        region = np.zeros(self.slice_shape, bool)
        region[8:32, 8:32] = True
        return region, self.scores[1]


def test_mode_b_swaps_only_when_the_propagated_mask_scores_under_the_start_slice():
    """DRIFT_SEED_EVIDENCE: the extent's lead in score calls for a swap only while the propagated
    mask scores under the start slice's mask; a mask the model is as sure of is no drift."""
    sure = SureOfTheNeighbour(propagated_score=0.82)  # the extent still leads by 0.13
    result = segment_box3d(sure, sure.roi, 0, 8, keep_largest=False)
    assert dice(result.volume("k", sure.truth.shape), sure.truth) == 1.0
    unsure = SureOfTheNeighbour(propagated_score=0.7)
    result = segment_box3d(unsure, unsure.roi, 0, 8, keep_largest=False)
    swapped = [k for k, mask in result.masks.items() if mask.sum() == 24 * 24]
    assert swapped == [k for k in range(9) if k != 4]


class SwapThenRegret:
    """Mode b on a square in the middle of its 3D box. On slice 5 the whole box's prompt answers a
    larger region of other tissue with 0.9, so the recovering chain swaps it in; every later prompt
    as wide as that region finds it again, scored 0.5. The plain chain, prompted with the square's
    own box, keeps the square at 0.7 (the start slice: 0.8)."""

    n_slices, slice_shape, roi = 9, (40, 40), (8, 8, 31, 31)

    def __init__(self):
        self.truth = np.zeros((9, 40, 40), bool)
        self.truth[:, 12:28, 12:28] = True
        self.region = np.zeros(self.slice_shape, bool)
        self.region[8:32, 8:32] = True

    def __call__(self, index, box):
        box = tuple(int(v) for v in box)
        if box == self.roi and index == 4:
            return self.truth[index].copy(), 0.8
        if box == self.roi and index == 5:
            return self.region.copy(), 0.9
        if box[0] <= 9:  # the whole box, or a box around the region
            return self.region.copy(), 0.5
        return self.truth[index].copy(), 0.7


def test_mode_b_keeps_the_plain_chain_where_the_model_is_surer_of_it():
    """CHAIN_CHOICE_EVIDENCE: beside the recovering chain each direction follows the plain
    propagation and keeps it where its mean score over the differing slices is higher; the
    replaced slices are reported again without counting twice."""
    model = SwapThenRegret()
    reports = []
    result = segment_box3d(model, model.roi, 0, 8, keep_largest=False,
                           progress=lambda index, mask, done, total: reports.append((index, int(mask.sum()), done, total)))
    assert dice(result.volume("k", model.truth.shape), model.truth) == 1.0
    assert [r[0] for r in reports[:5]] == [4, 5, 6, 7, 8]
    assert [r[1] for r in reports[1:5]] == [24 * 24] * 4  # the recovering chain, shown as it went
    assert reports[5:9] == [(k, 16 * 16, 5, 9) for k in (5, 6, 7, 8)]  # then replaced, not recounted
    assert [r[0] for r in reports[9:]] == [3, 2, 1, 0] and reports[-1][2:] == (9, 9)
    # without recovery the plain chain is all there is
    plain = segment_box3d(model, model.roi, 0, 8, keep_largest=False, recover=False)
    assert all(np.array_equal(plain.masks[k], result.masks[k]) for k in range(9))


def test_a_near_tie_between_the_chains_goes_to_the_plain_one():
    """CHAIN_TIE_EVIDENCE: the recovering chain must be surer by more than CHAIN_TIE to be kept."""
    from medsam_slicer.propagation import CHAIN_TIE, _Chain, _surer

    start = np.zeros((4, 4), bool)
    recovering, plain = _Chain(start), _Chain(start)
    for k in range(3):
        recovering.add(k, np.ones((4, 4), bool), 0.80)
        plain.add(k, start.copy(), 0.80 - CHAIN_TIE / 2)
    assert _surer(plain, recovering)  # within the tie: the plain chain
    plain.scores = {k: 0.80 - 2 * CHAIN_TIE for k in range(3)}
    assert not _surer(plain, recovering)  # a clear lead keeps the recovering chain
    plain.masks = dict(recovering.masks)
    assert not _surer(plain, recovering)  # no slice differs: nothing to change


def test_mode_b_empty_mask_falls_back_to_box_extent():
    truth = sphere()
    roi = mask_bbox(truth.any(axis=0))
    oracle = Oracle(truth, dropped=[23])
    result = segment_box3d(oracle, roi, 10, 30, start=20)
    assert sorted(result.masks) == list(range(10, 31))
    assert not result.masks[23].any()
    requested = {}
    for index, box in oracle.requests:
        requested.setdefault(index, box)  # the prompt a slice was asked with first
    assert requested[24] == roi and oracle.calls[24] == 1  # fallback after the empty slice
    assert requested[28] != roi and requested[12] != roi  # elsewhere: the previous mask + margin
    assert result.masks[25].sum() == truth[25].sum()
    assert dice(result.volume("k", truth.shape), truth) > 0.95
    # the mask is clipped to the box
    clipped = segment_box3d(Oracle(truth), (20, 20, 44, 30), 15, 25)
    assert not clipped.volume("k", truth.shape)[:, 31:, :].any()
    with pytest.raises(InputError):
        segment_box3d(Oracle(truth), roi, 10, 30, start=5)
    with pytest.raises(InputError):
        segment_box3d(Oracle(truth), roi, 30, 10)


# ---------------------------------------------------------------------------------------------
# mode c


def test_mode_c_key_slices_tilted_structure():
    truth = tilted_ellipsoid()
    first, last = extent(truth)
    keys = {k: mask_bbox(truth[k]) for k in range(first + 1, last, 6)}
    oracle = Oracle(truth)
    result = segment_key_slices(oracle, keys, combine="intersect")
    order = sorted(keys)
    assert sorted(result.masks) == list(range(order[0], order[-1] + 1))
    assert max(oracle.calls.values()) == 1
    assert all(dict(oracle.requests)[k] == box for k, box in keys.items())
    between = truth.copy()
    between[: order[0]] = False
    between[order[-1] + 1 :] = False
    assert dice(result.volume("k", truth.shape), between) >= 0.97
    # intersect mode: every in-between box lies inside the box interpolated from its two keys
    for index, (x0, y0, x1, y1) in oracle.requests:
        if index in keys:
            continue
        a = max(k for k in order if k < index)
        b = min(k for k in order if k > index)
        ix0, iy0, ix1, iy1 = interpolate_box(keys[a], keys[b], (index - a) / (b - a))
        assert ix0 <= x0 and iy0 <= y0 and x1 <= ix1 and y1 <= iy1


def test_mode_c_default_union_covers_the_interpolated_box():
    truth = sphere()  # convex: linear corners under-cover it near the poles
    first, last = extent(truth)
    keys = {k: mask_bbox(truth[k]) for k in (first, first + 6, 20, last - 6, last)}
    union_oracle, inter_oracle = Oracle(truth), Oracle(truth)
    union = segment_key_slices(union_oracle, keys)
    inter = segment_key_slices(inter_oracle, keys, combine="intersect")
    order = sorted(keys)
    for index, (x0, y0, x1, y1) in union_oracle.requests:
        if index in keys:
            continue
        a = max(k for k in order if k < index)
        b = min(k for k in order if k > index)
        ix0, iy0, ix1, iy1 = interpolate_box(keys[a], keys[b], (index - a) / (b - a))
        assert x0 <= ix0 and y0 <= iy0 and ix1 <= x1 and iy1 <= y1
    d_union = dice(union.volume("k", truth.shape), truth)
    assert d_union >= 0.97 and d_union > dice(inter.volume("k", truth.shape), truth) + 0.02


def test_mode_c_fills_each_gap_from_the_larger_key():
    truth = sphere()
    first = extent(truth)[0]  # a 1 px pole
    oracle = Oracle(truth)
    result = segment_key_slices(oracle, {first: mask_bbox(truth[first]), 20: mask_bbox(truth[20])})
    between = [i for i, _ in oracle.requests if first < i < 20]
    assert between == list(range(19, first, -1))  # from the equator down to the pole
    assert dice(result.volume("k", truth.shape)[first : 21], truth[first:21]) >= 0.99
    both = Oracle(truth)
    segment_key_slices(both, {first: mask_bbox(truth[first]), 20: mask_bbox(truth[20])}, gap_fill="both")
    assert [i for i, _ in both.requests if first < i < 20][:2] == [first + 1, 19]


def test_mode_c_split_structure_and_single_key():
    truth = splitting_tube()
    first, last = extent(truth)
    keys = {first: mask_bbox(truth[first]), 20: mask_bbox(truth[20]), last: mask_bbox(truth[last])}
    result = segment_key_slices(Oracle(truth), keys)
    assert dice(result.volume("k", truth.shape), truth) >= 0.95
    assert result.stop_reasons == {"up": "end of range", "down": "end of range"}
    single = segment_key_slices(Oracle(truth), {20: mask_bbox(truth[20])})
    assert sorted(single.masks) == [20]
    with pytest.raises(InputError):
        segment_key_slices(Oracle(truth), {})
    with pytest.raises(InputError):
        segment_key_slices(Oracle(truth), keys, combine="magic")


# ---------------------------------------------------------------------------------------------
# mode d


def test_repropagate_recomputes_only_beyond_the_corrected_slice():
    truth = sphere()
    first, last = extent(truth)
    # a first run with a degraded model stops early at both ends
    eroded = degraded_oracle(truth, "eroded")
    before = propagate_from_slice(eroded, 20, seed_box=mask_bbox(truth[20]))
    assert max(before.masks) < last
    fresh = Oracle(truth)
    corrected = 26
    seen = []
    after = repropagate(
        fresh, before, corrected, truth[corrected], seed_index=20, rules=NO_RULES, progress=lambda i, m, d, t: seen.append(i)
    )
    assert set(fresh.calls) == set(range(corrected + 1, last + 2))  # beyond only (last+1: the empty stop)
    assert max(fresh.calls.values()) == 1
    assert seen == list(range(corrected, last + 1))
    for index in before.masks:
        if index < corrected:
            assert np.array_equal(after.masks[index], before.masks[index])
    assert np.array_equal(after.masks[corrected], truth[corrected])
    assert max(after.masks) == last and after.stop_reasons["up"] == f"empty mask at slice {last + 1}"
    assert after.stop_reasons["down"] == "unchanged" and not after.cancelled

    # correcting below the seed recomputes downward only
    fresh = Oracle(truth)
    down = repropagate(fresh, after, 15, truth[15], seed_index=20, rules=NO_RULES)
    assert set(fresh.calls) == set(range(first - 1, 15))
    assert min(down.masks) == first and down.stop_reasons["up"] == "unchanged"
    assert all(np.array_equal(down.masks[i], after.masks[i]) for i in after.masks if i > 15)


def test_repropagate_with_empty_correction_cuts_there():
    truth = sphere()
    before = propagate_from_slice(Oracle(truth), 20, seed_box=mask_bbox(truth[20]))
    fresh = Oracle(truth)
    after = repropagate(fresh, before.masks, 27, np.zeros(truth.shape[1:], bool), seed_index=20)
    assert not fresh.requests
    assert max(after.masks) == 26 and min(after.masks) == min(before.masks)
    assert after.stop_reasons["up"] == "empty mask at slice 27"


# ---------------------------------------------------------------------------------------------
# the real SlicePredictor


def test_real_slice_predictor_plugs_in_and_never_encodes_twice(tiny_engine, ct_array):
    from medsam_slicer.predictor import SlicePredictor
    from medsam_slicer.windowing import from_width_level

    volume = ct_array[14:18]  # 4 slices: the tiny encoder still runs at 1024 x 1024 on the CPU
    predictor = SlicePredictor(tiny_engine, volume, from_width_level(400, 40), axis="k")
    box = segment_box3d(predictor, (30, 30, 90, 90), 1, 2)
    assert sorted(box.masks) == [1, 2]
    assert predictor.encoded == 2  # one encoding per slice
    grown = propagate_from_slice(predictor, 2, seed_box=(30, 30, 90, 90), rules=NO_RULES, keep_largest=False)
    assert predictor.encoded == 4  # slices 0 and 3 added (prefetched ahead), 1 and 2 reused
    assert set(grown.stop_reasons) == {"up", "down"}
    for index, mask in grown.masks.items():
        assert mask.shape == (128, 128) and mask.dtype == bool
    # the seed answer is the predictor's own answer for that box
    encoded = predictor.encoded
    assert np.array_equal(grown.masks[2], predictor(2, (30, 30, 90, 90))[0])
    assert predictor.encoded == encoded


def test_result_volume_checks_shapes():
    result = PropagationResult(masks={0: np.ones((4, 5), bool)})
    assert result.volume("k", (2, 4, 5))[0].all()
    with pytest.raises(InputError):
        result.volume("j", (2, 4, 5))
    with pytest.raises(InputError):
        PropagationResult(masks={3: np.ones((4, 5), bool)}).volume("k", (2, 4, 5))


# ---------------------------------------------------------------------------------------------
# appearance: the rule that holds with real weights (a box-prompted model finds a blob in any box)


class Dominant:
    """A box-prompted model on a labelled volume with an image: answers the label with the most
    pixels inside the box, cut to the box (so past a structure's end it finds the neighbour, as a
    real model does)."""

    def __init__(self, labels, image):
        self.labels, self.img = labels, image
        self.n_slices, self.slice_shape = labels.shape[0], labels.shape[1:]
        self.requests = []

    def image(self, index):
        return self.img[index]

    def __call__(self, index, box):
        x0, y0, x1, y1 = (int(v) for v in box)
        self.requests.append((index, (x0, y0, x1, y1)))
        inside = np.zeros(self.slice_shape, bool)
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
        lab = self.labels[index]
        counts = np.bincount(lab[inside], minlength=int(self.labels.max()) + 1)
        counts[0] = 0
        pick = int(counts.argmax()) if counts.max() > 0 else None
        if pick is None:
            return np.zeros(self.slice_shape, bool), 0.9
        return (lab == pick) & inside, 0.9


def lung_over_liver(n=24, shape=(48, 48), dome=10.0):
    """Label 1 ('lung', dark, slices 8..23) sits on label 2 ('liver', bright, slices 0..9) with the
    same footprint; on slices 8-9 the lung is a thin ring around the liver's dome (radius `dome`
    inside the lung's 12: as at the CT sample's lung bases), so a blob-finding model prompted there
    answers the liver."""
    labels = np.zeros((n,) + shape, np.int64)
    rng = np.random.default_rng(0)
    for k in range(n):
        if 8 <= k:
            labels[k][disc(shape, 24, 24, 12)] = 1
        if k <= 9:
            labels[k][disc(shape, 24, 24, dome if k >= 8 else 13)] = 2
    image = np.full(labels.shape, 120, np.uint8)  # soft tissue around
    image[labels == 1] = 30 + rng.integers(0, 20, size=int((labels == 1).sum()))
    image[labels == 2] = 200 + rng.integers(0, 20, size=int((labels == 2).sum()))
    return labels, image


def test_appearance_change_stops_growth_and_drops_the_slice():
    labels, image = lung_over_liver()
    model = Dominant(labels, image)
    rules = StopRules(min_footprint_share=None)  # no growth inside the previous mask (tested below)
    result = propagate_from_slice(model, 16, seed_box=mask_bbox(labels[16] == 1), direction="down", keep_largest=False,
                                  rules=rules)
    assert min(result.masks) == 10  # slice 9's answer (the liver's dome) is dropped
    assert result.stop_reasons["down"] == "appearance changed (0% like the seed) at slice 9"
    off = propagate_from_slice(model, 16, seed_box=mask_bbox(labels[16] == 1), direction="down", keep_largest=False,
                               rules=StopRules(min_appearance=None))
    assert min(off.masks) == 0  # without the rule it runs to the volume's edge through the liver
    assert off.stop_reasons["down"] == "volume edge"


def test_growth_goes_on_inside_the_previous_mask_where_the_model_draws_the_dome():
    """FOOTPRINT_EVIDENCE: on slices 8-9 the lung is a ring around the liver's dome and the model
    answers the dome (0% like the seed); growth goes on without the model, inside the previous mask,
    taking the pixels nearer the lung's look than the dome's: the ring, down to the lung's end."""
    labels, image = lung_over_liver()
    model = Dominant(labels, image)
    result = propagate_from_slice(model, 16, seed_box=mask_bbox(labels[16] == 1), direction="down", keep_largest=False)
    assert min(result.masks) == 8
    for k in (8, 9):
        assert np.array_equal(result.masks[k], labels[k] == 1), k  # the ring, its hole (the dome) left open
    assert result.stop_reasons["down"] == "the part like the seed inside the previous mask ran out at slice 7"
    assert min(index for index, _ in model.requests) == 9  # the dome's answer; slice 8 without the model
    # a ring too thin to carry the lung on (20 px, 0.05 of the slice above: under the 0.15 floor) stops there
    thin_labels, thin_image = lung_over_liver(dome=11.5)
    thin = propagate_from_slice(Dominant(thin_labels, thin_image), 16, seed_box=mask_bbox(thin_labels[16] == 1),
                                direction="down", keep_largest=False)
    assert min(thin.masks) == 10 and thin.stop_reasons["down"] == "appearance changed (0% like the seed) at slice 9"
    # the nearer-than-the-dome test: grey levels of the lung's range but nearer the dome's are left out
    look = Appearance(image[16], labels[16] == 1)
    grey = np.full((48, 48), look.high)  # inside the lung's range, at its bright end
    nearer_other = look.high + (look.high - look.median) / 2
    assert look.like(grey).all() and not look.within(grey, labels[16] == 1, other=nearer_other).any()
    assert look.within(grey, labels[16] == 1, other=200.0).sum() == (labels[16] == 1).sum()
    for bad in (0.0, -0.1, 1.5):  # 0 would carry growth on while any part lasts
        with pytest.raises(InputError, match="min_footprint_share"):
            propagate_from_slice(model, 16, seed_box=mask_bbox(labels[16] == 1), rules=StopRules(min_footprint_share=bad))


def test_appearance_rule_needs_images_and_keeps_heterogeneous_structures():
    labels, image = lung_over_liver()
    # an oracle has no .image: the rule is skipped, the old rules decide
    oracle = Oracle(labels == 1)
    result = propagate_from_slice(oracle, 16, seed_box=mask_bbox(labels[16] == 1))
    assert (min(result.masks), max(result.masks)) == (8, 23)
    # a textured structure (its own values spread 30-50) is never stopped by its own texture
    model = Dominant(labels, image)
    up = propagate_from_slice(model, 12, seed_box=mask_bbox(labels[12] == 1), direction="up")
    assert max(up.masks) == 23 and up.stop_reasons["up"] == "volume edge"


class PartialVolumeEnd:
    """A bright 10 x 10 px structure on slices 0-7 of a 40 x 40 image; on slice 8 only a 5 x 5 px
    remnant is bright, and the model draws the 8 x 8 px around it (39% like the seed: a partial-volume
    end)."""

    def __init__(self):
        self.n_slices, self.slice_shape = 10, (40, 40)
        self.img = np.full((10, 40, 40), 100, np.uint8)
        self.img[:8, 15:25, 15:25] = 200
        self.img[8, 17:22, 17:22] = 200

    def image(self, index):
        return self.img[index]

    def __call__(self, index, box):
        mask = np.zeros(self.slice_shape, bool)
        if index < 8:
            mask[15:25, 15:25] = True
        else:
            mask[16:24, 16:24] = True
        return mask, 0.9


def test_a_partial_volume_end_keeps_its_part_like_the_seed_as_the_last_slice():
    """PARTIAL_END_EVIDENCE: where only the look stops growth and the mask is still partly like the
    seed (39% here), its seed-like pixels are the last slice; switched off, the slice is dropped."""
    model = PartialVolumeEnd()
    result = propagate_from_slice(model, 4, seed_box=(15, 15, 24, 24), direction="up", keep_largest=False)
    assert sorted(result.masks) == [4, 5, 6, 7, 8]
    assert np.array_equal(result.masks[8], model.img[8] == 200)  # the 5 x 5 remnant, not the 8 x 8 mask
    assert result.stop_reasons["up"] == "appearance changed (39% like the seed) at slice 8, its part like the seed kept as the last slice"
    # (switched off, the remnant would be found inside the previous mask instead: FOOTPRINT_EVIDENCE)
    off = propagate_from_slice(model, 4, seed_box=(15, 15, 24, 24), direction="up", keep_largest=False,
                               rules=StopRules(partial_end_share=None, min_footprint_share=None))
    assert sorted(off.masks) == [4, 5, 6, 7] and off.stop_reasons["up"] == "appearance changed (39% like the seed) at slice 8"


class BoxFiller:
    """A 40 x 40 px structure on the slices in `structure` of a 256 x 256 image of one grey level;
    on the other slices the model draws whatever its box frames (the box's inside less 1 px), as a
    box-prompted model does past a structure's end, so a looser box gets a larger mask."""

    def __init__(self, structure, n=16):
        self.n_slices, self.slice_shape = n, (256, 256)
        self.structure = set(structure)
        self.calls = []

    def image(self, index):
        return np.full(self.slice_shape, 200, np.uint8)  # the look never changes: that rule cannot stop it

    def __call__(self, index, box):
        self.calls.append((index, tuple(box)))
        mask = np.zeros(self.slice_shape, bool)
        if index in self.structure:
            mask[100:140, 100:140] = True
        else:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            mask[y0 + 1 : y1, x0 + 1 : x1] = True
        return mask, 0.9


def test_masks_that_follow_a_looser_box_on_two_slices_in_a_row_stop_growth():
    """STABILITY_EVIDENCE: on the structure a 4-px looser box changes nothing (IoU 1); past its end
    the mask follows the box (IoU 0.73, under 0.8 of the seed's 1.0). The first
    such slice is kept, the second dropped; switched off, growth runs to the volume's edge."""
    model = BoxFiller(range(0, 8))
    result = propagate_from_slice(model, 4, seed_box=(100, 100, 139, 139), direction="up", keep_largest=False)
    assert sorted(result.masks) == [4, 5, 6, 7, 8]
    assert result.stop_reasons["up"].startswith("masks unstable under a looser box at slices 8 and 9 (IoU 0.")
    looser = [box for index, box in model.calls if index == 4 and box != (100, 100, 139, 139)]
    # 16 px at 1024 scale = 4 px on a 256-px slice; then slice 5's box asked backwards (BACKWARD_EVIDENCE)
    assert looser == [(96.0, 96.0, 143.0, 143.0), (97, 97, 142, 142)]
    off = propagate_from_slice(BoxFiller(range(0, 8)), 4, seed_box=(100, 100, 139, 139), direction="up",
                               keep_largest=False, rules=StopRules(min_stability_ratio=None, min_backward_ratio=None))
    assert max(off.masks) == 15 and off.stop_reasons["up"] == "volume edge"


def test_one_unstable_slice_alone_does_not_stop_growth():
    model = BoxFiller(set(range(0, 16)) - {8})  # one odd slice inside the structure
    result = propagate_from_slice(model, 4, seed_box=(100, 100, 139, 139), direction="up", keep_largest=False)
    assert max(result.masks) == 15 and result.stop_reasons["up"] == "volume edge"


class DriftsPastTheEnd:
    """A 40 x 40 px structure on the slices in `structure` (drawn whenever the box is centred within
    8 px of it); elsewhere the model draws a 40 x 40 square 6 px right of the box's centre, as a model
    past a structure's end slides onto a neighbour. Same look, score and size everywhere, and a looser
    box (same centre) draws the same square, so only asking backwards tells."""

    def __init__(self, structure, n=16):
        self.n_slices, self.slice_shape = n, (256, 256)
        self.structure = set(structure)

    def image(self, index):
        return np.full(self.slice_shape, 200, np.uint8)

    def __call__(self, index, box):
        cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
        mask = np.zeros(self.slice_shape, bool)
        if index in self.structure and abs(cx - 119.5) <= 8 and abs(cy - 119.5) <= 8:
            mask[100:140, 100:140] = True
        else:
            x0, y0 = int(round(cx + 6 - 19.5)), int(round(cy - 19.5))
            mask[y0 : y0 + 40, x0 : x0 + 40] = True
        return mask, 0.9


def test_masks_the_slice_before_does_not_redraw_on_two_slices_in_a_row_stop_growth():
    """BACKWARD_EVIDENCE: on slice 8 (the first past the end) the square's box still gives the
    structure on slice 7; from slice 9 on, the previous slice redrawn with the new square's box
    lands 6 px further (IoU 0.54, under 0.8 of the first grown slice's 1.0). The first such slice
    is kept, the second dropped; switched off, growth slides on to the volume's edge."""
    model = DriftsPastTheEnd(range(0, 8))
    result = propagate_from_slice(model, 4, seed_box=(100, 100, 139, 139), direction="up", keep_largest=False)
    assert sorted(result.masks) == [4, 5, 6, 7, 8, 9]
    assert result.stop_reasons["up"].startswith("the masks of slices 9 and 10 were not redrawn on the slice before "
                                                "from their boxes (IoU 0.5")
    off = propagate_from_slice(model, 4, seed_box=(100, 100, 139, 139), direction="up", keep_largest=False,
                               rules=StopRules(min_backward_ratio=None))
    assert max(off.masks) == 15 and off.stop_reasons["up"] == "volume edge"


def test_a_seed_given_as_a_mask_is_prompted_with_the_next_slices_box_for_the_rules_reference():
    """SEED_MASK_EVIDENCE: the Slicer effect grows the segment's own slice (a mask, no box). The
    model is asked about that slice with the box the next slices get (the mask's box plus the
    margin) and a looser one, so the stability rule holds as it does for a seed box."""
    seed = np.zeros((256, 256), bool)
    seed[100:140, 100:140] = True
    model = BoxFiller(range(0, 8))
    given = propagate_from_slice(model, 4, seed_mask=seed, direction="up", keep_largest=False)
    assert sorted(given.masks) == [4, 5, 6, 7, 8]
    assert given.stop_reasons["up"].startswith("masks unstable under a looser box at slices 8 and 9")
    # (slice 5's box asked backwards, BACKWARD_EVIDENCE, is the seed's next box: answered once)
    assert [box for index, box in model.calls if index == 4] == [(97, 97, 142, 142), (93.0, 93.0, 146.0, 146.0)]
    assert np.array_equal(given.masks[4], seed)  # the given mask stays as it is
    off = propagate_from_slice(BoxFiller(range(0, 8)), 4, seed_mask=seed, direction="up", keep_largest=False,
                               rules=StopRules(min_stability_ratio=None, min_score_ratio=None, min_backward_ratio=None))
    assert off.stop_reasons["up"] == "volume edge"  # nothing asks the model about the seed then


def test_box_memory_spans_3_mm_of_slices():
    """BOX_MEMORY_EVIDENCE: the next box covers the masks of the last 3 mm; thick or unknown slices: one."""
    from medsam_slicer.propagation import box_memory
    from medsam_slicer.slicing import slice_distance

    assert [box_memory(mm) for mm in (None, 10.0, 5.0, 3.0, 2.0, 1.25, 1.0, 0.625)] == [1, 1, 1, 1, 2, 2, 3, 5]
    assert [slice_distance((0.7, 0.8, 2.5), axis) for axis in ("i", "j", "k")] == [0.7, 0.8, 2.5]
    assert slice_distance(None, "k") is None and slice_distance((1.0, 1.0, 0.0), "k") is None


def _protected_by(label):
    return lambda index: label[index]


def test_growth_that_ran_into_a_protected_neighbour_ends_there_and_touching_it_does_not_stop():
    """PROTECTED_EVIDENCE on the CT sample's expert labels: a cervical column grown on down the spine
    (the thoracic column's slices, as a model does past the label's end) ends on the first slice
    that lies mostly in the thoracic label the user protects; the other direction, and slices that
    only touch a protected neighbour, stay."""
    from scipy import ndimage

    from medsam_slicer.propagation import stop_at_protected

    labels = expert_segments()
    cervical, thoracic = labels["cervical vertebral column"], labels["thoracic vertebral column"]
    leaked = PropagationResult(masks={k: cervical[k] | thoracic[k] for k in range(11, 34)},
                               stop_reasons={"up": "volume edge", "down": "volume edge"})
    ended = stop_at_protected(leaked, 30, _protected_by(thoracic))
    # slice 26 holds 5 cervical px and the thoracic label's 156: dropped with everything below
    assert ended.indices == list(range(27, 34))
    assert ended.stop_reasons == {"up": "volume edge", "down": "ran into the protected area at slice 26 (97% of its mask)"}
    assert all(ended.masks[k] is leaked.masks[k] for k in ended.indices)
    # a lung drawn a pixel (3 mm) over its border touches the protected soft tissue on every slice
    # (8-35% of the mask on slices 8-11): nothing stops but its 2-px tip, 75% tissue when drawn so
    lung = {k: ndimage.binary_dilation(labels["right lung"][k]) for k in range(7, 34)}
    touching = PropagationResult(masks=lung, stop_reasons={"up": "volume edge", "down": "empty mask at slice 6"})
    kept = stop_at_protected(touching, 20, _protected_by(labels["tissue"]))
    assert kept.indices == list(range(8, 34))
    assert kept.stop_reasons == {"up": "volume edge", "down": "ran into the protected area at slice 7 (75% of its mask)"}


def test_a_protected_area_leaves_the_start_and_unchanged_directions_alone():
    from medsam_slicer.propagation import ProtectedStop, stop_at_protected

    everywhere = np.ones((34, 128, 128), bool)
    masks = {k: np.ones((128, 128), bool) for k in range(10, 20)}
    result = PropagationResult(masks=masks, stop_reasons={"up": "volume edge", "down": "unchanged"})
    ended = stop_at_protected(result, 15, _protected_by(everywhere))
    assert ended.indices == list(range(10, 16))  # the corrected slice and the kept side stay
    assert ended.stop_reasons["down"] == "unchanged" and "slice 16" in ended.stop_reasons["up"]
    # streamed in any order within a direction: once a slice ran into it, slices beyond are refused
    guard = ProtectedStop(15, lambda k: everywhere[k] if k >= 17 else None)
    assert [guard.allows(k, masks[k]) for k in (16, 17, 18, 16, 14, 15)] == [True, False, False, True, True, True]


def test_growth_given_a_protected_area_ends_there_without_asking_about_slices_beyond():
    """The engine's own stop (the Slicer effect's local path): the same slices and reasons as ending a
    finished growth there (stop_at_protected), and no slice beyond the stop is asked about."""
    from medsam_slicer.propagation import stop_at_protected

    labels = expert_segments()
    spine = labels["cervical vertebral column"] | labels["thoracic vertebral column"]  # a model that follows the bone
    thoracic = _protected_by(labels["thoracic vertebral column"])
    box = mask_bbox(labels["cervical vertebral column"][30])
    for grow, args in ((propagate_from_slice, (30,)), (repropagate, ({}, 30, spine[30], 33))):
        oracle = Oracle(spine)
        kwargs = {"seed_box": box} if grow is propagate_from_slice else {}
        ended = grow(oracle, *args, **kwargs, protected=thoracic)
        assert min(ended.indices) == 27
        assert ended.stop_reasons["down"].startswith("ran into the protected area at slice 26 (")
        assert min(index for index, _ in oracle.requests) == 26
        full = grow(Oracle(spine), *args, **kwargs)
        assert min(full.indices) < 20  # (unprotected, it grows on down the spine)
        after = stop_at_protected(full, 30, thoracic)
        assert after.indices == ended.indices and after.stop_reasons == ended.stop_reasons
        assert all(np.array_equal(after.masks[k], ended.masks[k]) for k in ended.indices)
