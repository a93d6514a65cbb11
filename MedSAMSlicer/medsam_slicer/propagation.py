"""3D segmentation from 2D box prompts: four ways to turn slice predictions into a volume.

a. `propagate_from_slice`: grow from one slice (a box, or an existing mask) up, down or both; the
   next slice is prompted with the previous mask's bounding box plus a small margin (made in the
   model's own input frame where the predictor offers `box_around`); the stop rules and their
   evidence are in `stop_rules.py`.
b. `segment_box3d`: a 3D box (ROI): every slice of its range is segmented, starting inside it;
   an empty mask falls back to the ROI's in-plane extent for the next slice.
c. `segment_key_slices`: boxes on several key slices; slices between are prompted with the box
   interpolated between the neighbouring keys, tightened by the propagated mask.
d. `repropagate`: after a user corrects one slice, only the slices beyond it (away from the seed)
   are recomputed; the rest is kept.
Growth of a and d that runs into an area the user protects (`protected=`) ends there.

Works with any predictor: a callable `(slice_index, (x0, y0, x1, y1)) -> (mask bool (H, W),
score float or None)` with `.n_slices` and `.slice_shape`, and optionally `.prefetch(indices)`
(called with the slices about to be needed, so a GPU engine can batch-encode ahead). Boxes are
inclusive pixel corners, x along the slice's columns (see `slicing.py`). "up" means increasing
slice index, "down" decreasing. No torch here.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError, MedSAMError
from .postprocess import fill_holes_2d, keep_anchored_components
from .slicing import Box2D, check_axis, grow_box, mask_bbox, mask_iou, slice_count, slice_index
from .stop_rules import (DEFAULT_MAX_AREA_RATIO, DEFAULT_MIN_APPEARANCE, Appearance, StopRules, check_rules,
                         footprint_holds, is_partial_end, judge, looser_box, moved_on)

ProgressFn = Callable[[int, np.ndarray, int, int], None]

# Prompt margin for predictors that do not know their model's scale (oracles, tests): pixels of
# MedSAM's 1024 x 1024 input. A SlicePredictor makes its model's own next box (`box_around`, from
# the model's family module: its default margin in its input scale; LiteMedSAM's box is made in its
# 256 frame as the official 3D inference makes it). MedSAM was trained with every box side
# moved outward by a random 0-20 px at that scale, so 10 px is the middle of its training
# distribution; the published 3D workflows used 5 px (1024 scale) and 3 px at 256 scale (= 12 px at
# 1024). It is converted to slice pixels per axis (the slice is resized to 1024 without keeping the
# aspect ratio) and rounded UP: a box that cuts the structure loses it for good (MedSAM rarely
# segments outside its box), a slightly looser one stays within the training range (10 px at 1024
# gives 2 px on a 128-px slice = 16 px at 1024, 5 px on a 512-px slice). benchmarks/
# propagation_eval.py sweeps it with the exact oracle on the CT sample (lungs, vertebral columns,
# synthetic shapes): 0 px mean Dice 0.939 (min 0.825); 1 px 0.991 (min 0.945: the cervical column
# misses 0.95); 2 px 0.997 (min 0.980); 3 px 0.998 (min 0.989).
DEFAULT_MARGIN_1024 = 10.0

# BOX_MEMORY_EVIDENCE. In open-ended growth (modes a and d) each next box is made from the previous
# mask, and a box-prompted model often draws a little inside its box, so the box can shrink a little
# at every step. The margin and the stop rules were measured on slices 3-10 mm apart; on thinner
# slices the same shrink repeats more often per millimetre and growth collapsed inside large
# structures. So the next box covers the masks of the last slices within BOX_MEMORY_MM (one slice
# at 3 mm or more, as before; unknown spacing counts as thick): per millimetre the box then moves as
# it does on 3 mm slices. With real weights (LiteMedSAM, mode a, benchmarks/accuracy_eval.py, one
# run each): on every slice of the 1 mm Colin27 brain (9 regions) mean 3D Dice 0.480 -> 0.497 (the
# whole brain 0.552 -> 0.725: its masks had shrunk to a fifth of it; the caudates +0.12/+0.03; the
# left thalamus 0.634 -> 0.468, whose box now follows it 26 slices into the midbrain, which looks and
# scores like it); every second slice (2 mm) 0.528 -> 0.537; TotalSegmentator's abdominal CT and MR
# resampled to 1 mm slices (linear, 14 organs) 0.629 -> 0.662 (the MR liver 0.469 -> 0.778, 0.769 on
# its own 3 mm slices; the CT liver 0.942 -> 0.925). A memory of 2 slices at 1 mm gave 0.517 and
# 0.653. At 3 mm it would cost: two masks of memory there took the 36 structures' mean from 0.645 to
# 0.623 (leaks past tapering ends, worst 14 slices past). Mode b keeps the official baseline's boxes.
BOX_MEMORY_MM = 3.0

# DRIFT_EVIDENCE. Mode b's propagated prompt can slide onto a neighbour and stay there (the issue's
# stomach: 0.14 where the official baseline got 0.73 by luck). With real weights (LiteMedSAM, 21
# structures: the CT sample, pyradiomics' tumours, the Colin27 MR regions; benchmarks/
# accuracy_eval.py), also prompting each slice with the 3D box's extent and keeping that mask when
# its score leads by 0.1 raised mean mode b Dice 0.565 -> 0.610 (official baseline 0.549): brain MR
# tumour 0.355 -> 0.745, body outline 0.156 -> 0.527; costs of up to 0.025 on 3 structures (right
# lung 0.846 -> 0.834). A lead of 0 or 0.05 (the scores of close prompts differ by a few hundredths)
# swapped in large wrong extent masks at the lungs' bases (right lung 0.78-0.80).
DRIFT_SCORE_LEAD = 0.1

# DRIFT_SEED_EVIDENCE. The score's lead calls for a swap only while the propagated mask scores under
# the start slice's (prompted with the 3D box's extent, the one prompt the user gave): a mask the
# model is at least as sure of is no drift. With real weights (LiteMedSAM, benchmarks/
# accuracy_eval.py, 34 one-piece structures with the abdomen set), the 21 swaps mode b made had
# propagated masks at 0.47-0.96 of the start's score, except one at 1.06: the abdominal CT
# stomach's last slice, where the extent's mask (score 0.89 against 0.76) was another organ (slice
# Dice 0.88 -> 0.00); with the rule (and NEXT_BOX_EVIDENCE) the stomach 0.609 -> 0.655 and the right
# hippocampus 0.390 -> 0.433 (the baseline's), no structure lower.

# NEXT_BOX_EVIDENCE. Mode b's next box is not cut to the 3D box (the official 3D inference does not
# cut it either; the masks are still clipped to the box, so the prompt reaches at most the margin
# past it). On a tight 3D box the cut left no margin on the sides where the structure touches the
# box, a prompt tighter than any MedSAM was trained with. With real weights (LiteMedSAM, 34 one-
# piece structures) not cutting: mean mode b 0.649 -> 0.652, structures below the baseline 7 -> 6;
# the abdominal MR's kidneys 0.734/0.661 -> 0.799/0.784 and stomach 0.478 -> 0.634 (baseline
# 0.806/0.786/0.628); costs on the chest CT's lumbar column 0.833 -> 0.781, the breast tumour
# 0.713 -> 0.654, the left putamen 0.689 -> 0.617 (each still at or within 0.02 of the baseline).
# Measured on 20 structures before the abdomen set, the cut had been worth 0.008.

# CHAIN_CHOICE_EVIDENCE. Each direction of mode b also follows the official baseline's plain
# propagation (no extent prompt; its decoder calls are the recovering chain's own until the two part),
# and keeps it when the model scores it higher on average over the slices where their masks differ:
# the same slices, so the scores compare. With real weights (LiteMedSAM, benchmarks/accuracy_eval.py,
# 34 one-piece structures): mode b 0.654 -> 0.655, structures below the baseline 5 -> 2; the left
# putamen 0.617 -> 0.644, the abdominal CT's pancreas 0.079 -> 0.089 and the MR's right kidney
# 0.799 -> 0.808 (each now at or above the baseline), the CT gallbladder 0.891 -> 0.889; every large
# win of the extent prompt kept (body outline 0.52, brain MR tumour 0.75). Not the CT stomach: there
# the swapped-in chain scored 0.71 on average against the plain chain's 0.60, yet the plain chain
# was the right one (slice Dice 0.03-0.24 against 0.00-0.07).
# CHAIN_TIE_EVIDENCE: the recovering chain is kept only when the model is surer of it by more than
# CHAIN_TIE (a few thousandths are no preference: the score's own noise; then the baseline's chain
# stands). Under the bone window the window choice picks for the CT stomach, both chains ran onto
# other tissue below the middle slice (slice Dice 0.00-0.04 each) and scored 0.781 against 0.776;
# the recovering one's wrong masks were larger: mode b 0.451 against the baseline's 0.497. One run
# over 69 one-piece structures (the 36 and 33 held-out TotalSegmentator CT labels): every margin from
# 0.005 to 0.03 changed only the stomach (0.451 -> 0.497; mean 0.5380 -> 0.5387, below the baseline
# 4 -> 3); 0.05 cost a muscle (0.470 -> 0.403); always the plain chain, 0.531 (the brain tumour's
# 0.746 -> 0.350).
CHAIN_TIE = 0.02

# EXTENT_LOOKS_EVIDENCE. The extent's mask replaces the propagated one only when it looks like the
# start slice's (share in its intensity range >= min_appearance, as for the propagated mask; not
# checked without images). A swap is meant to return to the structure; a mask of other tissue is no
# return, whatever its score. With real weights (benchmarks/accuracy_eval.py, 20 one-piece
# structures), the score-only swap had put in the right lung's first slice (2 px of lung) the
# extent's 2149-px mask of the liver below it (0% like the start slice; the propagated mask, 1180
# px, is liver too): right lung 0.834 -> 0.846; at the putamina's upper ends it took masks 48-49%
# like the start slice, 2-3 times the structure's area: right putamen 0.661 -> 0.686, left
# 0.628 -> 0.632; right thalamus 0.790 -> 0.795; no structure lower; mean mode b 0.638 -> 0.640.

# EXTENT_LEAK_EVIDENCE. A swap is a return to the structure, which the propagated mask has lost or
# left; the extent's mask must not be more than DEFAULT_MAX_AREA_RATIO times the propagated mask on
# the same slice. With real weights (LiteMedSAM, benchmarks/accuracy_eval.py, 36 one-piece
# structures), the 12 swaps the score's lead called for put in 0.8-3.6 times the propagated mask's
# area where they helped (slice Dice +0.11 to +0.79: tumours, putamen, hippocampus, spleen,
# pancreas, brain), 1.4-1.9 where they changed nothing, and 5.2 and 25.9 where they cost: the left
# caudate's end (0.56 -> 0.24) and the abdominal CT's stomach (0.24 -> 0.07; 518 px of other tissue
# where the propagated mask had shrunk to 20 px of a 130-px stomach, and the slices below followed).
# With the cap: stomach 0.655 -> 0.770 (the official baseline's 0.770; it had been 0.115 below),
# left caudate 0.395 -> 0.413, mean mode b 0.624 -> 0.628, no structure lower and none below the
# baseline. A cap of 6 or 10 fixes the stomach too (0.627); 3 cuts the hippocampus' and putamen's
# recoveries (left hippocampus 0.217 -> 0.163, under the baseline).

# LOOK_ALONE_EVIDENCE. Only the score's lead calls for the extent's mask; a propagated mask that no
# longer looks like the start slice's does not, on its own. With real weights (LiteMedSAM,
# benchmarks/accuracy_eval.py, 36 one-piece structures), the five swaps the change of look alone
# made (with the extent's mask at most DEFAULT_MAX_AREA_RATIO times the previous slice's) were at
# structures' ends, where the propagated mask thins into other tissue and the extent prompt answers
# the tissue around it: slice Dice 0.63 -> 0.23 (left caudate), 0.49 -> 0.14 (right caudate), three
# end slices of 2-79 px at 0.00-0.13 either way. Without them: left caudate 0.373 -> 0.395 (the
# official baseline 0.389; it had been below), right caudate 0.342 -> 0.354, no structure lower.

# Slices handed to `predictor.prefetch` at a time in open-ended growth (mode a). Ranges that will
# be segmented in full (modes b, c) are prefetched in chunks of the same size.
DEFAULT_LOOKAHEAD = 4

CANCELLED = "cancelled"
DIRECTIONS = ("up", "down")


@dataclass
class PropagationResult:
    masks: Dict[int, np.ndarray] = field(default_factory=dict)
    stop_reasons: Dict[str, str] = field(default_factory=dict)
    cancelled: bool = False

    def volume(self, axis: str, shape_kji: Sequence[int]) -> np.ndarray:
        """The bool [k, j, i] volume with every slice mask placed along `axis`."""
        check_axis(axis)
        out = np.zeros(tuple(int(n) for n in shape_kji), dtype=bool)
        n = slice_count(out.shape, axis)
        for index, mask in self.masks.items():
            if not 0 <= index < n:
                raise InputError(f"slice {index} is outside the volume (0..{n - 1} along {axis})")
            target = out[slice_index(axis, index)]
            if target.shape != np.shape(mask):
                raise InputError(f"mask of slice {index} is {np.shape(mask)}, slices along {axis} are {target.shape}")
            out[slice_index(axis, index)] = mask
        return out

    @property
    def indices(self) -> List[int]:
        return sorted(self.masks)


# ---------------------------------------------------------------------------------------------
# boxes


def box_memory(slice_mm: Optional[float]) -> int:
    """How many of the last masks the next box of open-ended growth covers: the slices within
    BOX_MEMORY_MM (BOX_MEMORY_EVIDENCE); 1 for thick or unknown slices."""
    if slice_mm is None or not slice_mm > 0:
        return 1
    return max(1, int(round(BOX_MEMORY_MM / float(slice_mm))))


def default_margin(slice_shape: Sequence[int]) -> Tuple[int, int]:
    """DEFAULT_MARGIN_1024 in slice pixels, (x margin, y margin), as MedSAM ViT-B scales margins."""
    from .models.medsam import margin_pixels

    return margin_pixels(DEFAULT_MARGIN_1024, slice_shape)


def _margin(margin, slice_shape) -> Tuple[int, int]:
    if margin is None:
        return default_margin(slice_shape)
    values = [margin, margin] if np.isscalar(margin) else list(margin)
    if len(values) != 2:
        raise InputError(f"margin must be one number or (x, y) pixels, got {margin!r}")
    try:
        mx, my = (int(round(float(v))) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"margin must be numbers of pixels, got {margin!r}") from None
    if mx < 0 or my < 0:
        raise InputError(f"margin must not be negative, got {margin!r}")
    return mx, my


def check_box(box, slice_shape: Sequence[int], what: str = "box") -> Box2D:
    """Validates a user's 2D box [x0, y0, x1, y1] (inclusive pixel corners) against a slice."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be four numbers x0 y0 x1 y1, got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InputError(f"{what} must be four numbers x0 y0 x1 y1, got {box!r}")
    x0, y0, x1, y1 = (int(round(v)) for v in values)
    h, w = int(slice_shape[0]), int(slice_shape[1])
    text = f"{what} {x0} {y0} {x1} {y1}"
    if x0 > x1 or y0 > y1:
        raise InputError(f"{text} is inverted (x0 <= x1 and y0 <= y1 needed)")
    if x0 < 0 or y0 < 0 or x1 >= w or y1 >= h:
        raise InputError(f"{text} is outside the slice ({w} x {h} pixels)")
    return (x0, y0, x1, y1)


