"""Streamed 3D jobs: each route's request checked and turned into work for a job thread, and the
NDJSON stream that reports the job slice by slice.

`start(state, session, route, request, bulk)` validates everything it can before any model work (a
bad argument is a 4xx, never a 200 followed by an error line), starts the job thread and returns the
streamed reply. The job's model work runs on the scheduler's worker like every other request.

Memory: a job's masks count against the server's budget while it runs. Before any mask is
decoded, the job reserves what its masks will take by their declared shape: each slice the request
sends a mask for (one full slice each, whatever its crop), and one mask per slice of the volume for
its result, and each slice of a protected area it sends; too much is a 413/429/507 before
anything is allocated.
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
Reserve = Callable[[int], None]  # reserve(nbytes): charges the job's masks to the memory budget


def _slice_bytes(session, axis: str) -> int:
    h, w = slice_shape(session.volume.shape, axis)
    return int(h) * int(w)  # one bool mask of the slice


def _result_bytes(session, axis: str) -> int:
    return slice_count(session.volume.shape, axis) * _slice_bytes(session, axis)


# ----------------------------------------------------------------------------------------------
# requests -> work (each returns the work and the masks the client already has, by slice)


def _sent(items, bulk_masks):
    """The masks a request sent for several slices, as a bodies.MaskBundle (None: none sent)."""
    from .bodies import MaskBundle

    if bulk_masks is not None:
        return bulk_masks
    return MaskBundle.from_items(items) if items is not None else None


def _protected(session, req, bulk, reserve: Reserve) -> Dict[str, Any]:
    """The `protected=` option of open-ended growth from the masks the request sent (none: {})."""
    sent = _sent(req.protected, bulk.protected if bulk is not None else None)
    if sent is None:
        return {}
    n = slice_count(session.volume.shape, req.axis)
    reserve(sent.check_indices(n, req.axis) * _slice_bytes(session, req.axis))
    area = sent.decode(slice_shape(session.volume.shape, req.axis))
    return {"protected": area.get}


def _propagate(session, req, bulk, reserve: Reserve) -> Tuple[Work, Dict[int, np.ndarray]]:
    size = slice_shape(session.volume.shape, req.axis)
    check_index(req.seed_index, slice_count(session.volume.shape, req.axis), req.axis, "seed slice")
    if req.seed_box is not None:
        check_box(req.seed_box, size, "seed box")
    reserve(_result_bytes(session, req.axis) + (_slice_bytes(session, req.axis) if req.seed_mask else 0))
    seed_mask = decode_mask(req.seed_mask.model_dump(), size, what="seed mask") if req.seed_mask else None
    kw = dict(job_kwargs("propagate", req), **_protected(session, req, bulk, reserve))
    run = job_function("propagate")

    def work(pred, progress, cancel):
        return run(pred, req.seed_index, seed_box=req.seed_box, seed_mask=seed_mask, progress=progress,
                   cancel=cancel, **kw)

    return work, {}


def _box3d(session, req, bulk, reserve: Reserve) -> Tuple[Work, Dict[int, np.ndarray]]:
    size = slice_shape(session.volume.shape, req.axis)
    n = slice_count(session.volume.shape, req.axis)
    check_box(req.box, size)
    check_index(req.first, n, req.axis, "first slice")
    check_index(req.last, n, req.axis, "last slice")
    reserve(_result_bytes(session, req.axis))
    kw = job_kwargs("box3d", req)
    run = job_function("box3d")

    def work(pred, progress, cancel):
        return run(pred, req.box, req.first, req.last, progress=progress, cancel=cancel, **kw)

    return work, {}


def _key_slices(session, req, bulk, reserve: Reserve) -> Tuple[Work, Dict[int, np.ndarray]]:
    size = slice_shape(session.volume.shape, req.axis)
    n = slice_count(session.volume.shape, req.axis)
    boxes: Dict[int, List[Number]] = {}
    for kb in req.key_boxes:
        check_index(kb.index, n, req.axis, "key slice")
        check_box(kb.box, size, f"box on key slice {kb.index}")
        if kb.index in boxes:
            raise InputError(f"key slice {kb.index} is given twice")
        boxes[kb.index] = kb.box
    reserve(_result_bytes(session, req.axis))
    kw = job_kwargs("key-slices", req)
    run = job_function("key-slices")

    def work(pred, progress, cancel):
        return run(pred, boxes, progress=progress, cancel=cancel, **kw)

    return work, {}


def _repropagate(session, req, bulk, reserve: Reserve) -> Tuple[Work, Dict[int, np.ndarray]]:
    size = slice_shape(session.volume.shape, req.axis)
    n = slice_count(session.volume.shape, req.axis)
    sent = _sent(req.masks, bulk.masks if bulk is not None else None)
    slices = sent.check_indices(n, req.axis)
    check_index(req.corrected_index, n, req.axis, "corrected slice")
    check_index(req.seed_index, n, req.axis, "seed slice")
    # the masks sent (one per slice they cover), the corrected one, and the result
    reserve((slices + 1) * _slice_bytes(session, req.axis) + _result_bytes(session, req.axis))
    masks = sent.decode(size)
    corrected = decode_mask(req.corrected_mask.model_dump(), size, what="corrected mask")
    kw = dict(job_kwargs("repropagate", req), **_protected(session, req, bulk, reserve))
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


def check(session, route: str, req, bulk=None, reserve: Reserve = lambda nbytes: None
          ) -> Tuple[Work, Dict[int, np.ndarray]]:
    """Every check of the request, the propagation function's own included (by a dry run that stops
    at its first model call), so a bad argument is refused before the stream starts. `reserve` is
    called with the bytes of the job's masks before any of them is decoded."""
    work, base = PREPARE[route](session, req, bulk, reserve)
    try:
        work(_Probe(session, req.axis), _reached, None)
    except _Reached:
        pass
    return work, base


