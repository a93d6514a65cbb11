"""The automatic CT window, chosen per structure by the model itself.

One CT window does not suit every structure: MedSAM's training window (400/40) fits abdominal
organs, but on slicerio's chest CT it gives LiteMedSAM a 2D Dice of 0.49-0.62 on the lungs where
1000/-500 gives 0.94-0.97, and 0.38-0.66 on the vertebral columns where bone windows give 0.72-0.89.
The model's own quality score tells them apart (the issue's sweep: over 5 windows on 6 lung slices
its predicted IoU picked the best window every time, rank correlation 0.89 with the true Dice). So
for CT, when the user asked for no window, each structure's seed slice and its neighbours are
segmented with the user's box under each candidate window and the window with the best evidence is
kept (its embeddings stay cached).

The evidence is the score averaged over the seed slice and its two neighbours, all prompted with
the seed's box (the structure nearly always continues one slice either way, and one slice's score
ranks close windows imperfectly: its noise is a few hundredths), times how well the seed slice's
mask fills the box it was prompted with (the IoU of the mask's bounding box with the box: BOX_FIT_EVIDENCE),
times how strong an edge the seed mask's outline follows in the image (EDGE_EVIDENCE) and the share of
the seed mask the window does not draw flat white (WHITE_EVIDENCE). The last two need the session's
volume (a local session); without it the evidence is score x fit.

BOX_FIT_EVIDENCE. The score says how sure the model is of the mask it drew, not that the mask is the
structure the box was drawn around. A box around a thin structure holds a larger one that the model
segments with more confidence: on a lung base (the crescent around the liver's dome, TotalSegmentator's
abdominal CT, lungs taken as the air below -400 HU inside the body) the dome under 80/40 scored 0.91
(2D Dice 0.00) against the crescent's 0.72 under 1000/-500 (0.90); on the chest CT's body outline, whose
label leaves out the lungs, 1000/-500 scored best with a mask that takes them in (0.55 against 0.84 for
1500/-600). A tight box is the structure's own extent (MedSAM was trained on boxes 0-20 px outside the
mask at 1024 scale), so a mask whose extent differs from the box answers another question. Measured
(LiteMedSAM fp32; the pick's tight-box 2D Dice, mean over up to 9 slices; 17 CT structures: the 15
one-piece ones of the evaluation and two lung bases; five boxes each: the tight box and four jittered
outward by 0-20 or 0-40 px at 1024 scale): score alone 0.671 mean, score x fit of the seed slice 0.739
(better on 38 of 85 structure-boxes, worse by more than 0.02 on 11, worst -0.17 on the thoracic column);
the fit averaged over all three slices 0.734, the fit alone 0.727. Against the best preset per class,
mean over the five boxes: lungs +0.07 -> +0.12, body outline -0.29 -> 0.00, lung tumours -0.04 -> -0.02,
abdominal organs -0.03 -> -0.01, lung bases -0.28 -> 0.00, vertebral columns -0.05 -> -0.06.

EDGE_EVIDENCE and WHITE_EVIDENCE. Score and fit are both the model's view of its own mask; neither
says the mask's border lies on a border of the image. The vertebral columns showed it: under a
soft-tissue window the model draws one blob over a vertebra's body and its posterior elements, scored
and fitting the box well, whose outline runs through bone that the window shows flat white; under a
bone window it follows the bone's edges. So the evidence is multiplied by the mean HU gradient on the
seed mask's outline (the pixels either side of its border; HU clipped to -1000..1500 so that metal
cannot swamp it) and by the share of the mask below the window's top (a mask 60-97% white under 80/40
is drawn on tissue the model could not see). Measured as the fit was (LiteMedSAM fp32, pick's 2D Dice,
mean over up to 9 slices), on 49 CT structures: 16 of the evaluation's (the lung bases among them; not the
pancreas, in pieces) and 33 held-out TotalSegmentator labels of its abdominal CT (vertebrae, ribs, vessels, muscles,
lung lobes, bowel). Tight boxes: score x fit 0.656 mean, x edge 0.668, x white share 0.660, both 0.671;
against the best preset per class (12 classes), the worst class -0.091 (the columns) -> -0.018, every
class within 0.03 (vertebrae -0.080 -> -0.012, vessels -0.075 -> -0.005). Boxes jittered outward by
0-20 px at 1024 scale: 0.626 -> 0.654 (worst class -0.115 -> -0.064, ribs); 0-40 px: 0.569 -> 0.627
(-0.248 -> -0.144). Tried: other powers and square roots of either term, the edge relative to the
mask's interior gradient, hard limits on the clipped share instead of a factor: none better. In 3D it
costs where bone goes on past a label (docs/accuracy.md, "The automatic window").

Before the fit, the seed slice's score alone gave 0.781 mean Dice over 14 of these structures (tight
boxes) and the mean over the seed and its neighbours 0.798 (bone 0.07 -> 0.02 short of the best
window, spleen 0.857 -> 0.938).

Ties are not given to the training window (400/40): a lead of up to 0.03 used to keep it, to
protect abdominal organs. With the neighbours' evidence that rule changed no pick on the abdominal
CT (its organs end 0.01 above ct-abdomen's mean either way), while it kept the lung tumours in
400/40 (0.765 against 0.896 picked without it; 2000/0 gives 0.911). The training window is still
the first candidate, so an exact tie goes to it.

Only for models whose score was measured to rank windows (the family's `SCORE_RANKS_QUALITY`): ViT-B's
IoU head has not been measured on real weights here, so it keeps the training window. Non-CT data
(MR and others) keep their percentile window. Works with any session that has `set_window` and
`segment_slice` (local or remote).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .propagation import intersect_boxes, is_cancelled
from .slicing import get_slice, mask_bbox, slice_count
from .windowing import IntensityWindow, from_width_level, looks_like_hounsfield

# (width, level): MedSAM's training window first (it wins ties), then lung, air-heavy, wide, bone and
# soft-tissue windows: the spread the CT presets and the published windows cover.
CANDIDATES: Tuple[Tuple[float, float], ...] = ((400, 40), (1000, -500), (1500, -600), (2000, 0), (1800, 400), (80, 40))
NEIGHBOURS = 1  # slices either side of the seed whose scores join the seed's
EDGE_CLIP = (-1000.0, 1500.0)  # air to dense bone: metal streaks would otherwise swamp the edges


def model_picks_window(engine, volume: np.ndarray) -> bool:
    family = getattr(engine, "family", None)
    return bool(getattr(family, "SCORE_RANKS_QUALITY", False)) and volume.ndim == 3 and looks_like_hounsfield(volume)


def seed_of(job) -> Tuple[int, Tuple[int, int, int, int]]:
    """(slice, 2D box) a job starts from: its slice, a 3D box's middle slice, the largest key box."""
    if getattr(job, "keys", None):
        index, box = max(job.keys.items(), key=lambda kv: (kv[1][2] - kv[1][0] + 1) * (kv[1][3] - kv[1][1] + 1))
        return int(index), tuple(box)
    if job.mode == "box3d":
        return (job.first + job.last) // 2, tuple(job.box2d)
    return int(job.first), tuple(job.box2d)


