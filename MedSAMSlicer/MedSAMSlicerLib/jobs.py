"""The effect's work on the inference thread: the session holder and the job functions.

Everything here runs on the worker thread (``worker.InferenceWorker``) and never touches MRML or Qt:
the main thread sends numpy arrays and plain values, the jobs send back numpy masks. A job's progress
payloads are tuples tagged by their first item:

    ("slice", index, mask, done, total)   a slice finished (propagation and the other 3D modes)
    ("status", text)                      something for the status line (the model is loading)

and its result is a dict: ``masks`` {index: bool (H, W)}, ``window`` (the IntensityWindow used),
``cancelled``, plus ``score`` (one slice) or ``stop_reasons`` (3D).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from . import intensity

SLICE, STATUS = "slice", "status"


class StaleImageError(RuntimeError):
    """A job arrived without the image and the holder has no session for it."""


def window_spec(choice: str, display_wl: Optional[Sequence[float]] = None,
                custom: Optional[Sequence[float]] = None) -> Tuple:
    """The intensity choice as plain values read on the main thread: (choice, display (W, L) or None,
    custom (W, L) or None). Hashable, so a job can tell whether the window changed."""
    choice = (choice or intensity.DISPLAY).lower()
    display_wl = tuple(float(v) for v in display_wl) if display_wl is not None and choice == intensity.DISPLAY else None
    custom = tuple(float(v) for v in custom) if custom is not None and choice == "custom" else None
    return (choice, display_wl, custom)


class SessionHolder:
    """The engine session for the current source image and intensity window (worker thread only).

    The main thread sends the image's array with the first job on an image (or after new engine
    settings), and None with the jobs after it; the holder keeps that array so the window can be
    computed again when the user picks another one (MR percentiles and "automatic" scan the voxels).
    """

    def __init__(self):
        self.key = None
        self.session = None
        self.volume = None
        self.spec = None
        self.window = None

    def get(self, provider, key, volume, spec, status=None):
        """(session, IntensityWindow). key: identifies the image and the engine settings; volume: the
        image as a [k, j, i] array, or None when the main thread believes the holder has it; spec:
        ``window_spec(...)``; status(text): tells the user what is loading."""
        spec = tuple(spec)
        if volume is not None or self.session is None or self.key != key:
            if volume is None:
                raise StaleImageError("the source image changed since the last box: draw the box again")
            self.close()
            window = intensity.window_for(spec[0], volume, display_wl=spec[1], custom=spec[2])
            self.session = provider.session(volume, window, status=status)
            self.key, self.volume, self.spec, self.window = key, volume, spec, window
        elif spec != self.spec:
            window = intensity.window_for(spec[0], self.volume, display_wl=spec[1], custom=spec[2])
            if getattr(self.session, "window", None) != window:
                self.session.set_window(window)
            self.spec, self.window = spec, window
        return self.session, self.window

    def close(self) -> None:
        session, self.session = self.session, None
        self.key = self.volume = self.spec = self.window = None
        if session is not None:
            session.close()


def _status(job):
    return lambda text: job.report((STATUS, str(text)))


def slice_job(job, holder, provider, key, volume, spec, axis, index, box):
    """One box on one slice."""
    session, window = holder.get(provider, key, volume, spec, status=_status(job))
    if job.cancelled:
        return {"masks": {}, "score": None, "window": window, "cancelled": True}
    mask, score = session.segment_slice(axis, index, box)
    focus = getattr(session, "focus", None)
    if callable(focus):  # the next prompt is usually a neighbour: embed them in the background
        focus(axis, index)
    return {"masks": {int(index): mask}, "score": score, "window": window, "cancelled": False}


def stop_rules(max_slices, overrides=None):
    """medsam_slicer's StopRules with the effect's "Max slices" (0: no limit) and field overrides."""
    from medsam_slicer.propagation import StopRules

    options = dict(overrides or {})
    options["max_slices"] = int(max_slices) if max_slices and max_slices > 0 else None
    return StopRules(**options)


def volume_job(job, holder, provider, key, volume, spec, kind, axis, args, max_slices=0, rule_overrides=None):
    """The 3D modes; every finished slice is reported as ("slice", index, mask, done, total).

    kind / args: "propagate" (seed_index, seed_box, seed_mask, direction), "box3d" (box2d, first,
    last), "keys" ({index: box},), "repropagate" (masks, corrected_index, corrected_mask, seed_index).
    """
    session, window = holder.get(provider, key, volume, spec, status=_status(job))

    def progress(index, mask, done, total):
        job.report((SLICE, int(index), mask, int(done), int(total)))

    common = dict(progress=progress, cancel=job.cancel_event)
    if kind == "propagate":
        seed_index, seed_box, seed_mask, direction = args
        result = session.propagate(axis, seed_index, seed_box=seed_box, seed_mask=seed_mask, direction=direction,
                                   rules=stop_rules(max_slices, rule_overrides), **common)
    elif kind == "box3d":
        box2d, first, last = args
        result = session.segment_box3d(axis, box2d, first, last, **common)
    elif kind == "keys":
        (key_boxes,) = args
        result = session.segment_key_slices(axis, key_boxes, **common)
    elif kind == "repropagate":
        masks, corrected_index, corrected_mask, seed_index = args
        result = session.repropagate(axis, masks, corrected_index, corrected_mask, seed_index,
                                     rules=stop_rules(max_slices, rule_overrides), **common)
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    return {"masks": dict(result.masks), "stop_reasons": dict(result.stop_reasons), "cancelled": bool(result.cancelled),
            "window": window}


def close_job(job, holder):
    """Closes the holder's session on the worker (its background prefetch stops)."""
    holder.close()