async def start(state, session, route: str, req, bulk=None):
    """Checks `req` for `route` off the event loop (decoding masks is CPU work; at most
    CHECK_THREADS at a time) with its masks charged to the memory budget, then runs its job
    (which holds that memory until it ends) and returns the streamed reply."""
    import anyio

    held = [0]

    def reserve(nbytes: int) -> None:
        held[0] += state.memory.reserve(session.owner, nbytes, "this job's masks")

    try:
        work, base = await anyio.to_thread.run_sync(check, session, route, req, bulk, reserve, limiter=_limiter())
    except BaseException:
        state.memory.release(session.owner, held[0])
        raise
    return await run_stream(state, session, req.job_id, req.axis, base, work, held[0])


CHECK_THREADS = 2
_LIMITER = None


def check_limiter():
    """The limiter of threads checking and decoding request data (CHECK_THREADS at a time)."""
    return _limiter()


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


async def run_stream(state, session, job_id, axis: str, base: Dict[int, np.ndarray], work: Work,
                     reserved: int = 0):
    """Runs `work(predictor, progress, cancel)` on a job thread and streams its slices as NDJSON;
    the job holds `reserved` bytes of the memory budget until it ends."""
    job = state.add_job(session, job_id, reserved)
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
        streamed: Dict[int, Dict[str, Any]] = {}  # what was sent per slice (compressed, not a mask copy)

        def progress(index, mask, done, total):
            encoded = encode_mask(np.asarray(mask, dtype=bool), base.get(int(index)))
            streamed[int(index)] = encoded
            session.touch()
            emit({"type": "slice", "index": int(index), "done": int(done), "total": int(total), "mask": encoded})

        final: Dict[str, Any] = {"type": "error", "status": 500, "error": "internal",
                                 "message": "internal server error (details are in the server log)"}
        try:
            result = work(pred, progress, job.cancel)
            for index, mask in result.masks.items():
                encoded = encode_mask(np.asarray(mask, dtype=bool), base.get(int(index)))
                if streamed.get(int(index)) == encoded:  # the same crop of the same mask
                    continue
                emit({"type": "mask", "index": int(index), "mask": encoded})
            final = {"type": "done", "indices": [int(i) for i in result.masks],
                     "stop_reasons": {str(k): str(v) for k, v in result.stop_reasons.items()},
                     "cancelled": bool(result.cancelled)}
            del result
        except SessionGone as exc:
            final = {"type": "error", "status": 404, "error": "session_unknown", "message": str(exc)}
        except MedSAMError as exc:
            final = {"type": "error", "status": 400, "error": "invalid_input", "message": str(exc)[:500]}
        except Exception:
            log.exception("job %s failed", job.id)
        finally:
            base.clear()
            state.end_job(session, job)  # its memory is free before the client reads the last line
            emit(final)

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