def evidence_slices(session, axis: str, index: int) -> List[int]:
    """The seed slice and its neighbours inside the volume (the seed alone if the session has no volume)."""
    volume = getattr(session, "volume", None)
    if volume is None:
        return [index]
    count = slice_count(volume.shape, axis)
    return [k for k in range(index - NEIGHBOURS, index + NEIGHBOURS + 1) if 0 <= k < count]


def box_fit(mask: np.ndarray, box) -> float:
    """IoU of a 2D mask's bounding box with the inclusive (x0, y0, x1, y1) box it was prompted with;
    0 for an empty mask (BOX_FIT_EVIDENCE)."""
    extent = mask_bbox(mask)
    if extent is None:
        return 0.0

    def area(b) -> int:
        return 0 if b is None else (b[2] - b[0] + 1) * (b[3] - b[1] + 1)

    inter = area(intersect_boxes(extent, tuple(box)))
    return inter / float(area(extent) + area(box) - inter)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels on either side of a 2D mask's border: those whose value differs from a 4-neighbour's."""
    band = np.zeros(mask.shape, bool)
    for axis in (0, 1):
        step = np.diff(mask.astype(np.int8), axis=axis) != 0
        lead = [slice(None)] * 2
        lead[axis] = slice(0, -1)
        band[tuple(lead)] |= step
        lead[axis] = slice(1, None)
        band[tuple(lead)] |= step
    return band


def edge_strength(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean intensity gradient (HU per pixel, the image clipped to air..dense bone) on the mask's
    outline; 0 for an empty or full mask (EDGE_EVIDENCE)."""
    band = outline(mask)
    if not band.any():
        return 0.0
    clipped = np.clip(np.asarray(image, np.float32), EDGE_CLIP[0], EDGE_CLIP[1])
    gy, gx = np.gradient(clipped)
    return float(np.hypot(gy, gx)[band].mean())


