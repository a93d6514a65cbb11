"""`medsam-slicer batch`: many volumes from one JSON Lines manifest, with one resident model.

The manifest has one case per line (blank lines and lines starting with '#' are skipped); paths
are relative to the manifest's folder:

    {"input": "ct/case1.nii.gz", "output": "out/case1.seg.nrrd", "window": [400, 40],
     "segments": [{"name": "liver", "box": [I0, J0, K0, I1, J1, K1], "propagate": true, "axis": "k"},
                  {"name": "tumour", "key_boxes": [[I0, J0, K, I1, J1, K], ...]}],
     "protect": "labels/case1_neighbours.seg.nrrd"}

Box semantics are `segment`'s (the same functions build the jobs): a flat box segments its slice
or grows from it with "propagate"; a spanning box is a 3D box; "key_boxes" interpolate key slices;
growth ends at the segments of the optional "protect" file (segment's --protect).
Every line is checked (syntax, keys, files, output names, boxes against the volume's size read
from its header) before any model loads; errors are reported as `line N: reason`.

Running: cases one after another in this process with one model and one embedding cache, or in
`--workers N` processes (one model each), or on Ray (`ray_runner.py`). A case whose output exists
is skipped unless --force; outputs are written atomically (a missing output folder is created); a
failing case is retried once, then reported, and the batch goes on. The CSV report has one row
per case.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
import types
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import InputError, MedSAMError

CASE_KEYS = ("input", "output", "window", "preset", "format", "segments", "protect")
SEGMENT_KEYS = ("name", "box", "key_boxes", "propagate", "axis", "direction", "max_slices", "fill_holes",
                "keep_largest")
REPORT_COLUMNS = ("line", "input", "output", "status", "seconds", "attempts", "slices", "stop_reasons", "error")
MAX_ATTEMPTS = 2  # a failing case is retried once


class ManifestError(MedSAMError):
    """One or more bad manifest lines; `errors` holds every `line N: reason`."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__(self.errors[0] if self.errors else "bad manifest")


@dataclasses.dataclass
class SegmentPlan:
    """One output segment of a case: a `segment_command.Job` and its options."""

    job: object  # segment_command.Job
    axis: str = "k"
    direction: str = "both"
    max_slices: Optional[int] = None
    fill_holes: bool = False
    keep_largest: bool = True


@dataclasses.dataclass
class Case:
    line: int
    input: str  # absolute
    output: str  # absolute
    input_text: str  # as written in the manifest (for the report)
    output_text: str
    format: str  # 'seg.nrrd' | 'labelmap' | 'dicom-seg' | 'rtstruct'
    window: Optional[Tuple[float, float]] = None
    preset: Optional[str] = None
    segments: List[SegmentPlan] = dataclasses.field(default_factory=list)
    protect: Optional[str] = None  # absolute: segments where growth ends (segment's --protect)


@dataclasses.dataclass
class CaseResult:
    line: int
    input: str
    output: str
    status: str  # 'done' | 'skipped' | 'failed' | 'cancelled'
    seconds: float = 0.0
    attempts: int = 0
    slices: Dict[str, int] = dataclasses.field(default_factory=dict)  # segment -> slices with foreground
    stop_reasons: Dict[str, Dict[str, str]] = dataclasses.field(default_factory=dict)
    error: str = ""


@dataclasses.dataclass
class EngineSpec:
    """What each worker loads: `MedSAMEngine.load(model, checkpoint, device, precision)`."""

    model: Optional[str] = None
    checkpoint: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"

    def load(self):
        from .engine import MedSAMEngine

        return MedSAMEngine.load(self.model, self.checkpoint, device=self.device, precision=self.precision)


# ---------------------------------------------------------------- manifest