def box_with_margin(mask_or_box, margin_px, slice_shape: Sequence[int]) -> Optional[Box2D]:
    """The bounding box of a 2D mask (or a box) grown by `margin_px` (one number or (x, y)) and
    clipped to the slice; None for an empty mask."""
    if np.ndim(mask_or_box) == 2:
        box = mask_bbox(np.asarray(mask_or_box, dtype=bool))
        if box is None:
            return None
    else:
        box = tuple(int(round(float(v))) for v in mask_or_box)
        if len(box) != 4:
            raise InputError(f"a box needs four numbers x0 y0 x1 y1, got {mask_or_box!r}")
    return grow_box(box, *_margin(margin_px, slice_shape), slice_shape)


def intersect_boxes(a: Box2D, b: Box2D) -> Optional[Box2D]:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] <= box[2] and box[1] <= box[3] else None


def union_boxes(a: Box2D, b: Box2D) -> Box2D:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def interpolate_box(a: Box2D, b: Box2D, t: float) -> Box2D:
    """Corners linearly interpolated, t=0 gives a, t=1 gives b (rounded to whole pixels)."""
    return tuple(int(math.floor((1.0 - t) * p + t * q + 0.5)) for p, q in zip(a, b))  # type: ignore



# ---------------------------------------------------------------------------------------------
# one run: the predictor, de-duplicated calls, prefetch, progress, cancel


