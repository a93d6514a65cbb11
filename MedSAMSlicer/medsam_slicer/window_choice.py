"""The automatic CT window, chosen per structure by the model itself.

One CT window does not suit every structure: MedSAM's training window (400/40) fits abdominal
organs, but on slicerio's chest CT it gives LiteMedSAM a 2D Dice of 0.49-0.62 on the lungs where
1000/-500 gives 0.94-0.97, and 0.38-0.66 on the vertebral columns where bone windows give 0.72-0.89.
The model's own quality score tells them apart (the issue's sweep: over 5 windows on 6 lung slices
its predicted IoU picked the best window every time, rank correlation 0.89 with the true Dice). So
for CT, when the user asked for no window, each structure's seed slice is segmented with the user's
box under each candidate window and the best-scored window is kept (its embedding stays cached).

Measured on the sample's 6 one-piece structures (LiteMedSAM fp32; seed-slice Dice / mean Dice on
two other slices with their own boxes): right lung 0.97/0.98 picked vs 0.62/0.72 with 400/40, left
lung 0.90/0.97 vs 0.49/0.68, cervical column 0.86/0.81 vs 0.38/0.58, thoracic 0.72/0.73 vs
0.66/0.42, lumbar 0.55/0.63 vs 0.55/0.48, body outline 0.51/0.84 vs 0.48/0.57: never worse than the
training window, within 0.05 of the best window on the lungs, not on bone (the score ranks close
windows imperfectly). The training window keeps structures where no candidate beats it by
TIE_MARGIN: scores of near-identical windows differ by up to ~0.02 (1000/-500 vs 2000/0 on the
lungs), so a smaller lead is noise, and abdominal organs, for which MedSAM was trained on 400/40,
keep it unless the evidence is clear.

Only for models whose score was measured to rank windows (the family's `SCORE_RANKS_QUALITY`): ViT-B's
IoU head has not been measured on real weights here, so it keeps the training window. Non-CT data
(MR and others) keep their percentile window. Works with any session that has `set_window` and
`segment_slice` (local or remote).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .propagation import is_cancelled
from .windowing import IntensityWindow, from_width_level, looks_like_hounsfield

# (width, level): MedSAM's training window first (it wins ties), then lung, air-heavy, wide, bone and
# soft-tissue windows: the spread the CT presets and the published windows cover.
CANDIDATES: Tuple[Tuple[float, float], ...] = ((400, 40), (1000, -500), (1500, -600), (2000, 0), (1800, 400), (80, 40))
TIE_MARGIN = 0.03


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


def pick_window(session, axis: str, index: int, box, candidates: Optional[Sequence[Tuple[float, float]]] = None,
                cancel=None) -> Tuple[IntensityWindow, Dict[str, float]]:
    """Sets, and returns, the candidate window whose seed-slice mask the model scores highest (the
    first candidate, the training window, unless another leads by TIE_MARGIN); also the score per
    window ("W/L" -> score). cancel (an Event or a callable): checked before each candidate; once
    set, the pick is made among the candidates scored so far (scores then lists fewer windows)."""
    scores: Dict[str, float] = {}
    windows = []
    for width, level in candidates or CANDIDATES:
        if windows and is_cancelled(cancel):
            break
        window = from_width_level(width, level, f"{width:g}/{level:g}")
        session.set_window(window)
        _, score = session.segment_slice(axis, index, box)
        scores[window.name] = float(score) if score is not None else -np.inf
        windows.append(window)
    first = windows[0]
    best = max(windows, key=lambda w: scores[w.name])
    if scores[best.name] < scores[first.name] + TIE_MARGIN:  # a lead within the score's noise
        best = first
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
        print(f"{job.name or 'segment'}: window {window.name} chosen by the model's score on slice {index} ({listed})")
    return window