def probe_volume(path: str) -> Tuple[Tuple[int, int, int], bool]:
    """(shape [k, j, i], is colour) from the file's header, or the DICOM series' first image and count."""
    import SimpleITK as sitk

    from .volume_io import _sitk_reason

    reader = sitk.ImageFileReader()
    if os.path.isdir(path):
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(path) or ())
        if not uids:
            raise InputError(f"folder '{path}' holds no DICOM series")
        files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, uid) for uid in uids), key=len)
        reader.SetFileName(files[0])
        count = len(files)
    else:
        reader.SetFileName(path)
        count = None
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"cannot read '{path}': {_sitk_reason(error)}") from None
    size, components = reader.GetSize(), reader.GetNumberOfComponents()
    if len(size) not in (2, 3):
        raise InputError(f"'{path}' is a {len(size)}D image; only 2D images and 3D volumes are supported")
    slices = count if count is not None else (size[2] if len(size) == 3 else 1)
    is_rgb = components in (3, 4)
    if components > 1 and (not is_rgb or slices > 1):
        raise InputError(f"'{path}' has {components} values per voxel; only grey volumes and 2D colour images "
                         "are supported")
    return (int(slices), int(size[1]), int(size[0])), is_rgb


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_box_values(values, what: str) -> List[float]:
    if not isinstance(values, list) or len(values) != 6 or not all(_is_number(v) for v in values):
        raise InputError(f"{what} must be six numbers [I0, J0, K0, I1, J1, K1]")
    return values


def _plan_segments(raw, shape_kji, is_rgb) -> List[SegmentPlan]:
    from .segment_command import box_job, key_boxes_job

    if not isinstance(raw, list) or not raw:
        raise InputError("'segments' must be a non-empty list")
    plans = []
    for n, seg in enumerate(raw):
        where = f"segment {n + 1}"
        if not isinstance(seg, dict):
            raise InputError(f"{where} must be an object")
        unknown = sorted(set(seg) - set(SEGMENT_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(SEGMENT_KEYS)})")
        name = seg.get("name", f"Segment_{n + 1}")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: 'name' must be a non-empty string")
        where = f"segment '{name}'"
        axis = seg.get("axis", "k")
        if axis not in ("i", "j", "k"):
            raise InputError(f"{where}: 'axis' must be \"i\", \"j\" or \"k\"")
        if is_rgb and axis != "k":
            raise InputError(f"{where}: a colour image has one slice: use axis k")
        for flag in ("propagate", "fill_holes", "keep_largest"):
            if flag in seg and not isinstance(seg[flag], bool):
                raise InputError(f"{where}: '{flag}' must be true or false")
        direction = seg.get("direction", "both")
        if direction not in ("both", "up", "down"):
            raise InputError(f"{where}: 'direction' must be \"both\", \"up\" or \"down\"")
        max_slices = seg.get("max_slices")
        if max_slices is not None and (not _is_int(max_slices) or max_slices < 1):
            raise InputError(f"{where}: 'max_slices' must be a positive integer")
        if ("box" in seg) == ("key_boxes" in seg):
            raise InputError(f"{where}: give either 'box' or 'key_boxes'")
        try:
            if "box" in seg:
                job = box_job(_check_box_values(seg["box"], "'box'"), shape_kji, axis, seg.get("propagate", False),
                              name)
                if seg.get("propagate") and job.mode != "propagate":
                    raise InputError("'propagate' needs a box flat along the axis (K0 = K1 for axis k)")
            else:
                boxes = seg["key_boxes"]
                if not isinstance(boxes, list):
                    raise InputError("'key_boxes' must be a list of boxes")
                boxes = [_check_box_values(b, "each key box") for b in boxes]
                if seg.get("propagate"):
                    raise InputError("'propagate' applies to a 'box', not to 'key_boxes'")
                job = key_boxes_job(boxes, shape_kji, axis, name, flag="key box")
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        plans.append(SegmentPlan(job, axis, direction, max_slices, seg.get("fill_holes", False),
                                 seg.get("keep_largest", True)))
    return plans


def _check_output_folder(path: str) -> None:
    """The output's folder exists and is writable, or can be created (its nearest existing parent is)."""
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        raise InputError(f"output folder '{os.path.dirname(path)}' cannot be created: '{folder}' is a file")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: '{folder}'")


