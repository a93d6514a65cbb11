"""`medsam-slicer segment`: validate everything, then load the model, segment and write atomically."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import InputError
from .slicing import Box3D, check_axis, get_slice, mask_iou, slice_index


@dataclasses.dataclass
class Job:
    """One output segment: a single slice, a grow-from-slice, a 3D box or a set of key slices."""

    name: str
    mode: str  # "slice" | "propagate" | "box3d" | "keys"
    box2d: Optional[Tuple[int, int, int, int]] = None
    first: int = 0
    last: int = 0
    keys: Optional[Dict[int, Tuple[int, int, int, int]]] = None


def box_job(values, shape_kji, axis: str, propagate: bool = False, name: str = "") -> Job:
    """One --box: a flat box segments its slice (or grows from it), a spanning box is a 3D box."""
    box = Box3D.from_corners(values, shape_kji)
    first, last = box.slice_range(axis)
    if first == last:
        mode = "propagate" if propagate else "slice"
    else:
        mode = "box3d"
    return Job(name, mode, box.in_plane(axis), first, last)


def key_boxes_job(boxes, shape_kji, axis: str, name: str = "", flag: str = "--key-box") -> Job:
    """Key boxes of ONE structure, each flat along the axis, on at least two different slices."""
    keys: Dict[int, Tuple[int, int, int, int]] = {}
    for values in boxes:
        box = Box3D.from_corners(values, shape_kji)
        first, last = box.slice_range(axis)
        if first != last:
            raise InputError(f"{flag} {' '.join(str(int(v)) for v in values)} spans slices {first}-{last}: "
                             f"a key box lies on one slice along {axis}")
        if first in keys:
            raise InputError(f"two key boxes on slice {first}")
        keys[first] = box.in_plane(axis)
    if len(keys) < 2:
        raise InputError("key-slice mode needs boxes on at least two slices")
    return Job(name, "keys", keys=keys, first=min(keys), last=max(keys))


def plan_jobs(args, shape_kji) -> List[Job]:
    """Turns --box / --key-box / --name into jobs, refusing bad boxes before any model work."""
    axis = check_axis(args.axis)
    if not args.box and not args.key_box:
        raise InputError("give at least one --box (or --key-box)")
    jobs = [box_job(values, shape_kji, axis, args.propagate) for values in args.box]
    if args.key_box:
        jobs.append(key_boxes_job(args.key_box, shape_kji, axis))
    if len(args.name) > len(jobs):
        raise InputError(f"{len(args.name)} names for {len(jobs)} segments")
    for n, job in enumerate(jobs):
        job.name = args.name[n] if n < len(args.name) else f"Segment_{n + 1}"
    return jobs


def stop_rules(args):
    from .stop_rules import StopRules

    overrides = {}
    for field in ("min_area", "max_area_ratio", "min_score", "max_slices", "min_appearance", "min_score_ratio",
                  "min_stability_ratio", "min_backward_ratio"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "min_footprint_share", None) is not None:
        overrides["min_footprint_share"] = args.min_footprint_share or None  # 0: off (any share would carry on)
    if getattr(args, "no_centroid_check", False):
        overrides["check_centroid"] = False
    return dataclasses.replace(StopRules(), **overrides)


def open_session(args, array: np.ndarray, window, spacing=None):
    """A LocalSession, or the remote client's session when --server is given (same methods);
    spacing: the voxel spacing (i, j, k mm)."""
    if getattr(args, "server", None):
        from .server.client import RemoteEngine

        return RemoteEngine(args.server, token=args.token).open_session(
            array, window, geometry=None if spacing is None else {"spacing": spacing}, model=getattr(args, "model", None))
    from .cache import default_cache
    from .engine import MedSAMEngine
    from .session import LocalSession

    engine = MedSAMEngine.load(getattr(args, "model", None), args.checkpoint, device=args.device,
                               precision=args.precision, progress=not getattr(args, "quiet", False),
                               backend=getattr(args, "backend", None))
    return LocalSession(engine, array, window, cache=default_cache(engine.device, getattr(args, "disk_cache", None)),
                        spacing=spacing)


class ProgressBar:
    """tqdm on stderr for multi-slice work; silent with --quiet."""

    def __init__(self, label: str, quiet: bool):
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(desc=label, unit="slice", file=sys.stderr, leave=False)

    def __call__(self, index, mask, done, total):
        if self.bar is not None:
            self.bar.total = max(total, done)
            self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def protected_area(path: Optional[str], volume) -> Optional[np.ndarray]:
    """`--protect FILE`: the union of FILE's segments on `volume`'s grid, bool [k, j, i] (None: no
    FILE). Growth ends where it runs into it (propagation.PROTECTED_EVIDENCE)."""
    from .volume_io import read_segmentation_masks

    if not path:
        return None
    masks = list(read_segmentation_masks(path, reference=volume).values())
    area = np.logical_or.reduce(masks) if masks else np.zeros(volume.shape_kji, bool)
    if not area.any():
        raise InputError(f"--protect '{path}' holds no segment voxels: nothing to protect")
    return area


def run_job(session, job: Job, axis: str, args, protected: Optional[np.ndarray] = None):
    """A PropagationResult: slice index -> 2D mask, and the stop reason per direction. protected:
    bool [k, j, i] where growth ends (`protected_area`), or None."""
    from .propagation import PropagationResult

    if job.mode == "slice":
        mask, _ = session.segment_slice(axis, job.first, job.box2d)
        return PropagationResult(masks={job.first: mask})
    post = dict(keep_largest=not args.no_largest_component, fill_holes=args.fill_holes)
    bar = ProgressBar(job.name, args.quiet)
    try:
        if job.mode == "propagate":
            grown = {} if protected is None else {"protected": lambda index: get_slice(protected, axis, index)}
            result = session.propagate(axis, job.first, seed_box=job.box2d, direction=args.direction,
                                       rules=stop_rules(args), progress=bar, **post, **grown)
        elif job.mode == "box3d":
            result = session.segment_box3d(axis, job.box2d, job.first, job.last, progress=bar, **post)
        else:
            result = session.segment_key_slices(axis, job.keys, progress=bar, **post)
    finally:
        bar.close()
    return result


def run_segment(args) -> int:
    from .clinical_io import check_output, write_segments
    from .stop_rules import check_rules
    from .volume_io import check_output_path, read_volume, write_probabilities
    from .window_choice import window_for_job
    from .windowing import IntensityWindow, choose_window

    axis = check_axis(args.axis)
    volume = read_volume(args.input)
    for note in volume.notes:
        print(f"note: {note}", file=sys.stderr)
    fmt = check_output(args.output, args.input, getattr(args, "format", None), args.force)
    _refuse_overwriting_input(args.output, args.input)
    if args.probabilities:
        if os.path.abspath(args.probabilities) == os.path.abspath(args.output):
            raise InputError("--probabilities must be a different file from the output")
        check_output_path(args.probabilities, args.force)
        _refuse_overwriting_input(args.probabilities, args.input)
        if args.server:
            raise InputError("--probabilities is only available with the local engine")
    if volume.is_rgb and axis != "k":
        raise InputError("a colour image has one slice: use --axis k")
    jobs = plan_jobs(args, volume.shape_kji)
    if any(job.mode == "propagate" for job in jobs):
        check_rules(stop_rules(args))  # before the model loads: a mistyped rule costs no wait
    elif getattr(args, "protect", None):
        raise InputError("--protect ends growth: it needs a --box with --propagate")
    protected = protected_area(getattr(args, "protect", None), volume)
    window = IntensityWindow(0, 255, False, "rgb") if volume.is_rgb else choose_window(volume.array, args.window, args.preset)

    session = open_session(args, volume.array, window, volume.spacing)
    model_window = args.window is None and args.preset in (None, "auto") and not volume.is_rgb
    segments, probability = [], None
    try:
        for job in jobs:
            if model_window:  # per structure: the candidate window the model scores best on the seed
                window_for_job(session, volume.array, axis, job, window, quiet=args.quiet)
            if args.probabilities:
                session.predictor(axis).keep_probabilities = True
            result = run_job(session, job, axis, args, protected)
            segments.append((job.name, result.volume(axis, volume.shape_kji)))
            if args.probabilities:
                probability = _collect_probabilities(session.predictor(axis), result.masks, axis, volume.shape_kji,
                                                     probability)
            _report(job, result.masks, result.stop_reasons)
    finally:
        session.close()
    write_segments(args.output, segments, volume, args.input, fmt, overwrite=args.force)
    if args.probabilities:
        write_probabilities(args.probabilities, probability, volume, overwrite=args.force)
    return 0


def _refuse_overwriting_input(output: str, input_path: str) -> None:
    """--force must never replace the volume being segmented (samefile also catches links)."""
    output = os.path.expanduser(output)
    if os.path.exists(output) and os.path.samefile(output, os.path.expanduser(input_path)):
        raise InputError(f"output '{output}' is the input file: choose another name")


def _collect_probabilities(predictor, masks, axis, shape, probability):
    """Foreground probability of each segmented slice, from the call that produced its mask; max over
    segments. A slice may have been prompted several times (mode a's looser box, mode b's extent
    prompt and its two chains, the window choice): the call whose mask agrees best (IoU) with the
    final one is taken, since post-processing (largest component, clipping) only trims it."""
    if probability is None:
        probability = np.zeros(shape, np.float32)
    for index, mask in masks.items():
        calls = predictor.kept.pop(index, [])
        if calls:
            prob = max(calls, key=lambda p: mask_iou(p > 0.5, mask))
            view = probability[slice_index(axis, index)]
            np.maximum(view, prob, out=view)
    predictor.kept.clear()
    return probability


def _report(job: Job, masks, reasons) -> None:
    done = sorted(i for i, m in masks.items() if m.any())
    span = f"slices {done[0]}-{done[-1]} ({len(done)})" if done else "no foreground"
    stops = "; ".join(f"{d}: {r}" for d, r in sorted(reasons.items()))
    print(f"{job.name}: {job.mode}, {span}" + (f"; stopped {stops}" if stops else ""))