def is_cancelled(cancel) -> bool:
    """Has `cancel` (a threading.Event, a callable returning bool, or None) been set?"""
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    if is_set is not None:
        return bool(is_set())
    return bool(cancel())


class _Run:
    def __init__(self, predictor, fill_holes: bool, progress: Optional[ProgressFn], cancel, lookahead: int):
        self.predictor = predictor
        self.n = int(predictor.n_slices)
        self.shape = tuple(int(v) for v in predictor.slice_shape)
        if self.n < 1:
            raise InputError("the volume has no slices")
        self.fill = bool(fill_holes)
        self.progress = progress
        self.cancel = cancel
        self.lookahead = max(1, int(lookahead))
        self.memo: Dict[Tuple[int, Box2D], Tuple[np.ndarray, Optional[float]]] = {}
        self.prefetched: set = set()
        self.masks: Dict[int, np.ndarray] = {}
        self.images: Dict[int, np.ndarray] = {}
        self.anchors: set = set()
        self.done = 0
        self.total = 0
        self.was_cancelled = False
        self.own_box = None
        self.slice_mm = getattr(predictor, "slice_mm", None)  # mm between slices, None: unknown

    def resolve_margin(self, margin) -> Tuple[int, int]:
        """(x, y) slice pixels: the caller's margin, else the predictor's model default, else
        DEFAULT_MARGIN_1024. Checked here, before any slice is computed. Without a caller's margin,
        a predictor that makes its model's own next box (`box_around`) is asked for it instead."""
        self.own_box = getattr(self.predictor, "box_around", None) if margin is None else None
        own = getattr(self.predictor, "default_margin", None) if margin is None else None
        if own is not None:
            return tuple(int(v) for v in own)  # type: ignore
        return _margin(margin, self.shape)

    def next_box(self, prev: np.ndarray, margin) -> Optional[Box2D]:
        """The box the slice after `prev` is prompted with (None for an empty mask): the model's
        own, made in its input frame as its published 3D inference makes it (corners may fall
        between slice pixels), else prev's bounding box plus `margin` slice pixels."""
        box = self.own_box(prev) if self.own_box is not None else None
        return box if box is not None else box_with_margin(prev, margin, self.shape)

    def cancelled(self) -> bool:
        if not self.was_cancelled and is_cancelled(self.cancel):
            self.was_cancelled = True
        return self.was_cancelled

    def check_index(self, index, what: str = "slice") -> int:
        try:
            value = int(index)
        except (TypeError, ValueError):
            raise InputError(f"{what} must be a whole slice index, got {index!r}") from None
        if value != index or not 0 <= value < self.n:
            raise InputError(f"{what} {index} is outside the volume (0..{self.n - 1})")
        return value

    def check_mask(self, mask, what: str) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise InputError(f"{what} is {mask.shape}, slices are {self.shape}")
        return mask.astype(bool, copy=False)

    def prefetch(self, indices: Iterable[int]) -> None:
        fn = getattr(self.predictor, "prefetch", None)
        todo = [i for i in indices if 0 <= i < self.n and i not in self.prefetched]
        if fn is None or not todo:
            return
        self.prefetched.update(todo)
        fn(todo)

    def predict(self, index: int, box: Box2D) -> Tuple[np.ndarray, Optional[float]]:
        key = (int(index), tuple(float(v) for v in box))  # a model's own boxes may be fractional
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        mask, score = self.predictor(key[0], tuple(box))
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise MedSAMError(f"the predictor returned a {mask.shape} mask for slice {index}, slices are {self.shape}")
        mask = mask.astype(bool, copy=True)
        if self.fill:
            mask = fill_holes_2d(mask)
        score = None if score is None else float(score)
        self.memo[key] = (mask, score)
        return mask, score

    def image(self, index: int) -> Optional[np.ndarray]:
        """The slice as the model sees it (the predictor's `.image`), or None when it has none."""
        fn = getattr(self.predictor, "image", None)
        if fn is None:
            return None
        if index not in self.images:
            self.images[index] = np.asarray(fn(index))
        return self.images[index]

    def finish(self, index: int, mask: np.ndarray) -> None:
        self.masks[index] = mask
        self.done += 1
        self.total = max(self.total, self.done)
        if self.progress is not None:
            self.progress(index, mask, self.done, self.total)

    def replace(self, index: int, mask: np.ndarray) -> None:
        """A finished slice's mask swapped for another (reported again, not counted again)."""
        self.masks[index] = mask
        if self.progress is not None:
            self.progress(index, mask, self.done, self.total)

    def result(self, reasons: Dict[str, str], keep_largest: bool) -> PropagationResult:
        masks = dict(self.masks)
        if keep_largest and masks:
            masks = keep_anchored_components(masks, self.anchors)
        return PropagationResult(masks=dict(sorted(masks.items())), stop_reasons=reasons, cancelled=self.was_cancelled)