def _parse_case(line_no: int, data, base: str) -> Case:
    from .clinical_io import output_format, require_dicom_input
    from .windowing import PRESET_NAMES

    if not isinstance(data, dict):
        raise InputError("a case must be a JSON object")
    unknown = sorted(set(data) - set(CASE_KEYS))
    if unknown:
        raise InputError(f"unknown key '{unknown[0]}' (known: {', '.join(CASE_KEYS)})")
    for key in ("input", "output"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise InputError(f"'{key}' must be a path (a non-empty string)")
    input_path = os.path.normpath(os.path.join(base, os.path.expanduser(data["input"])))
    output_path = os.path.normpath(os.path.join(base, os.path.expanduser(data["output"])))
    if not os.path.exists(input_path):
        raise InputError(f"input not found: '{input_path}'")
    fmt = data.get("format", "auto")
    if not isinstance(fmt, str):
        raise InputError("'format' must be a string")
    kind = output_format(output_path, fmt)
    require_dicom_input(input_path, kind)
    if os.path.isdir(output_path):
        raise InputError(f"output '{output_path}' is a folder")
    if os.path.exists(output_path) and os.path.samefile(output_path, input_path):
        raise InputError(f"output '{output_path}' is the input file")
    _check_output_folder(output_path)
    window, preset = data.get("window"), data.get("preset")
    if window is not None and preset is not None:
        raise InputError("give 'window' or 'preset', not both")
    if window is not None:
        if not isinstance(window, list) or len(window) != 2 or not all(_is_number(v) for v in window) or window[0] <= 0:
            raise InputError("'window' must be [width, level] with width > 0")
        window = (float(window[0]), float(window[1]))
    if preset is not None and preset not in PRESET_NAMES:
        raise InputError(f"unknown preset '{preset}': use {', '.join(PRESET_NAMES)}")
    shape_kji, is_rgb = probe_volume(input_path)
    segments = _plan_segments(data.get("segments"), shape_kji, is_rgb)
    protect = data.get("protect")
    if protect is not None:
        if not isinstance(protect, str) or not protect.strip():
            raise InputError("'protect' must be a path (a non-empty string)")
        protect = os.path.normpath(os.path.join(base, os.path.expanduser(protect)))
        if not os.path.isfile(protect):
            raise InputError(f"protect file not found: '{protect}'")
        if not any(plan.job.mode == "propagate" for plan in segments):
            raise InputError("'protect' ends growth: it needs a segment with \"propagate\"")
    return Case(line_no, input_path, output_path, data["input"], data["output"], kind, window, preset, segments,
                protect)


def load_manifest(path: str) -> List[Case]:
    """Every case of a JSON Lines manifest, each line checked; ManifestError lists all bad lines."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise InputError(f"manifest not found: '{path}'")
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read manifest '{path}': {error}") from None
    cases, errors, outputs = [], [], {}
    for line_no, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            errors.append(f"line {line_no}: not valid JSON ({error.msg} at column {error.colno})")
            continue
        try:
            case = _parse_case(line_no, data, base)
        except InputError as error:
            errors.append(f"line {line_no}: {error}")
            continue
        if case.output in outputs:
            errors.append(f"line {line_no}: output '{case.output_text}' is also the output of line {outputs[case.output]}")
            continue
        outputs[case.output] = line_no
        cases.append(case)
    if errors:
        raise ManifestError(errors)
    if not cases:
        raise InputError(f"manifest '{path}' has no cases")
    return cases


# ---------------------------------------------------------------- one case


class CaseRunner:
    """Holds one engine (loaded on first use) and one embedding cache; runs cases one at a time."""

    def __init__(self, spec: EngineSpec, engine=None):
        self.spec = spec
        self.engine = engine
        self.cache = None
        self.loads = 0

    def ensure_engine(self):
        if self.engine is None:
            self.engine = self.spec.load()
            self.loads += 1
        if self.cache is None:
            from .cache import default_cache

            self.cache = default_cache(self.engine.device)
        return self.engine

    def run(self, case: Case, force: bool = False) -> CaseResult:
        """Segments one case and writes its output; failures become a 'failed' result, never an exception
        (except KeyboardInterrupt)."""
        start = time.perf_counter()
        result = CaseResult(case.line, case.input_text, case.output_text, "done", attempts=1)
        try:
            self._run(case, force, result)
        except MedSAMError as error:
            result.status, result.error = "failed", str(error)
        except Exception as error:  # a worker must survive any one case
            result.status, result.error = "failed", f"{type(error).__name__}: {error}".strip()
        result.seconds = round(time.perf_counter() - start, 3)
        return result

    def _run(self, case: Case, force: bool, result: CaseResult) -> None:
        from .clinical_io import write_segments
        from .segment_command import protected_area, run_job
        from .session import LocalSession
        from .volume_io import read_volume
        from .windowing import IntensityWindow, choose_window

        volume = read_volume(case.input)
        window = (IntensityWindow(0, 255, False, "rgb") if volume.is_rgb
                  else choose_window(volume.array, case.window, case.preset))
        protected = protected_area(case.protect, volume)
        engine = self.ensure_engine()
        session = LocalSession(engine, volume.array, window, cache=self.cache, spacing=volume.spacing)
        segments = []
        try:
            for plan in case.segments:
                job = plan.job
                options = types.SimpleNamespace(no_largest_component=not plan.keep_largest, fill_holes=plan.fill_holes,
                                                direction=plan.direction, max_slices=plan.max_slices, quiet=True)
                outcome = run_job(session, job, plan.axis, options, protected)
                segments.append((job.name, outcome.volume(plan.axis, volume.shape_kji)))
                result.slices[job.name] = sum(1 for m in outcome.masks.values() if m.any())
                result.stop_reasons[job.name] = dict(outcome.stop_reasons)
        finally:
            session.close()
        os.makedirs(os.path.dirname(case.output), exist_ok=True)
        write_segments(case.output, segments, volume, case.input, case.format, overwrite=force,
                       algorithm=str(getattr(engine.family, "TITLE", "MedSAMSlicer")))


# ---------------------------------------------------------------- running a batch


class Progress:
    """A tqdm bar over the cases that run (skipped ones excluded, so the ETA is honest)."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        self.counts = {"done": 0, "failed": 0}
        if not quiet and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="batch", unit="case", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, result: CaseResult) -> None:
        self.counts[result.status] = self.counts.get(result.status, 0) + 1
        if result.status == "failed":
            self.write(f"line {result.line}: {result.input}: failed: {result.error}")
        if self.bar is not None:
            self.bar.set_postfix(self.counts, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_local(cases: Sequence[Case], spec: EngineSpec, force: bool, progress, workers: int = 1) -> Tuple[List[CaseResult], int]:
    """Runs cases here (one model) or in `workers` processes (one model each); (results, models loaded)."""
    results: List[CaseResult] = []
    if workers <= 1:
        runner = CaseRunner(spec)
        runner.ensure_engine()  # a model that cannot load is one error, not one failure per case
        for case in cases:
            result = _with_retry(lambda c=case: runner.run(c, force))
            results.append(result)
            progress(result)
        return results, runner.loads
    return _run_processes(cases, spec, force, progress, workers)


def _with_retry(attempt) -> CaseResult:
    result = attempt()
    if result.status == "failed":
        first = result
        result = attempt()
        result.attempts = MAX_ATTEMPTS
        if result.status == "failed" and result.error != first.error:
            result.error = f"{result.error} (first attempt: {first.error})"
    return result


_PROCESS_RUNNER: Optional[CaseRunner] = None


def _process_init(spec: EngineSpec, threads: int) -> None:
    global _PROCESS_RUNNER
    import torch

    torch.set_num_threads(threads)
    _PROCESS_RUNNER = CaseRunner(spec)


def _process_run(case: Case, force: bool) -> Tuple[CaseResult, int, int]:
    assert _PROCESS_RUNNER is not None
    result = _with_retry(lambda: _PROCESS_RUNNER.run(case, force))
    return result, os.getpid(), _PROCESS_RUNNER.loads


def _run_processes(cases, spec, force, progress, workers) -> Tuple[List[CaseResult], int]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    loads: Dict[int, int] = {}  # process id -> models it loaded
    results: List[CaseResult] = []
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_process_init, initargs=(spec, threads))
    try:
        futures = {pool.submit(_process_run, case, force): case for case in cases}
        for future in as_completed(futures):
            case = futures[future]
            try:
                result, pid, count = future.result()
                loads[pid] = max(count, loads.get(pid, 0))
            except Exception as error:  # the worker process died
                result = CaseResult(case.line, case.input_text, case.output_text, "failed", attempts=1,
                                    error=f"worker process failed: {type(error).__name__}: {error}")
            results.append(result)
            progress(result)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # workers got the same Ctrl+C; their writes are atomic
        raise
    pool.shutdown(wait=True)
    return results, sum(loads.values())


