"""The automatic CT window, chosen per structure by the model itself.

One CT window does not suit every structure: MedSAM's training window (400/40) fits abdominal
organs, but on slicerio's chest CT it gives LiteMedSAM a 2D Dice of 0.49-0.62 on the lungs where
1000/-500 gives 0.94-0.97, and 0.38-0.66 on the vertebral columns where bone windows give 0.72-0.89.
The model's own quality score tells them apart (the issue's sweep: over 5 windows on 6 lung slices
its predicted IoU picked the best window every time, rank correlation 0.89 with the true Dice). So
for CT, when the user asked for no window, each structure's seed slice and its neighbours are
segmented with the user's box under each candidate window and the best-scored window is kept (its
embeddings stay cached).

The evidence is the score averaged over the seed slice and its two neighbours, all prompted with
the seed's box: the structure nearly always continues one slice either way, and one slice's score
ranks close windows imperfectly (its noise is a few hundredths). Measured (LiteMedSAM fp32, 2D Dice
of the picked window, mean over up to 9 slices per structure with tight boxes, against the best
of the presets and 1000/-500 and 2000/0 per structure class; 14 structures: the CT sample's lungs,
vertebral columns and body outline, pyradiomics' two lung tumours, TotalSegmentator's abdominal
CT with spleen, kidneys, gallbladder, liver and stomach): seed slice only 0.781 mean Dice (short by
0.10 lungs, 0.07 bone, 0.29 body outline, 0.02 lung tumours, 0.01 abdominal organs); seed and
neighbours 0.798 (bone 0.07 -> 0.02, spleen 0.857 -> 0.938; the others unchanged). Lungs and the
body outline stay short: every score there prefers a window that is not the best.

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

from .propagation import is_cancelled
from .slicing import slice_count
from .windowing import IntensityWindow, from_width_level, looks_like_hounsfield

# (width, level): MedSAM's training window first (it wins ties), then lung, air-heavy, wide, bone and
# soft-tissue windows: the spread the CT presets and the published windows cover.
CANDIDATES: Tuple[Tuple[float, float], ...] = ((400, 40), (1000, -500), (1500, -600), (2000, 0), (1800, 400), (80, 40))
NEIGHBOURS = 1  # slices either side of the seed whose scores join the seed's


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


def pick_window(session, axis: str, index: int, box, candidates: Optional[Sequence[Tuple[float, float]]] = None,
                cancel=None) -> Tuple[IntensityWindow, Dict[str, float]]:
    """Sets, and returns, the candidate window whose masks on the seed slice and its neighbours
    (all prompted with `box`) the model scores highest on average (the first candidate, the training
    window, on an exact tie); also the mean score per window ("W/L" -> score). cancel (an Event or a
    callable): checked before each candidate; once set, the pick is made among the candidates scored
    so far (scores then lists fewer windows)."""
    scores: Dict[str, float] = {}
    windows = []
    slices = evidence_slices(session, axis, index)
    for width, level in candidates or CANDIDATES:
        if windows and is_cancelled(cancel):
            break
        window = from_width_level(width, level, f"{width:g}/{level:g}")
        session.set_window(window)
        each = [session.segment_slice(axis, k, box)[1] for k in slices]
        scores[window.name] = -np.inf if any(v is None for v in each) else float(np.mean(each))
        windows.append(window)
    best = max(windows, key=lambda w: scores[w.name])  # the first of equals: the training window first
    session.set_window(best)
    return best, scores


def window_for_job(session, volume: np.ndarray, axis: str, job, default: IntensityWindow, quiet: bool = False
                   ) -> IntensityWindow:
    """The window a job runs with: the model's pick on its seed slice where it applies, else `default`."""
    engine = getattr(session, "engine", None)
    if engine is None or not model_picks_window(engine, volume):
        session.set_window(default)
        return default
    index, box = seed_of(job)
    window, scores = pick_window(session, axis, index, box)
    if not quiet:
        listed = ", ".join(f"{name} {score:.2f}" for name, score in scores.items())
        print(f"{job.name or 'segment'}: window {window.name} chosen by the model's score around slice {index} ({listed})")
    return window