def _stability(run: _Run, index: int, box, mask: np.ndarray) -> float:
    """IoU of `mask` (prompted with `box` on slice `index`) with the mask of a looser box (STABILITY_EVIDENCE)."""
    other, _ = run.predict(index, looser_box(box, run.shape))
    return mask_iou(mask, other)


def _backward(run: _Run, index: int, prev: np.ndarray, new: np.ndarray, margin) -> float:
    """IoU of slice `index`'s mask `prev` with the model's mask there for the box of `new`, the mask
    grown from it on the next slice (BACKWARD_EVIDENCE)."""
    back, _ = run.predict(index, run.next_box(new, margin))
    return mask_iou(prev, back)


def _seed_evidence(run: _Run, rules: StopRules, seed: int, box, mask: np.ndarray, score, margin):
    """(score, stability) of the seed slice that the score-ratio and stability rules compare with;
    None where a rule has nothing to go on (stability needs a real model: a predictor with images).
    A seed given as a mask (the Slicer effect grows the segment's own slice) was not prompted: the
    model is asked about it with the box the next slices get, its mask's box plus the margin, so
    both rules hold there as they do for a seed box (SEED_MASK_EVIDENCE)."""
    has_image = run.image(seed) is not None
    if box is None:
        if not has_image or (rules.min_score_ratio is None and rules.min_stability_ratio is None):
            return None, None
        box = run.next_box(mask, margin)
        mask, score = run.predict(seed, box)
        if not mask.any():
            return None, None
    if not getattr(run.predictor, "score_ranks_quality", False):
        score = None  # an unmeasured score is no evidence for stopping
    stability = _stability(run, seed, box, mask) if has_image and rules.min_stability_ratio is not None else None
    return score, stability


def _appearance(run: _Run, rules: StopRules, index: int, mask: np.ndarray) -> Optional[Appearance]:
    """The reference appearance of the slice growth starts from (None: rule off or no images)."""
    if rules.min_appearance is None or run.image(index) is None or not mask.any():
        return None
    return Appearance(run.image(index), mask)