def write_report(path: str, results: Sequence[CaseResult]) -> None:
    """CSV, one row per case in manifest order, written atomically."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(REPORT_COLUMNS)
            for r in sorted(results, key=lambda r: r.line):
                slices = "; ".join(f"{name}: {count}" for name, count in r.slices.items())
                stops = "; ".join(f"{name}: " + ", ".join(f"{d} {reason}" for d, reason in sorted(reasons.items()))
                                  for name, reasons in r.stop_reasons.items() if reasons)
                writer.writerow([r.line, r.input, r.output, r.status, f"{r.seconds:.2f}", r.attempts, slices, stops,
                                 r.error])
        os.replace(temporary, path)
    except OSError as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise InputError(f"cannot write report '{path}': {error.strerror or error}") from None


def run_batch(args) -> int:
    """The `batch` subcommand: validate the whole manifest, then run; 0 when no case failed, else 1."""
    if args.workers is not None and args.workers < 1:
        raise InputError("--workers must be at least 1")
    if args.report:
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(args.report)))
        if not os.path.isdir(folder):
            raise InputError(f"report folder does not exist: '{folder}'")
    if args.ray is not None:
        from .ray_runner import require_ray

        require_ray()
    try:
        cases = load_manifest(args.manifest)
    except ManifestError as error:
        for line in error.errors[:-1]:
            print(f"medsam-slicer: error: {args.manifest} {line}", file=sys.stderr)
        raise MedSAMError(f"{args.manifest} {error.errors[-1]}") from None
    spec = EngineSpec(args.model, args.checkpoint, args.device, args.precision)
    if spec.checkpoint:
        from .weights import ensure_weights

        spec.checkpoint = os.path.abspath(ensure_weights(spec.checkpoint))  # one line if it is missing

    skipped = [CaseResult(c.line, c.input_text, c.output_text, "skipped") for c in cases
               if not args.force and os.path.exists(c.output)]
    skipped_lines = {r.line for r in skipped}
    to_run = [c for c in cases if c.line not in skipped_lines]
    if skipped and not args.quiet:
        print(f"{len(skipped)} of {len(cases)} cases already have their output: skipped (--force redoes them)",
              file=sys.stderr)
    progress = Progress(len(to_run), args.quiet)
    results: List[CaseResult] = list(skipped)
    start = time.perf_counter()
    loads = 0
    finished: List[CaseResult] = []

    def record(result: CaseResult) -> None:
        finished.append(result)
        progress(result)

    try:
        if to_run and args.ray is not None:
            from .ray_runner import run_on_ray

            loads = run_on_ray(to_run, spec, args.force, record, address=args.ray or None, workers=args.workers,
                               quiet=args.quiet)
        elif to_run:
            if spec.checkpoint is None and (args.workers or 1) > 1:
                from .models import get_family  # fetch the weights once, not once per process

                family = get_family(spec.model)
                spec.model, spec.checkpoint = family.NAME, family.ensure_weights(None, progress=not args.quiet)
            _, loads = run_local(to_run, spec, args.force, record, workers=args.workers or 1)
    except KeyboardInterrupt:
        progress.close()
        done_lines = {r.line for r in finished}
        cancelled = [CaseResult(c.line, c.input_text, c.output_text, "cancelled", error="interrupted")
                     for c in to_run if c.line not in done_lines]
        if args.report:
            write_report(args.report, results + finished + cancelled)
        raise
    progress.close()
    results += finished
    elapsed = time.perf_counter() - start
    if args.report:
        write_report(args.report, results)
    counts = {status: sum(1 for r in results if r.status == status) for status in ("done", "skipped", "failed")}
    rate = counts["done"] / elapsed * 60 if elapsed > 0 and counts["done"] else 0.0
    print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed in {elapsed:.1f} s "
          f"({rate:.1f} cases/min); model loaded {loads} time(s)")
    return 1 if counts["failed"] else 0
