"""Streamed 3D jobs: each route's request checked and turned into work for a job thread, and the
NDJSON stream that reports the job slice by slice.

`start(state, session, route, request)` validates everything it can before any model work (a bad
argument is a 4xx, never a 200 followed by an error line), starts the job thread and returns the
streamed reply. The job's model work runs on the scheduler's worker like every other request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from ..errors import InputError, MedSAMError
from ..propagation import check_box
from ..slicing import slice_count, slice_shape
from .httputil import JobStream, error_response
from .protocol import check_index, decode_mask, encode_mask, job_function
from .scheduler import SessionGone
from .schemas import Number, job_kwargs

log = logging.getLogger("medsam_slicer.server")

Work = Callable[..., Any]  # work(predictor, progress, cancel) -> PropagationResult


# ----------------------------------------------------------------------------------------------
# requests -> work (each returns the work and the masks the client already has, by slice)


def _propagate(session, req) -> Tuple[Work, Dict[int, np.ndarray]]:
    size = slice_shape(session.volume.shape, req.axis)
    check_index(req.seed_index, slice_count(session.volume.shape, req.axis), req.axis, "seed slice")
    if req.seed_box is not None:
        check_box(req.seed_box, size, "seed box")
    seed_mask = decode_mask(req.seed_mask.model_dump(), size, what="seed mask") if req.seed_mask else None
    kw = job_kwargs("propagate", req)
    run = job_function("propagate")

    def work(pred, progress, cancel):
        return run(pred, req.seed_index, seed_box=req.seed_box, seed_mask=seed_mask, progress=progress,
                   cancel=cancel, **kw)

    return work, {}


def _box3d(session, req) -> Tuple[Work, Dict[int, np.ndarray]]:
    size = slice_shape(session.volume.shape, req.axis)
    n = slice_count(session.volume.shape, req.axis)
    check_box(req.box, size)
    check_index(req.first, n, req.axis, "first slice")
    check_index(req.last, n, req.axis, "last slice")
    kw = job_kwargs("box3d", req)
    run = job_function("box3d")

    def work(pred, progress, cancel):
        return run(pred, req.box, req.first, req.last, progress=progress, cancel=cancel, **kw)

    return work, {}


def _key_slices(session, req) -> Tuple[Work, Dict[int, np.ndarray]]:
    size = slice_shape(session.volume.shape, req.axis)
    n = slice_count(session.volume.shape, req.axis)
    boxes: Dict[int, List[Number]] = {}
    for kb in req.key_boxes:
        check_index(kb.index, n, req.axis, "key slice")
        check_box(kb.box, size, f"box on key slice {kb.index}")
        if kb.index in boxes:
            raise InputError(f"key slice {kb.index} is given twice")
        boxes[kb.index] = kb.box
    kw = job_kwargs("key-slices", req)
    run = job_function("key-slices")

    def work(pred, progress, cancel):
        return run(pred, boxes, progress=progress, cancel=cancel, **kw)

    return work, {}


def _repropagate(session, req) -> Tuple[Work, Dict[int, np.ndarray]]:
    size = slice_shape(session.volume.shape, req.axis)
    n = slice_count(session.volume.shape, req.axis)
    masks: Dict[int, np.ndarray] = {}
    for item in req.masks:
        check_index(item.index, n, req.axis, "mask of slice")
        masks[item.index] = decode_mask(item.mask.model_dump(), size, what=f"mask of slice {item.index}")
    check_index(req.corrected_index, n, req.axis, "corrected slice")
    check_index(req.seed_index, n, req.axis, "seed slice")
    corrected = decode_mask(req.corrected_mask.model_dump(), size, what="corrected mask")
    kw = job_kwargs("repropagate", req)
    run = job_function("repropagate")

    def work(pred, progress, cancel):
        return run(pred, masks, req.corrected_index, corrected, req.seed_index, progress=progress, cancel=cancel,
                   **kw)

    return work, dict(masks)


PREPARE = {"propagate": _propagate, "box3d": _box3d, "key-slices": _key_slices, "repropagate": _repropagate}


class _Reached(Exception):
    """The dry run got past every argument check to the first model call."""


class _Probe:
    """Stands in for the session's predictor in a dry run: the engine's own argument checks all run
    before its first model call (or progress report), which stops the run there."""

    def __init__(self, session, axis: str):
        self.n_slices = slice_count(session.volume.shape, axis)
        self.slice_shape = slice_shape(session.volume.shape, axis)
        self.default_margin = session.engine.default_margin(self.slice_shape)

    def __call__(self, index, box):
        raise _Reached()

    def prefetch(self, indices):
        raise _Reached()

    def image(self, index):
        raise _Reached()


def _reached(*args):
    raise _Reached()


def check(session, route: str, req) -> Tuple[Work, Dict[int, np.ndarray]]:
    """Every check of the request, the propagation function's own included (by a dry run that stops
    at its first model call), so a bad argument is refused before the stream starts."""
    work, base = PREPARE[route](session, req)
    try:
        work(_Probe(session, req.axis), _reached, None)
    except _Reached:
        pass
    return work, base


async def start(state, session, route: str, req):
    """Checks `req` for `route` off the event loop (decoding masks is CPU work; at most
    CHECK_THREADS at a time), then runs its job and returns the streamed reply."""
    import anyio

    work, base = await anyio.to_thread.run_sync(check, session, route, req, limiter=_limiter())
    return await run_stream(state, session, req.job_id, req.axis, base, work)


CHECK_THREADS = 2
_LIMITER = None


def _limiter():
    global _LIMITER
    if _LIMITER is None:
        import anyio

        _LIMITER = anyio.CapacityLimiter(CHECK_THREADS)
    return _LIMITER


# ----------------------------------------------------------------------------------------------
# the stream


def _line(obj) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


async def run_stream(state, session, job_id, axis: str, base: Dict[int, np.ndarray], work: Work):
    """Runs `work(predictor, progress, cancel)` on a job thread and streams its slices as NDJSON."""
    job = state.add_job(session, job_id)
    try:
        pred = session.predictor(state, axis, job)
    except BaseException:
        state.end_job(session, job)
        raise
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(item: Dict[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown)
            job.cancel.set()

    def body() -> None:
        streamed: Dict[int, np.ndarray] = {}

        def progress(index, mask, done, total):
            mask = np.array(mask, dtype=bool, copy=True)
            streamed[int(index)] = mask
            session.touch()
            emit({"type": "slice", "index": int(index), "done": int(done), "total": int(total),
                  "mask": encode_mask(mask, base.get(int(index)))})

        try:
            result = work(pred, progress, job.cancel)
            for index, mask in result.masks.items():
                mask = np.asarray(mask, dtype=bool)
                if int(index) in streamed and np.array_equal(streamed[int(index)], mask):
                    continue
                emit({"type": "mask", "index": int(index), "mask": encode_mask(mask, base.get(int(index)))})
            emit({"type": "done", "indices": [int(i) for i in result.masks],
                  "stop_reasons": {str(k): str(v) for k, v in result.stop_reasons.items()},
                  "cancelled": bool(result.cancelled)})
        except SessionGone as exc:
            emit({"type": "error", "status": 404, "error": "session_unknown", "message": str(exc)})
        except MedSAMError as exc:
            emit({"type": "error", "status": 400, "error": "invalid_input", "message": str(exc)[:500]})
        except Exception:
            log.exception("job %s failed", job.id)
            emit({"type": "error", "status": 500, "error": "internal",
                  "message": "internal server error (details are in the server log)"})
        finally:
            state.end_job(session, job)

    threading.Thread(target=body, name=f"medsam-job-{job.id[:8]}", daemon=True).start()
    # Errors the propagation module finds in its arguments arrive at once: answer them with a 4xx.
    try:
        first = await asyncio.wait_for(queue.get(), 0.5)
    except asyncio.TimeoutError:
        first = None
    if first is not None and first["type"] == "error":
        return error_response(first["status"], first["error"], first["message"])
    heartbeat = float(state.limits["heartbeat_s"])

    async def lines():
        yield _line({"type": "start", "job_id": job.id, "n_slices": int(pred.n_slices)})
        item = first
        while True:
            if item is None:
                try:
                    item = await asyncio.wait_for(queue.get(), heartbeat)
                except asyncio.TimeoutError:
                    yield _line({"type": "heartbeat"})
                    continue
            yield _line(item)
            if item["type"] in ("done", "error"):
                return
            item = None

    return JobStream(job, lines(), media_type="application/x-ndjson")