def _grow(run: _Run, start: int, mask: np.ndarray, step: int, rules: StopRules, margin, budget: int,
          seed_score: Optional[float] = None, seed_stability: Optional[float] = None,
          guard: Optional["ProtectedStop"] = None) -> str:
    """Open-ended growth from slice `start` (already done) in one direction; returns the reason.
    seed_stability: the start slice's `_stability` (None: that rule is off). guard: the protected
    area's judge (PROTECTED_EVIDENCE), None: nothing protected."""
    prev, prev_area, index, count = mask, int(mask.sum()), start, 0
    look = _appearance(run, rules, start, mask)
    floor = None if seed_stability is None or rules.min_stability_ratio is None else rules.min_stability_ratio * seed_stability
    unstable = False  # was the previous slice under the stability floor?
    backward = rules.min_backward_ratio is not None and run.image(start) is not None
    first_back, back_low = None, False  # the first grown slice's backward IoU; was the previous one low?
    other = None  # once the model's masks moved onto other tissue: its grey level (FOOTPRINT_EVIDENCE)
    recent = deque([mask], maxlen=box_memory(run.slice_mm))  # the masks the next box covers
    while True:
        nxt = index + step
        if not 0 <= nxt < run.n:
            reason = "volume edge"
            break
        if rules.max_slices is not None and count >= rules.max_slices:
            reason = "max slices"
            break
        if run.cancelled():
            reason = CANCELLED
            break
        if other is not None:  # inside the previous mask, without the model
            new = look.within(run.image(nxt), prev, other)  # holes unfilled: they are the other tissue
            keep = footprint_holds(rules, int(new.sum()), prev_area)
            reason = None if keep else f"the part like the seed inside the previous mask ran out at slice {nxt}"
        else:
            box = run.next_box(recent[0] if len(recent) == 1 else np.logical_or.reduce(recent), margin)
            if nxt not in run.prefetched:
                left = budget - count if rules.max_slices is None else min(budget, rules.max_slices) - count
                run.prefetch([nxt + step * n for n in range(min(run.lookahead, max(1, left)))])
            new, score = run.predict(nxt, box)
            share = look.share(run.image(nxt), new) if look is not None and new.any() else None
            keep, reason = judge(rules, nxt, new, score, prev_area, box, share, seed_score)
            look_alone = not keep and share is not None and judge(rules, nxt, new, score, prev_area, box, None, seed_score)[0]
            if look_alone and is_partial_end(rules, share):
                # the mask is still partly like the seed: a partial-volume end, whose seed-like part
                # is the last slice (PARTIAL_END_EVIDENCE)
                part = new & look.like(run.image(nxt))
                if judge(rules, nxt, part, score, prev_area, box, None, seed_score)[0]:
                    new, keep = part, True
                    reason += ", its part like the seed kept as the last slice"
            elif look_alone and moved_on(rules, share):
                # the model drew other tissue: the structure may go on as a thin part of the
                # previous mask beside it (FOOTPRINT_EVIDENCE)
                tissue = look.median_of(run.image(nxt), new)
                part = look.within(run.image(nxt), prev, tissue)
                if footprint_holds(rules, int(part.sum()), prev_area):
                    new, keep, reason, other = part, True, None, tissue
            if keep and reason is None and floor is not None and other is None:
                stability = _stability(run, nxt, box, new)
                if stability < floor and unstable:
                    keep, reason = False, (f"masks unstable under a looser box at slices {index} and {nxt} "
                                           f"(IoU {stability:.2f}, under {rules.min_stability_ratio:g} of the seed's)")
                unstable = stability < floor
            if keep and backward and other is None:
                agreement = _backward(run, index, prev, new, margin)
                if first_back is None:
                    first_back = agreement
                else:
                    low = agreement < rules.min_backward_ratio * first_back
                    if low and back_low:
                        keep, reason = False, (f"the masks of slices {index} and {nxt} were not redrawn on the slice "
                                               f"before from their boxes (IoU {agreement:.2f}, under "
                                               f"{rules.min_backward_ratio:g} of the first grown slice's)")
                    back_low = low
        if keep and guard is not None and not guard.allows(nxt, new):
            keep, reason = False, guard.reason("up" if step > 0 else "down")
        if keep:
            count += 1
            run.finish(nxt, new)
        if reason is not None:
            break
        prev, prev_area, index = new, int(new.sum()), nxt
        recent.append(new)
    # the estimate counted every slice to the edge (or max_slices): forget the unused part
    planned = budget if rules.max_slices is None else min(budget, rules.max_slices)
    run.total -= planned - count
    return reason


