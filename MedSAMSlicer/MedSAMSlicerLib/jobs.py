"""The effect's work on the inference thread: the session holder and the job functions.

Everything here runs on the worker thread (``worker.InferenceWorker``) and never touches MRML or Qt:
the main thread sends numpy arrays and plain values, the jobs send back numpy masks. A job's progress
payloads are tuples tagged by their first item:

    ("slice", index, mask, done, total)   a slice finished (propagation and the other 3D modes)
    ("status", text)                      something for the status line (the model is loading)

and its result is a dict: ``masks`` {index: bool (H, W)}, ``window`` (the IntensityWindow used),
``window_note`` (how it was chosen, or None), ``cancelled``, plus ``score`` (one slice) or
``stop_reasons`` (3D).

The automatic window (intensity.AUTO) follows the command line: on CT, with a model whose score ranks
windows, the model picks the window for a structure (the segment being edited) on the first job's
seed slice and box (medsam_slicer.window_choice.pick_window); the holder remembers the pick per image
and structure, so later jobs on that segment reuse it, and another segment gets its own.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

from . import intensity

SLICE, STATUS = "slice", "status"


class SourceImage(NamedTuple):
    """What the main thread sends with the first job on an image: its voxels ([k, j, i] array) and
    their spacing (i, j, k mm), which propagation uses to keep its boxes steady on thin slices."""

    array: Any
    spacing: Optional[Tuple[float, float, float]] = None


class StaleImageError(RuntimeError):
    """A job arrived without the image and the holder has no session for it."""


def window_spec(choice: str, display_wl: Optional[Sequence[float]] = None,
                custom: Optional[Sequence[float]] = None, structure=None) -> Tuple:
    """The intensity choice as plain values read on the main thread: (choice, display (W, L) or None,
    custom (W, L) or None, structure). Hashable. structure: what an automatic window is picked for
    (the runner sets it to the target segment, see for_structure); None: picked per job, not kept."""
    choice = (choice or intensity.DEFAULT).lower()
    display_wl = tuple(float(v) for v in display_wl) if display_wl is not None and choice == intensity.DISPLAY else None
    custom = tuple(float(v) for v in custom) if custom is not None and choice == "custom" else None
    return (choice, display_wl, custom, structure)


def for_structure(spec, structure) -> Tuple:
    """`spec` (from window_spec) for a job on `structure`, e.g. (segmentation node ID, segment ID)."""
    return tuple(spec)[:3] + (structure,)


def job_seed(kind: str, args) -> Optional[Tuple[int, Tuple[int, int, int, int]]]:
    """(slice, 2D box) a job starts from, as window_choice.seed_of has it for the command line's jobs:
    a box's slice, the propagation seed (its box, else its mask's bounding box), a 3D box's middle
    slice, the largest key box; a re-propagation starts from the corrected slice. None: no seed."""
    from medsam_slicer.slicing import mask_bbox
    from medsam_slicer.window_choice import seed_of

    def from_mask(index, mask):
        found = mask_bbox(mask) if mask is not None else None
        return None if found is None else (int(index), tuple(int(v) for v in found))

    if kind == "slice":
        index, box = args
        return seed_of(SimpleNamespace(keys=None, mode="slice", first=index, last=index, box2d=box))
    if kind == "propagate":
        seed_index, seed_box, seed_mask, _ = args
        if seed_box is None:
            return from_mask(seed_index, seed_mask)
        return seed_of(SimpleNamespace(keys=None, mode="propagate", first=seed_index, last=seed_index, box2d=seed_box))
    if kind == "box3d":
        box2d, first, last = args
        return seed_of(SimpleNamespace(keys=None, mode="box3d", first=first, last=last, box2d=box2d))
    if kind == "keys":
        (key_boxes,) = args
        return seed_of(SimpleNamespace(keys=dict(key_boxes), mode="keys")) if key_boxes else None
    if kind == "repropagate":
        _, corrected_index, corrected_mask, _ = args
        return from_mask(corrected_index, corrected_mask)
    return None


class SessionHolder:
    """The engine session for the current source image and intensity window (worker thread only).

    The main thread sends the image's array with the first job on an image (or after new engine
    settings), and None with the jobs after it; the holder keeps that array so the window can be
    computed again when the user picks another one (MR percentiles and "automatic" scan the voxels).
    It also keeps the windows the model picked per structure for that image and engine (`picks`).
    """

    def __init__(self):
        self.key = None
        self.session = None
        self.volume = None
        self.spec = None
        self.window = None
        self.picks: Dict[object, object] = {}  # structure -> IntensityWindow the model picked (for self.key)
        self._model_picks = None  # model_picks_window for this session and image, once computed

    def get(self, provider, key, volume, spec, status=None, axis=None, seed=None, cancel=None):
        """(session, IntensityWindow, note), the session set to that window. key: identifies the image
        and the engine settings; volume: the image (a SourceImage), or None when the main thread
        believes the holder has it; spec: ``window_spec(...)``; status(text): tells the user what is
        loading (or that the model is choosing the window); axis, seed: where the job starts ((slice,
        2D box), see job_seed), for the window the model picks; cancel: the job's cancel event (a
        cancelled pick is not remembered). note: how the window was chosen, for the status line, or None."""
        spec = tuple(spec)
        choice = spec[:3]
        structure = spec[3] if len(spec) > 3 else None
        if volume is not None or self.session is None or self.key != key:
            if volume is None:
                raise StaleImageError("the source image changed since the last box: draw the box again")
            self._close_session()
            if key != self.key:
                self.picks = {}  # another image, or another model: its picks do not carry over
            window = intensity.window_for(choice[0], volume.array, display_wl=choice[1], custom=choice[2])
            self.session = provider.session(volume.array, window, status=status, spacing=volume.spacing)
            self.key, self.volume, self.spec, self.window = key, volume.array, choice, window
        elif choice != self.spec:
            self.window = intensity.window_for(choice[0], self.volume, display_wl=choice[1], custom=choice[2])
            self.spec = choice
        window, note = self.window, None
        if choice[0] == intensity.AUTO and self.model_picks():
            window, note = self._picked(structure, axis, seed, status, cancel)
        if getattr(self.session, "window", None) != window:
            self.session.set_window(window)
        return self.session, window, note

    def model_picks(self) -> bool:
        """The model picks the automatic window here: CT and a model whose score ranks windows."""
        if self._model_picks is None:
            from medsam_slicer.window_choice import model_picks_window

            engine = getattr(self.session, "engine", None)
            self._model_picks = engine is not None and model_picks_window(engine, self.volume)
        return self._model_picks

    def _picked(self, structure, axis, seed, status=None, cancel=None):
        """(window, note): the structure's remembered pick, else the model's pick on the seed."""
        picked = self.picks.get(structure) if structure is not None else None
        if picked is not None:
            return picked, "the model's pick for this segment"
        if seed is None or axis is None:
            return self.window, None
        from medsam_slicer.window_choice import CANDIDATES, pick_window

        index, box = seed
        if status is not None:
            status(f"choosing the window for this segment on slice {index} ({len(CANDIDATES)} candidates)...")
        picked, scores = pick_window(self.session, axis, int(index), tuple(int(v) for v in box), cancel=cancel)
        if len(scores) < len(CANDIDATES):  # cancelled part way: not a pick to remember
            return picked, None
        if structure is not None:
            self.picks[structure] = picked
        return picked, f"picked by the model on slice {index}"

    def _close_session(self) -> None:
        session, self.session = self.session, None
        self._model_picks = None
        if session is not None:
            session.close()

    def close(self) -> None:
        self._close_session()
        self.key = self.volume = self.spec = self.window = None
        self.picks = {}


def _status(job):
    return lambda text: job.report((STATUS, str(text)))


def slice_job(job, holder, provider, key, volume, spec, axis, index, box):
    """One box on one slice."""
    session, window, note = holder.get(provider, key, volume, spec, status=_status(job), axis=axis,
                                       cancel=getattr(job, "cancel_event", None),
                                       seed=job_seed("slice", (index, box)))
    if job.cancelled:
        return {"masks": {}, "score": None, "window": window, "window_note": note, "cancelled": True}
    mask, score = session.segment_slice(axis, index, box)
    focus = getattr(session, "focus", None)
    if callable(focus):  # the next prompt is usually a neighbour: embed them in the background
        focus(axis, index)
    return {"masks": {int(index): mask}, "score": score, "window": window, "window_note": note, "cancelled": False}


def stop_rules(max_slices, overrides=None):
    """medsam_slicer's StopRules with the effect's "Max slices" (0: no limit) and field overrides."""
    from medsam_slicer.stop_rules import StopRules

    options = dict(overrides or {})
    options["max_slices"] = int(max_slices) if max_slices and max_slices > 0 else None
    return StopRules(**options)


def volume_job(job, holder, provider, key, volume, spec, kind, axis, args, max_slices=0, rule_overrides=None,
               protected=None):
    """The 3D modes; every finished slice is reported as ("slice", index, mask, done, total).

    kind / args: "propagate" (seed_index, seed_box, seed_mask, direction), "box3d" (box2d, first,
    last), "keys" ({index: box},), "repropagate" (masks, corrected_index, corrected_mask, seed_index).
    protected: bool [k, j, i] where the editor lets nothing be written (writing.protected_area), or
    None; open-ended growth (propagate, repropagate) ends where it runs into it
    (medsam_slicer.propagation.PROTECTED_EVIDENCE).
    """
    from medsam_slicer.slicing import get_slice

    session, window, note = holder.get(provider, key, volume, spec, status=_status(job), axis=axis,
                                       cancel=getattr(job, "cancel_event", None),
                                       seed=job_seed(kind, args))

    def progress(index, mask, done, total):
        job.report((SLICE, int(index), mask, int(done), int(total)))

    def area(index):
        return get_slice(protected, axis, index)

    common = dict(progress=progress, cancel=job.cancel_event)
    grown = dict(protected=area) if protected is not None else {}  # open-ended growth only
    if kind == "propagate":
        seed_index, seed_box, seed_mask, direction = args
        result = session.propagate(axis, seed_index, seed_box=seed_box, seed_mask=seed_mask, direction=direction,
                                   rules=stop_rules(max_slices, rule_overrides), **common, **grown)
    elif kind == "box3d":
        box2d, first, last = args
        result = session.segment_box3d(axis, box2d, first, last, **common)
    elif kind == "keys":
        (key_boxes,) = args
        result = session.segment_key_slices(axis, key_boxes, **common)
    elif kind == "repropagate":
        masks, corrected_index, corrected_mask, seed_index = args
        result = session.repropagate(axis, masks, corrected_index, corrected_mask, seed_index,
                                     rules=stop_rules(max_slices, rule_overrides), **common, **grown)
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    return {"masks": dict(result.masks), "stop_reasons": dict(result.stop_reasons), "cancelled": bool(result.cancelled),
            "window": window, "window_note": note}


def close_job(job, holder):
    """Closes the holder's session on the worker (its background prefetch stops)."""
    holder.close()