def white_share(image: np.ndarray, mask: np.ndarray, window: IntensityWindow) -> float:
    """Share of the mask's pixels at or above the window's top, drawn flat white (WHITE_EVIDENCE)."""
    count = int(mask.sum())
    return float((np.asarray(image)[mask] >= window.high).sum()) / count if count else 0.0


def pick_window(session, axis: str, index: int, box, candidates: Optional[Sequence[Tuple[float, float]]] = None,
                cancel=None) -> Tuple[IntensityWindow, Dict[str, float]]:
    """Sets, and returns, the candidate window with the best evidence (the first candidate, the
    training window, on an exact tie), and the evidence per window ("W/L" -> value): the mean score
    of its masks on the seed slice and its neighbours (all prompted with `box`) times the seed
    mask's box fit (BOX_FIT_EVIDENCE), edge strength and unclipped share (EDGE_ and WHITE_EVIDENCE; with
    a session's volume only), relative to the pick's (1.0; the edge is in HU per pixel). cancel (an Event or a callable): checked before each
    candidate; once set, the pick is made among the candidates scored so far (fewer windows)."""
    evidence: Dict[str, float] = {}
    windows = []
    slices = evidence_slices(session, axis, index)
    volume = getattr(session, "volume", None)
    image = None if volume is None else get_slice(volume, axis, index)
    for width, level in candidates or CANDIDATES:
        if windows and is_cancelled(cancel):
            break
        window = from_width_level(width, level, f"{width:g}/{level:g}")
        session.set_window(window)
        each = {k: session.segment_slice(axis, k, box) for k in slices}
        scores = [score for _, score in each.values()]
        seed = each[index][0]
        value = -np.inf if any(v is None for v in scores) else float(np.mean(scores)) * box_fit(seed, box)
        if image is not None and np.isfinite(value):
            value *= edge_strength(image, seed) * (1.0 - white_share(image, seed, window))
        evidence[window.name] = value
        windows.append(window)
    best = max(windows, key=lambda w: evidence[w.name])  # the first of equals: the training window first
    top = evidence[best.name]
    if image is not None and np.isfinite(top) and top > 0:  # the edge is in HU per pixel: shown relative to the pick's
        evidence = {name: value / top for name, value in evidence.items()}
    session.set_window(best)
    return best, evidence


def window_for_job(session, volume: np.ndarray, axis: str, job, default: IntensityWindow, quiet: bool = False
                   ) -> IntensityWindow:
    """The window a job runs with: the model's pick on its seed slice where it applies, else `default`."""
    engine = getattr(session, "engine", None)
    if engine is None or not model_picks_window(engine, volume):
        session.set_window(default)
        return default
    index, box = seed_of(job)
    window, evidence = pick_window(session, axis, index, box)
    if not quiet:
        listed = ", ".join(f"{name} {value:.2f}" for name, value in evidence.items())
        print(f"{job.name or 'segment'}: window {window.name} chosen by the model around slice {index} "
              f"(evidence relative to the pick: {listed})")
    return window