def _directions(direction: str) -> Tuple[str, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction in DIRECTIONS:
        return (direction,)
    raise InputError(f"direction must be up, down or both, got {direction!r}")


def _room(run: _Run, index: int, name: str) -> int:
    return run.n - 1 - index if name == "up" else index


def _planned_slices(run: _Run, start: int, names: Tuple[str, ...], rules: StopRules) -> int:
    """Slices a growth from `start` visits at most (for progress totals): the start plus each direction's room."""
    rooms = [_room(run, start, name) for name in names]
    return 1 + sum(room if rules.max_slices is None else min(rules.max_slices, room) for room in rooms)


# ---------------------------------------------------------------------------------------------
# mode a


def propagate_from_slice(
    predictor,
    seed_index: int,
    seed_box=None,
    seed_mask: Optional[np.ndarray] = None,
    direction: str = "both",
    rules: Optional[StopRules] = None,
    margin=None,
    keep_largest: bool = True,
    fill_holes: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel=None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    protected: Optional[Callable[[int], Optional[np.ndarray]]] = None,
) -> PropagationResult:
    """Grows a segmentation from one slice: prompted with `seed_box`, or given as `seed_mask` (kept
    as is; a real model is still asked about that slice, for the stop rules' reference:
    SEED_MASK_EVIDENCE). Each next slice is prompted with the
    previous mask's bounding box plus `margin` (slice pixels, one number or (x, y); None: the
    model's default, see `_Run.resolve_margin`) until a stop rule, the volume's edge or max_slices.
    An empty `seed_mask` is an InputError; a seed box that yields an empty mask gives an empty result whose reasons say
    so. keep_largest keeps the largest 3D component plus everything touching the seed's mask.
    protected(index): a bool slice the user protects (None: nothing there); growth ends where it runs
    into it (ProtectedStop)."""
    rules = check_rules(rules)
    names = _directions(direction)
    run = _Run(predictor, fill_holes, progress, cancel, lookahead)
    margin = run.resolve_margin(margin)
    seed = run.check_index(seed_index, "seed slice")
    if seed_mask is None and seed_box is None:
        raise InputError("give a box or a mask on the seed slice")
    run.total = _planned_slices(run, seed, names, rules)
    if seed_mask is not None:
        mask = run.check_mask(seed_mask, "the seed mask").copy()
        if not mask.any():
            raise InputError(f"the mask on seed slice {seed} is empty: draw or segment the structure there first")
        box, seed_score = None, None
    else:
        box = check_box(seed_box, run.shape, "seed box")
        if run.cancelled():
            return run.result({name: CANCELLED for name in names}, keep_largest)
        run.prefetch([seed] + [seed + (1 if n == "up" else -1) * k for n in names for k in range(1, run.lookahead)])
        mask, seed_score = run.predict(seed, box)
        if not mask.any():
            return run.result({name: f"empty mask at slice {seed}" for name in names}, keep_largest)
    run.anchors.add(seed)
    run.finish(seed, mask)
    seed_score, seed_stability = _seed_evidence(run, rules, seed, box, mask, seed_score, margin)
    reasons = {}
    guard = ProtectedStop(seed, protected) if protected is not None else None
    for name in names:
        budget = _room(run, seed, name)
        reasons[name] = _grow(run, seed, mask, 1 if name == "up" else -1, rules, margin, budget, seed_score,
                              seed_stability, guard)
    return run.result(reasons, keep_largest)


# ---------------------------------------------------------------------------------------------
# mode b


def segment_box3d(
    predictor,
    box2d,
    first: int,
    last: int,
    start: Optional[int] = None,
    margin=None,
    keep_largest: bool = True,
    fill_holes: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel=None,
    clip_to_box: bool = True,
    lookahead: int = DEFAULT_LOOKAHEAD,
    min_appearance: Optional[float] = DEFAULT_MIN_APPEARANCE,
    recover: bool = True,
) -> PropagationResult:
    """Segments every slice from `first` to `last` (inclusive) of a 3D box whose in-plane extent is
    `box2d`. Drift (with `recover`): every propagated slice is also prompted with the full extent
    (a decoder call; the embedding is shared), and that mask replaces the propagated one (and counts
    as an anchor) when it looks like the start slice's mask (share of its pixels in the start mask's
    intensity range at least `min_appearance`, see StopRules; checked where `predictor.image`
    exists) and the model scores it higher by DRIFT_SCORE_LEAD while the propagated mask scores
    under the start slice's (DRIFT_SEED_EVIDENCE; a change of look alone is no call:
    LOOK_ALONE_EVIDENCE) and the extent's mask is at most DEFAULT_MAX_AREA_RATIO times the
    propagated one (EXTENT_LEAK_EVIDENCE), so a run that slid onto a neighbour finds its way back
    instead of following it. Otherwise the propagated mask is kept (at a structure's partial-volume
    end the extent prompt returns large wrong masks). Beside that chain each direction also follows
    the plain propagation (the official baseline's), and keeps it instead where the model scores it
    higher over the slices where the two differ
    (CHAIN_CHOICE_EVIDENCE; progress reports the recovering chain's masks, then any replaced). Starts
    at `start` (default: the middle slice, where the box's extent most likely fits the structure,
    as in the LiteMedSAM baseline) prompted with the full extent, then goes up to `last` and down
    to `first`, each slice prompted with the previous mask's box plus margin (the model's own, made
    in its input frame: `_Run.next_box`; not cut to the extent: NEXT_BOX_EVIDENCE). An empty mask does not stop:
    the next slice falls back to the full extent (and counts as an anchor for keep_largest). With
    clip_to_box, masks are cut to the extent. Slices whose mask came out empty are in `masks` as empty masks (they were segmented)."""
    run = _Run(predictor, fill_holes, progress, cancel, lookahead)
    margin = run.resolve_margin(margin)
    roi = check_box(box2d, run.shape, "3D box extent")
    first = run.check_index(first, "first slice")
    last = run.check_index(last, "last slice")
    if first > last:
        raise InputError(f"the 3D box's slice range is inverted ({first} > {last})")
    start = (first + last) // 2 if start is None else run.check_index(start, "start slice")
    if not first <= start <= last:
        raise InputError(f"start slice {start} is outside the box's range {first}..{last}")
    run.total = last - first + 1
    clip = np.zeros(run.shape, dtype=bool)
    if clip_to_box:
        clip[roi[1] : roi[3] + 1, roi[0] : roi[2] + 1] = True

    look: List[Optional[Appearance]] = [None]
    start_score: List[Optional[float]] = [None]

    def predict(index: int, box: Box2D):
        mask, score = run.predict(index, box)
        return (mask & clip if clip_to_box else mask), score

    def drifted(index: int, mask: np.ndarray) -> bool:
        return look[0] is not None and mask.any() and look[0].share(run.image(index), mask) < min_appearance

    def recovering(index: int, box: Box2D):
        """(mask, score, swapped) of one slice of the drift-recovering chain."""
        mask, score = predict(index, box)
        if box != roi:
            again, again_score = predict(index, roi)
            scored_better = score is not None and again_score is not None and again_score > score + DRIFT_SCORE_LEAD
            # a propagated mask the model is as sure of as the start slice's is no drift (DRIFT_SEED_EVIDENCE)
            scored_better = scored_better and (start_score[0] is None or score < start_score[0])
            # never swap in a mask that does not look like the start slice's (EXTENT_LOOKS_EVIDENCE),
            # nor one that dwarfs the propagated mask: a leak, not a return (EXTENT_LEAK_EVIDENCE)
            leak = mask.any() and again.sum() > DEFAULT_MAX_AREA_RATIO * mask.sum()
            if scored_better and again.any() and not leak and not drifted(index, again):
                return again, again_score, True
        return mask, score, False

    def next_box(prev: np.ndarray, index: int, anchors: set) -> Box2D:
        box = run.next_box(prev, margin)
        if box is None:  # an empty mask: the next slice falls back to the full extent
            anchors.add(index)
            return roi
        return box

    reasons = {name: CANCELLED for name in DIRECTIONS}
    if run.cancelled():
        return run.result(reasons, keep_largest)
    run.prefetch(_around(start, first, last, run.lookahead))
    seed, score = predict(start, roi)
    start_score[0] = score
    run.finish(start, seed)
    run.anchors.add(start)
    if min_appearance is not None and seed.any() and run.image(start) is not None:
        look[0] = Appearance(run.image(start), seed)
    for name, step, end in (("up", 1, last), ("down", -1, first)):
        # two chains from the start slice: the drift-recovering one (reported as it goes) and, with
        # `recover`, the official baseline's plain propagation beside it (CHAIN_CHOICE_EVIDENCE)
        chains = {"recovering": _Chain(seed), "plain": _Chain(seed)} if recover else {"plain": _Chain(seed)}
        shown = next(iter(chains.values()))
        index = start
        reason = "end of range"
        while index != end:
            if run.cancelled():
                reason = CANCELLED
                break
            index += step
            if index not in run.prefetched:
                run.prefetch(range(index, end + step, step)[: run.lookahead])
            for kind, chain in chains.items():
                box = next_box(chain.prev, index, chain.anchors)
                if kind == "recovering":
                    mask, score, swapped = recovering(index, box)
                    if swapped:
                        chain.anchors.add(index)
                else:
                    mask, score = predict(index, box)
                chain.add(index, mask, score)
            run.finish(index, shown.prev)
        kept = shown if len(chains) == 1 or not _surer(chains["plain"], shown) else chains["plain"]
        if kept is not shown:
            for index, mask in kept.masks.items():
                if not np.array_equal(run.masks[index], mask):
                    run.replace(index, mask)
        run.anchors.update(kept.anchors)
        reasons[name] = reason
    return run.result(reasons, keep_largest)


class _Chain:
    """One way through mode b's slices in one direction: masks, the model's scores, anchors."""

    def __init__(self, start_mask: np.ndarray):
        self.prev = start_mask
        self.masks: Dict[int, np.ndarray] = {}
        self.scores: Dict[int, Optional[float]] = {}
        self.anchors: set = set()

    def add(self, index: int, mask: np.ndarray, score) -> None:
        self.prev = self.masks[index] = mask
        self.scores[index] = score


def _surer(other: _Chain, shown: _Chain) -> bool:
    """Is the model as sure of `other` (the plain chain) as of `shown`: a mean score over the slices
    where their masks differ at most CHAIN_TIE lower (CHAIN_TIE_EVIDENCE; never without scores)."""
    differ = [k for k in shown.masks if not np.array_equal(shown.masks[k], other.masks[k])]
    mine = [shown.scores[k] for k in differ]
    theirs = [other.scores[k] for k in differ]
    if not differ or any(v is None for v in mine + theirs):
        return False
    return float(np.mean(theirs)) > float(np.mean(mine)) - CHAIN_TIE  # a tie goes to the plain chain


def _around(start: int, first: int, last: int, count: int) -> List[int]:
    """The start slice and its nearest neighbours inside first..last (count in all at most)."""
    out = [start]
    k = 1
    while len(out) < count and (start + k <= last or start - k >= first):
        for cand in (start + k, start - k):
            if first <= cand <= last and len(out) < count:
                out.append(cand)
        k += 1
    return out


# ---------------------------------------------------------------------------------------------
# mode c

KEY_BOX_MODES = ("union", "intersect", "interpolate", "propagate")


def segment_key_slices(
    predictor,
    key_boxes: Dict[int, Box2D],
    margin=None,
    keep_largest: bool = True,
    fill_holes: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel=None,
    combine: str = "union",
    gap_fill: str = "larger",
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> PropagationResult:
    """Segments every slice from the first to the last key slice. Key slices are prompted with
    their boxes. Each gap between two keys is filled from one key toward the other (gap_fill
    "larger", default: from the key whose mask is larger, as MedSAM's sparse-marker workflow starts
    from the largest marker; "both": from both ends toward the middle). A slice's box is the box
    interpolated linearly between the two keys, combined with the previous mask's box plus margin
    as `combine` says:

    union (default): the box covering both. The interpolation carries the user's bounds, the
        previous mask the shape between keys; linear corners under-cover convex structures (a
        sphere's or lung's cross-section grows faster than linearly near its ends) and a mask's box
        lags where the structure widens, so each alone can cut the structure, which a box-prompted
        model cannot recover; the union is still tight (each part is) and near MedSAM's 0-20 px
        loose training range. Exact oracle on 10 structures (benchmarks/propagation_eval.py), gaps
        from the larger key: union mean Dice 0.997 (min 0.979), propagate 0.997, interpolate 0.955,
        intersect 0.954; gaps from both ends: union 0.978, intersect 0.951.
    intersect: the interpolated box cut to the previous mask's box + margin (the tightest; falls
        back to the interpolated box when they miss each other). interpolate: the interpolated box
        alone. propagate: the previous mask's box alone.
    Where the previous mask is empty, the interpolated box is used.
    """
    if gap_fill not in ("larger", "both"):
        raise InputError(f"gap_fill must be larger or both, got {gap_fill!r}")
    if combine not in KEY_BOX_MODES:
        raise InputError(f"combine must be one of {', '.join(KEY_BOX_MODES)}, got {combine!r}")
    run = _Run(predictor, fill_holes, progress, cancel, lookahead)
    margin = run.resolve_margin(margin)
    if not key_boxes:
        raise InputError("give a box on at least one key slice")
    keys: Dict[int, Box2D] = {}
    for index, box in key_boxes.items():
        index = run.check_index(index, "key slice")
        keys[index] = check_box(box, run.shape, f"box on key slice {index}")
    order = sorted(keys)
    run.total = order[-1] - order[0] + 1
    reasons = {name: CANCELLED for name in DIRECTIONS}
    run.prefetch(order[: run.lookahead])
    for n, index in enumerate(order):
        if run.cancelled():
            return run.result(reasons, keep_largest)
        if index not in run.prefetched:
            run.prefetch(order[n : n + run.lookahead])
        mask, _ = run.predict(index, keys[index])
        run.anchors.add(index)
        run.finish(index, mask)
    for a, b in zip(order[:-1], order[1:]):
        prev = {1: run.masks[a], -1: run.masks[b]}
        plan = []
        if gap_fill == "larger":
            # from the key with the larger mask across the whole gap (MedSAM's sparse-marker
            # workflow starts from the largest marker): a key on a structure's thin tail gives
            # poor boxes for the slices next to it, the larger side's shrinking masks do not
            step = 1 if prev[1].sum() >= prev[-1].sum() else -1
            plan = [(i, step) for i in (range(a + 1, b) if step == 1 else range(b - 1, a, -1))]
        else:
            lo, hi = a, b
            while lo + 1 < hi:
                lo += 1
                plan.append((lo, 1))
                if lo + 1 < hi:
                    hi -= 1
                    plan.append((hi, -1))
        for n, (index, step) in enumerate(plan):
            if run.cancelled():
                return run.result(reasons, keep_largest)
            if index not in run.prefetched:
                run.prefetch([i for i, _ in plan[n : n + run.lookahead]])
            interp = interpolate_box(keys[a], keys[b], (index - a) / float(b - a))
            box = _combine(combine, interp, run.next_box(prev[step], margin))
            mask, _ = run.predict(index, box)
            run.finish(index, mask)
            prev[step] = mask
    reasons = {"up": "end of range", "down": "end of range"}
    return run.result(reasons, keep_largest)


def _combine(mode: str, interp: Box2D, tight: Optional[Box2D]) -> Box2D:
    if tight is None or mode == "interpolate":
        return interp
    if mode == "propagate":
        return tight
    if mode == "union":
        return union_boxes(interp, tight)
    return intersect_boxes(interp, tight) or interp


# ---------------------------------------------------------------------------------------------
# mode d


def repropagate(
    predictor,
    masks: Union[Dict[int, np.ndarray], PropagationResult],
    corrected_index: int,
    corrected_mask: np.ndarray,
    seed_index: int,
    rules: Optional[StopRules] = None,
    margin=None,
    keep_largest: bool = True,
    fill_holes: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel=None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    protected: Optional[Callable[[int], Optional[np.ndarray]]] = None,
) -> PropagationResult:
    """After the user corrected slice `corrected_index`, recomputes only the slices beyond it, away
    from `seed_index`, growing from the corrected mask with the stop rules; slices from the seed to
    the corrected slice and everything on the seed's other side are kept as they are. An empty
    corrected mask means "the structure ends here": slices beyond are removed. Correcting the seed
    slice itself regrows both directions. Returns the merged result; progress reports the corrected
    slice and the recomputed ones, and `stop_reasons` has "unchanged" for a direction kept as is.
    protected: as for `propagate_from_slice`."""
    rules = check_rules(rules)
    old = masks.masks if isinstance(masks, PropagationResult) else masks
    run = _Run(predictor, fill_holes, progress, cancel, lookahead)
    margin = run.resolve_margin(margin)
    seed = run.check_index(seed_index, "seed slice")
    fixed = run.check_index(corrected_index, "corrected slice")
    corrected = run.check_mask(corrected_mask, "the corrected mask").copy()
    if fixed > seed:
        names: Tuple[str, ...] = ("up",)
    elif fixed < seed:
        names = ("down",)
    else:
        names = DIRECTIONS

    def beyond(index: int) -> bool:
        return (index > fixed and "up" in names) or (index < fixed and "down" in names)

    kept = {int(i): run.check_mask(m, f"the mask of slice {i}") for i, m in old.items() if not beyond(int(i)) and int(i) != fixed}
    run.anchors.update({seed, fixed})
    reasons = {name: "unchanged" for name in DIRECTIONS if name not in names}
    if not corrected.any():
        run.masks.update(kept)
        for name in names:
            reasons[name] = f"empty mask at slice {fixed}"
        return run.result(reasons, keep_largest)
    run.total = _planned_slices(run, fixed, names, rules)
    run.finish(fixed, corrected)
    guard = ProtectedStop(fixed, protected) if protected is not None else None
    for name in names:
        reasons[name] = _grow(run, fixed, corrected, 1 if name == "up" else -1, rules, margin, _room(run, fixed, name),
                              guard=guard)
    new = dict(run.masks)
    run.masks = dict(kept)
    run.masks.update(new)
    return run.result(reasons, keep_largest)


# ---------------------------------------------------------------------------------------------
# protected area

# PROTECTED_EVIDENCE. A structure grown from one box does not know where a neighbour the user has
# already contoured begins; where the two are one continuous tissue (a spine contoured level by
# level), no rule of the image stops it: with real weights (LiteMedSAM, mode a, the CT sample) the
# cervical column ran 26 slices down through the thoracic column's label. In Slicer the user says
# what is protected: the Segment Editor's editable area (mask mode) keeps other segments from being
# written. Growth that runs into it would write nothing there and go on writing beyond it, so it
# ends where a grown slice's mask lies at least PROTECTED_SHARE inside the protected area: more of
# it on the neighbour than on its own structure. With real weights (LiteMedSAM, benchmarks/
# accuracy_eval.py, mode a with every other label that does not surround the structure protected,
# the 31 structures that have such labels): the cervical column's leaked masks lay 73-89% inside the
# thoracic label, its own slices 0%; mean 3D Dice 0.627 -> 0.651, the three columns' leaks of 11-26
# slices ended within 2 slices; organs touching neighbours (kidneys, liver, spleen, lungs, the MR
# regions) kept every slice; only the right caudate's lower end moved (-3 -> -4). A mask drawn a
# pixel over its border spills 8-35% onto the neighbour (a 2-px tip more: tested).
PROTECTED_SHARE = 0.5


class ProtectedStop:
    """Judges grown slices against a protected area, per direction from `start` (the seed, or the
    corrected slice of `repropagate`): the first slice whose mask lies at least `share` inside
    `protected(index)` (a bool slice; None where nothing is protected), and every slice beyond it,
    are not allowed. Slices can be judged as they stream in (`allows`), in any order within a
    direction: a slice nearer the start than the stop is allowed."""

    def __init__(self, start: int, protected: Callable[[int], Optional[np.ndarray]], share: float = PROTECTED_SHARE):
        self.start = int(start)
        self.protected = protected
        self.share = float(share)
        self.stops: Dict[str, Tuple[int, float]] = {}  # direction -> (first slice not allowed, its share)

    def allows(self, index: int, mask: np.ndarray) -> bool:
        index = int(index)
        if index == self.start:
            return True  # the slice the user gave or corrected
        name, step = ("up", 1) if index > self.start else ("down", -1)
        stop = self.stops.get(name)
        if stop is not None and (index - stop[0]) * step >= 0:
            return False
        area = self.protected(index)
        mask = np.asarray(mask, dtype=bool)
        if area is None or not mask.any():
            return True
        share = float(np.asarray(area, dtype=bool)[mask].mean())
        if share < self.share:
            return True
        self.stops[name] = (index, share)
        return False

    def reason(self, name: str) -> str:
        index, share = self.stops[name]
        return f"ran into the protected area at slice {index} ({100 * share:.0f}% of its mask)"


def stop_at_protected(result: PropagationResult, start: int,
                      protected: Callable[[int], Optional[np.ndarray]]) -> PropagationResult:
    """A finished `result` of open-ended growth (modes a and d) from slice `start`, ended where it ran
    into the protected area, as growth given `protected` ends there (to measure both from one run);
    directions reported "unchanged" are kept as they are. The stop reasons say where."""
    judge_slices = ProtectedStop(start, protected)
    grown = [name for name, reason in result.stop_reasons.items() if reason != "unchanged"]
    masks = {}
    for index in sorted(result.masks, key=lambda i: abs(i - start)):
        name = "up" if index > start else "down"
        if index == start or name not in grown or judge_slices.allows(index, result.masks[index]):
            masks[index] = result.masks[index]
    reasons = dict(result.stop_reasons)
    reasons.update({name: judge_slices.reason(name) for name in judge_slices.stops})
    return PropagationResult(masks=dict(sorted(masks.items())), stop_reasons=reasons, cancelled=result.cancelled)
