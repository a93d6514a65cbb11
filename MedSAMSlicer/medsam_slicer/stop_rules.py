"""When open-ended growth (modes a and d of `propagation.py`) stops: the rules, their defaults and
the evidence for each threshold, and the judgement of one new slice. No torch, no model calls here:
`propagation._grow` asks the model and hands the masks, scores and images to these functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .errors import InputError
from .slicing import Box2D

# APPEARANCE_EVIDENCE. With real weights (LiteMedSAM, benchmarks/accuracy_eval.py and no-stop
# trajectories of mode a on the CT sample, lungs at window 1000/-500), a box past a structure's end
# still gets a plausible mask (the model's IoU score on those leaked slices, 0.74-0.88, overlaps
# the 0.80-0.98 of true slices; the jittered-prompt agreement, 0.74-0.92, and the previous-mask
# Dice, 0.25-0.96, overlap too), but what it segments no longer looks like the seed: the share of
# mask pixels inside the seed's central 95% intensity range was 0.81-0.97 on every true lung slice
# whose mask matched the truth (0.56-0.65 on the last partial-volume slice) and 0.00-0.01 on every
# leaked slice (liver, abdomen). 0.5 sits in that gap and still means "half the mask is other tissue".
DEFAULT_MIN_APPEARANCE = 0.5

# PARTIAL_END_EVIDENCE. Where the appearance rule fires with the mask still partly like the seed
# (share at least DEFAULT_PARTIAL_END_SHARE), the slice is most often a structure's partial-volume
# end: the model draws the structure and the tissue around it, so dropping the slice stopped short.
# There the mask's pixels inside the seed's intensity range are kept as the last slice (if they pass
# the other rules) and growth stops. A mask that moved onto other tissue is under it (the lungs'
# bases: the liver's dome at 0-19% like the seed). With real weights (LiteMedSAM, benchmarks/
# accuracy_eval.py, mode a over 36 one-piece structures): mean 3D Dice 0.625 -> 0.629, free ends
# within +-1 slice on organs with a median-slice 2D Dice >= 0.85 5 -> 7 of 15 (all free organ ends
# 9 -> 11 of 36, total end error 122 -> 116 slices), tumour ends within +-2 still 10 of 10; the
# breast MR tumour 0.571 -> 0.717, the abdominal MR's left kidney 0.666 -> 0.689 (upper end -3 ->
# -2), the CT gallbladder's ends -1/-2 -> 0/-1; costs: the MR gallbladder's upper end +3 -> +4,
# the right putamen and left hippocampus -0.004. Floors of 0.2 and 0.0 gave 0.629 and 0.628 with a
# tumour end at +3 (9 of 10); 0.4 gave 0.625 and 6 of 15. Keeping the whole mask instead of its
# seed-like part gave 0.626.
DEFAULT_PARTIAL_END_SHARE = 0.3

# FOOTPRINT_EVIDENCE. Where a structure ends as a thin part of its previous slice beside a larger one
# (a lung's base: a crescent around the liver's or the stomach's dome), the box around the previous
# mask holds the larger structure and the model draws that instead; the appearance rule sees it
# (under DEFAULT_PARTIAL_END_SHARE like the seed: 0-19% on the lungs' bases) and growth stopped 3-7
# slices short. There growth now goes on without the model, inside the previous mask: its pixels
# that look more like the seed than like the tissue the model drew (inside the seed's range and
# nearer the seed mask's median than that tissue's). Each next slice is the same inside this one, so
# the masks only shrink, and growth stops where one keeps under DEFAULT_MIN_FOOTPRINT_SHARE of the
# previous slice's area (or under min_area), that slice dropped. Only where the look alone stopped
# growth, as for the partial-volume end. With real weights (LiteMedSAM, benchmarks/accuracy_eval.py,
# mode a over 36 one-piece structures): the chest CT's lungs' lower ends -4/-3 -> -1/0 (0.915/0.960
# -> 0.930/0.967), the abdominal CT's right lung base -7 -> 0 (0.757 -> 0.910), crescent slices at
# slice Dice 0.75-0.96; free ends within +-1 on organs with a median-slice 2D Dice >= 0.85 9 -> 12
# of 15, total error over 34 free organ ends 70 -> 64 slices; mean 3D Dice 0.640 -> 0.645; tumour
# ends still 10 of 10. The crescents kept 0.16-0.74 of the previous slice's area, slice to slice; at
# the ends of two tumours and a kidney the part found was 0.04-0.10 of the previous mask, tissue
# beside the end, which the floor drops (with no floor those ends went one or two slices further).
# Cost: the left putamen's lower end -1 -> +2 (0.635 -> 0.625), where the model had drawn the
# putamen (slice Dice 0.90) only 24% like the seed. Held out (48 other TotalSegmentator labels of
# the same CT and MR): the lung lobes' lower ends -4/-6 -> -1/+1, nothing else moved by more than a
# slice. Not where the score rule stops (on a full-size chest CT, masks half lung half dome): there
# it followed a lung to its base (-3 -> -1) but ran the left hippocampus 4 slices further (+3 -> +7).
DEFAULT_MIN_FOOTPRINT_SHARE = 0.15

# SCORE_RATIO_EVIDENCE. Past a structure's end a box-prompted model still finds a blob; where that
# blob looks like the seed (grey matter below the thalamus, brain tissue beyond a tumour) the
# appearance rule cannot see it, but the model's own score falls. With real LiteMedSAM weights
# (benchmarks/accuracy_eval.py, mode a, 20 one-piece structures: the CT sample, pyradiomics'
# tumours, the Colin27 MR regions), stopping where the score falls under 0.7 of the seed slice's:
# mean 3D Dice 0.570 -> 0.589, tumour ends within +-2 slices 9/10 -> 10/10 (the brain MR tumour's
# upper end +5 -> +1), thalami 0.535/0.539 -> 0.639/0.719 (lower ends +8/+15 -> +2/+2), total end
# error over 22 free organ ends 106 -> 85 slices; costs: 3 ends stop earlier (the brain's vertex
# end 0 -> -8 where the mask had already shrunk to a quarter of the brain, the right caudate
# 0 -> -3), lungs and bone unchanged. True slices scored 0.72-1.07 of their seed (the lowest a
# partial-volume end slice), the first slice past a tumour 0.47-1.03: a ratio, not an absolute
# score, because scores differ per structure (0.80-0.94 on the seeds). Only for models whose score
# was measured to rank masks (the predictor's `score_ranks_quality`, from the family's
# SCORE_RANKS_QUALITY; predictors without it, such as oracles, count as unmeasured).
DEFAULT_MIN_SCORE_RATIO = 0.7

# A mask more than this many times the previous slice's is a leak into a neighbour (StopRules.
# max_area_ratio has the oracle evidence); mode b's extent mask more than this many times the
# propagated one on the same slice is a leak too (EXTENT_LEAK_EVIDENCE).
DEFAULT_MAX_AREA_RATIO = 4.0

# STABILITY_EVIDENCE. On a structure, a box-prompted model draws the same mask when the box is a few
# pixels looser (MedSAM and LiteMedSAM were trained with each side moved out by 0-20 px at 1024
# scale); past its end the mask is whatever the box happens to frame, and a looser box frames
# something else. So every grown slice is also prompted with its box grown by STABILITY_GROW_1024
# (16 px at 1024 scale, 4 px in LiteMedSAM's 256 frame), and the IoU of the two masks is compared
# with the seed slice's own (a relative floor: structures differ, e.g. 0.54-0.59 on 4-pixel-wide
# adrenal glands, 0.97-0.99 on lungs and lung tumours). Growth stops where it falls under
# DEFAULT_MIN_STABILITY_RATIO of the seed's on two slices in a row; the first is kept (one unstable
# slice is often a partial-volume end), the second dropped. With real weights (LiteMedSAM,
# benchmarks/accuracy_eval.py, mode a over the 36 one-piece structures), median IoU on true slices
# 0.80-0.99 against 0.46-0.84 past the ends (no-stop trajectories). With the rule at 0.8: mean 3D
# Dice 0.629 -> 0.640, total error over 34 free organ ends 91 -> 70 slices, tumour ends within +-2
# still 10 of 10; cervical column 0.311 -> 0.533 (+17 -> -3 slices), left thalamus 0.569 -> 0.657
# (+8 -> +2), right thalamus 0.711 -> 0.761, left caudate 0.513 -> 0.538; costs: right putamen
# 0.585 -> 0.527, right hippocampus' upper end -3 -> -6. At 0.75: 0.638, the left thalamus still
# +8. Simulated on the trajectories, floors 0.65-0.85 all gained (0.633-0.641) and 0.9 lost
# (0.620); one slice alone under the floor as the stop cost a tumour end; dropping both slices gained
# less (0.629-0.636). Twelve structures held out of that tuning (TotalSegmentator's adrenal glands,
# bowel, portal vein, psoas and L1 labels on the same CT and MR) came out the same with the rule.
DEFAULT_MIN_STABILITY_RATIO = 0.8
STABILITY_GROW_1024 = 16.0

# BACKWARD_EVIDENCE. A mask that has slid onto a neighbour past a structure's end can look, score
# and hold under a looser box like the structure (the abdominal MR's gallbladder ran 4 slices into the
# tissue above it: 58-80% like the seed, score 0.74-0.89 of the seed's, looser-box IoU 0.62-0.89).
# Asking backwards tells: the slice just grown from is prompted again with the new mask's box (its
# box plus the margin, as a next slice would be). While the new mask is the structure, that box
# frames the structure on the slice before too and the model redraws that slice's mask; once the new
# mask is sliding onto a neighbour, the box frames the neighbour there and the redrawn mask leaves
# much of the slice's own out. Growth stops where that IoU falls under DEFAULT_MIN_BACKWARD_RATIO of
# the first grown slice's (per direction: structures differ) on two slices in a row; the first is
# kept, the second dropped, as for the stability rule. One decoder call more per slice (the slice's
# embedding is cached). With real weights (LiteMedSAM, benchmarks/accuracy_eval.py, mode a, all
# other rules on): IoU on true slices median 0.95 (5th percentile 0.69), past the ends 0.86 (0.44).
# Over the 36 one-piece structures mean 3D Dice 0.645 -> 0.652, free ends within +-1 slice on organs
# with a median-slice 2D Dice >= 0.85 12 -> 13 of 15, worst overshoot 4 -> 2 slices (the MR
# gallbladder's upper end +4 -> -1: 0.620 -> 0.763), the CT pancreas 0.208 -> 0.368 (+2/+5 ->
# -8/-3), tumour ends still 10 of 10 within +-2; costs: the whole brain's vertex end 0 -> -13
# (0.725 -> 0.680: its masks had shrunk to half the brain there and redraw smaller still), the body
# outline a slice short of the volume's edge (0.812 -> 0.804). Simulated on the same trajectories
# (exact: the rule only stops earlier), floors 0.75 and 0.85 gave 0.652 and 0.649; one low slice
# alone as the stop 0.643-0.654, with the brain's end at -18; the share of the slice's own mask
# redrawn instead of the IoU, 0.648-0.653. Held out (48 other TotalSegmentator labels of the same
# CT and MR, one run): mean 0.413 -> 0.415, an adrenal gland's lower end +13 -> +1, the duodenum
# 0.503 -> 0.599; costs on muscles that reach the volume's edge (an autochthon 0.749 -> 0.720).
# On 1 mm slices (the abdominal CT and MR resampled, 14 organs) 0.662 -> 0.670: the MR gallbladder
# 0.567 -> 0.727 (+7 -> -5), the MR stomach 0.543 -> 0.493 (17 slices short of the volume's edge).
# The Colin27 brain's every 1 mm slice (9 regions): 0.497 -> 0.519, the left thalamus 26 -> 6 slices
# past (0.468 -> 0.651), the whole brain's vertex end -20 -> -38 (0.725 -> 0.707).
DEFAULT_MIN_BACKWARD_RATIO = 0.8

# SEED_MASK_EVIDENCE. The Slicer effect grows the segment's own slice: a seed given as a mask, which
# the model was not asked about, so the score-ratio and stability rules had no reference and were
# off. The seed slice is now prompted with the box the next slices get (the mask's box plus the
# margin) and a looser one, and both rules hold. With real weights (LiteMedSAM, mode a from the
# model's own mask of the tight box on the median slice, as a user's box then "Propagate" gives,
# 36 one-piece structures of benchmarks/accuracy_eval.py): mean 3D Dice 0.620 -> 0.645 (0.640
# from the box itself), tumour ends within +-2 slices 8 -> 10 of 10 (a brain tumour's +5 -> +1),
# free organ ends within +-1 on organs with a median-slice 2D Dice >= 0.85 7 -> 9 of 15 (the
# thalami's lower ends +11/+14 -> +2/0), total error over 36 free organ ends 161 -> 101 slices.
# (propagation._seed_evidence asks the model.)


@dataclass
class StopRules:
    """When open-ended growth (modes a and d) stops, per direction. Defaults tuned on the CT sample
    with oracle predictors (benchmarks/propagation_eval.py, numbers in docs/accuracy.md):

    min_area: a mask smaller than this (pixels) stops and is dropped. 5 px removes the specks a
        box-prompted model leaves past a structure's end; dropping a true 2-19 px tail costs at most
        one slice at an end (the target is "within one slice").
    max_area_ratio: area growing by more than this factor vs the previous slice (a leak into a
        neighbour) stops and the slice is dropped; area collapsing by more than this factor stops
        but the slice is kept (structures taper at their ends; a collapsed mask is small either way).
        4 is the smallest value that reaches within one slice of every lung end on the sample
        (the left lung tapers 1508 -> 489 -> 110 -> 19 px: ratios 3.1, 4.4, 5.8).
    check_centroid: the mask's centroid outside the box it was prompted with (the previous mask's
        box plus margin) means the model jumped to another structure: stop, slice dropped.
    min_score: the model's quality score under this stops, slice dropped (None: off; MedSAM's IoU
        head is not calibrated, so it is off by default; oracles and remote engines may not score).
    max_slices: at most this many slices per direction beyond the seed (None: to the volume edge).
    min_appearance: with a real model the rules above rarely fire (a box-prompted model returns a
        plausible blob for any box, so growth ran past the lungs' bases into the abdomen), so the
        new mask must also look like the seed: the share of its pixels whose intensity (the slice
        as the model sees it, `predictor.image`) lies inside the seed mask's central 95% intensity
        range (2.5th-97.5th percentile). Under `min_appearance` the growth stops and the slice is
        dropped, or trimmed (partial_end_share) (None: off; skipped for predictors without
        `.image`, such as the oracles).
        Evidence at DEFAULT_MIN_APPEARANCE.
    min_score_ratio: the model's quality score on a new slice under this share of the seed slice's
        score stops, slice dropped (None: off; off for models whose score was not measured to rank
        masks; a seed given as a mask is scored as SEED_MASK_EVIDENCE says). Evidence at
        DEFAULT_MIN_SCORE_RATIO.
    partial_end_share: where only the appearance rule stops growth and the share is at least this
        much, the slice is a partial-volume end: its pixels like the seed are kept as the last slice
        (None: off). Evidence at DEFAULT_PARTIAL_END_SHARE.
    min_footprint_share: where only the look stopped growth and the mask is under partial_end_share
        like the seed (it moved onto other tissue), growth goes on without the model inside the
        previous mask (`Appearance.within`) while each slice keeps at least this share of the
        previous one's area (None: off). Evidence at DEFAULT_MIN_FOOTPRINT_SHARE.
    min_stability_ratio: each grown slice is prompted again with its box a little looser; where the
        two masks' IoU falls under this share of the seed slice's on two slices in a row, growth
        stops and the second is dropped (None: off; skipped for predictors without `.image`, such
        as the oracles). Evidence at DEFAULT_MIN_STABILITY_RATIO; a seed given as a mask at
        SEED_MASK_EVIDENCE.
    min_backward_ratio: the slice just grown from is prompted again with each new mask's box; where
        that mask's IoU with the slice's own falls under this share of the first grown slice's, on
        two slices in a row, growth stops and the second is dropped (None: off; skipped for
        predictors without `.image`). Evidence at DEFAULT_MIN_BACKWARD_RATIO.
    """

    min_area: int = 5
    max_area_ratio: float = DEFAULT_MAX_AREA_RATIO
    check_centroid: bool = True
    min_score: Optional[float] = None
    max_slices: Optional[int] = None
    min_appearance: Optional[float] = DEFAULT_MIN_APPEARANCE
    min_score_ratio: Optional[float] = DEFAULT_MIN_SCORE_RATIO
    partial_end_share: Optional[float] = DEFAULT_PARTIAL_END_SHARE
    min_footprint_share: Optional[float] = DEFAULT_MIN_FOOTPRINT_SHARE
    min_stability_ratio: Optional[float] = DEFAULT_MIN_STABILITY_RATIO
    min_backward_ratio: Optional[float] = DEFAULT_MIN_BACKWARD_RATIO


# Shares of seed-like pixels and ratios to the seed slice's own evidence: only 0 to 1 means anything.
_FRACTIONS = ("min_appearance", "partial_end_share", "min_score_ratio", "min_stability_ratio", "min_backward_ratio")


def check_rules(rules: Optional[StopRules]) -> StopRules:
    """`rules` (None: the defaults), checked before any slice is computed; a value that cannot mean
    anything (NaN fails every comparison, so `not x >= 0` catches it too) is an InputError."""
    rules = rules if rules is not None else StopRules()
    if not rules.min_area >= 0:
        raise InputError(f"min_area must not be negative, got {rules.min_area}")
    if rules.max_area_ratio is not None and not rules.max_area_ratio > 1.0:
        raise InputError(f"max_area_ratio must be above 1, got {rules.max_area_ratio}")
    if rules.max_slices is not None and not rules.max_slices >= 0:
        raise InputError(f"max_slices must not be negative, got {rules.max_slices}")
    if rules.min_score is not None and math.isnan(rules.min_score):
        raise InputError("min_score must be a number, got nan")
    for name in _FRACTIONS:
        value = getattr(rules, name)
        if value is not None and not 0 <= value <= 1:
            raise InputError(f"{name} must be between 0 and 1, got {value}")
    if rules.min_footprint_share is not None and not 0 < rules.min_footprint_share <= 1:
        raise InputError(f"min_footprint_share must be above 0 and at most 1 (None switches it off), "
                         f"got {rules.min_footprint_share}")
    return rules


class Appearance:
    """The seed's intensities as the model sees them: the central share `coverage` of the seed
    mask's pixel values. `share(image, mask)` is the fraction of a new mask's pixels inside that
    range: near 1 while the mask stays on the same tissue, near 0 when it has moved onto another
    (dark lung -> bright liver)."""

    def __init__(self, image: np.ndarray, mask: np.ndarray, coverage: float = 0.95):
        values = _grey(image)[np.asarray(mask, dtype=bool)]
        tail = 50.0 * (1.0 - coverage)
        self.low, self.median, self.high = (float(v) for v in np.percentile(values, [tail, 50.0, 100.0 - tail]))

    def like(self, image: np.ndarray) -> np.ndarray:
        """Which pixels of a slice lie inside the seed's intensity range."""
        values = _grey(image)
        return (values >= self.low) & (values <= self.high)

    @staticmethod
    def median_of(image: np.ndarray, mask: np.ndarray) -> float:
        """The median grey level of a slice under a (non-empty) mask: the look of what the model drew."""
        return float(np.median(_grey(image)[np.asarray(mask, dtype=bool)]))

    def within(self, image: np.ndarray, prev: np.ndarray, other: float) -> np.ndarray:
        """The pixels of `prev` (the previous slice's mask) on this slice that look more like the
        seed than like tissue of median grey level `other`: inside the seed's range and nearer its
        median (FOOTPRINT_EVIDENCE)."""
        values = _grey(image)
        nearer = np.abs(values - self.median) < np.abs(values - other)
        return np.asarray(prev, dtype=bool) & self.like(image) & nearer

    def share(self, image: np.ndarray, mask: np.ndarray) -> float:
        mask = np.asarray(mask, dtype=bool)
        return float(self.like(image)[mask].mean()) if mask.any() else 0.0


def judge(rules: StopRules, index: int, mask: np.ndarray, score, prev_area: int, box: Box2D,
          appearance_share: Optional[float] = None, seed_score: Optional[float] = None):
    """(keep this slice?, stop reason or None) for one new slice of open-ended growth."""
    if rules.min_score is not None and score is not None and score < rules.min_score:
        return False, f"low score {score:.2f} at slice {index}"
    ratio_floor = rules.min_score_ratio
    if ratio_floor is not None and score is not None and seed_score is not None and score < ratio_floor * seed_score:
        return False, f"score fell to {score / seed_score:.2f} of the seed's at slice {index}"
    area = int(mask.sum())
    if area == 0:
        return False, f"empty mask at slice {index}"
    if area < rules.min_area:
        return False, f"near-empty mask ({area} px) at slice {index}"
    if rules.check_centroid and not _inside_box(_centroid(mask), box):
        return False, f"left previous box at slice {index}"
    if rules.min_appearance is not None and appearance_share is not None and appearance_share < rules.min_appearance:
        return False, f"appearance changed ({100 * appearance_share:.0f}% like the seed) at slice {index}"
    ratio = rules.max_area_ratio
    if ratio is not None and prev_area > 0:
        if area > ratio * prev_area:
            return False, f"area jump ×{area / prev_area:.1f} at slice {index}"
        if area * ratio < prev_area:
            return True, f"area collapse ÷{prev_area / area:.1f} at slice {index}"
    return True, None


def is_partial_end(rules: StopRules, share: Optional[float]) -> bool:
    """Does a mask this much like the seed, stopped by the appearance rule, mark a partial-volume end?"""
    floor, ceiling = rules.partial_end_share, rules.min_appearance
    return None not in (floor, ceiling, share) and floor <= share < ceiling


def moved_on(rules: StopRules, share: Optional[float]) -> bool:
    """Has a mask the appearance rule stopped moved onto other tissue, so that growth goes on inside
    the previous mask (FOOTPRINT_EVIDENCE)? Under partial_end_share like the seed (or any share the
    appearance rule stops, with partial ends off)."""
    ceiling = rules.partial_end_share if rules.partial_end_share is not None else rules.min_appearance
    return None not in (rules.min_footprint_share, ceiling, share) and share < ceiling


def footprint_holds(rules: StopRules, area: int, prev_area: int) -> bool:
    """Does a mask found inside the previous one (FOOTPRINT_EVIDENCE) carry the structure on?"""
    return area >= rules.min_area and area >= rules.min_footprint_share * prev_area


def looser_box(box, slice_shape) -> Tuple[float, float, float, float]:
    """`box` with each side moved out by STABILITY_GROW_1024 (1024 scale per axis, so fractional
    slice pixels, as a model's own boxes may be), clipped to the slice."""
    h, w = int(slice_shape[0]), int(slice_shape[1])
    mx, my = STABILITY_GROW_1024 * w / 1024.0, STABILITY_GROW_1024 * h / 1024.0
    x0, y0, x1, y1 = (float(v) for v in box)
    return (max(0.0, x0 - mx), max(0.0, y0 - my), min(w - 1.0, x1 + mx), min(h - 1.0, y1 + my))


def _grey(image) -> np.ndarray:
    """A slice as grey levels (colour: the mean over channels)."""
    values = np.asarray(image)
    return values.mean(axis=-1) if values.ndim > 2 else values


def _inside_box(point: Tuple[float, float], box: Box2D) -> bool:
    x, y = point
    return box[0] - 0.5 <= x <= box[2] + 0.5 and box[1] - 0.5 <= y <= box[3] + 0.5


def _centroid(mask: np.ndarray) -> Tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(cols.mean()), float(rows.mean())
