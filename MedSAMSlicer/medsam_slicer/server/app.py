"""The resident MedSAM server: FastAPI on uvicorn, the models loaded once, many users at once.

This file is the app factory and its routes, kept thin: request schemas are in `schemas.py`,
sessions, jobs and models in `state.py`, streamed jobs in `jobs.py`, HTTP helpers and
authentication in `httputil.py`, the `serve` command in `serve.py`.

Endpoints are under /v1 and documented by the OpenAPI schema (/openapi.json; no /docs page, which
would load scripts from a CDN). Volumes and
masks travel as described in `protocol.py` (zlib-compressed raw bytes in JSON, never pickled).
Every model call runs on the scheduler's single worker thread (`scheduler.py`).

Tenancy: with tokens configured (one per line in --token-file), each session belongs to the token
that created it and is invisible (404) to every other token. With no token the server is single
tenant and may only listen on a loopback address.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
from typing import List, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import MedSAMError
from ..propagation import check_box
from ..slicing import slice_shape
from . import jobs
from .httputil import BodyLimit, authenticate, describe_validation, error_response, http_error
from .protocol import API_PREFIX, API_VERSION, check_array, check_index, decode_array, encode_mask
from .scheduler import SessionGone
from .schemas import (
    Box3DRequest,
    CreateSession,
    ErrorReply,
    KeySlicesRequest,
    PrefetchRequest,
    PropagateRequest,
    RepropagateRequest,
    SegmentReply,
    SegmentRequest,
    SessionInfo,
    STREAM_DOC,
    WindowSpec,
    resolve_window,
)
from .state import DEFAULTS, Session, ServerState, owner_tag

log = logging.getLogger("medsam_slicer.server")


def create_app(engines, tokens: Optional[List[str]] = None, cache_mb: Optional[float] = None, **limits) -> FastAPI:
    """The FastAPI app around loaded engines (one, or a list: the first is the default model);
    `limits` override DEFAULTS."""
    unknown = set(limits) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown server limits: {', '.join(sorted(unknown))}")
    state = ServerState(engines, tokens, cache_mb, **limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.shutdown()

    app = FastAPI(
        lifespan=lifespan,
        # FastAPI's /docs and /redoc pages load their scripts from a CDN: a server that may hold
        # patient data serves its schema only (/openapi.json), which any viewer can open offline.
        docs_url=None,
        redoc_url=None,
        title="MedSAM Slicer server",
        version=__version__,
        description="MedSAM and LiteMedSAM with box prompts, for 3D Slicer. A session names its model "
        "(GET /v1/info lists them). All model work runs on one GPU worker "
        "shared fairly by every session. Authenticate with `Authorization: Bearer <token>` when the server "
        "has tokens.",
        responses={400: {"model": ErrorReply}, 401: {"model": ErrorReply}, 403: {"model": ErrorReply},
                   404: {"model": ErrorReply}, 413: {"model": ErrorReply}, 422: {"model": ErrorReply}},
    )
    app.state.medsam = state
    app.add_middleware(BodyLimit, max_bytes=int(state.limits["max_request_mb"] * 2**20))
    bearer = HTTPBearer(auto_error=False, description="the server's token (when it has one)")

    def owner(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> str:
        return authenticate(state.tokens, credentials, owner_tag(None))

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, exc: HTTPException):
        detail = exc.detail
        if isinstance(detail, dict):
            return JSONResponse(detail, status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return error_response(exc.status_code, "http_error", str(detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", describe_validation(exc))

    @app.exception_handler(SessionGone)
    async def _on_gone(request: Request, exc: SessionGone):
        return error_response(404, "session_unknown", str(exc))

    @app.exception_handler(MedSAMError)
    async def _on_medsam(request: Request, exc: MedSAMError):
        return error_response(400, "invalid_input", str(exc).splitlines()[0][:500] if str(exc) else "invalid input")

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error (details are in the server log)")

    P = API_PREFIX

    @app.get(f"{P}/health", tags=["server"], summary="Liveness (no token needed)")
    def health():
        return {"status": "ok", "version": __version__, "api": API_VERSION}

    @app.get(f"{P}/info", tags=["server"], summary="Model, device, precision, version, GPU memory, limits")
    def info(who: str = Depends(owner)):
        return state.info(who)

    @app.post(f"{P}/sessions", tags=["sessions"], response_model=SessionInfo, status_code=201,
              summary="Upload a volume once and open a session on it")
    def create_session(req: CreateSession, who: str = Depends(owner)):
        model, engine = state.model(req.model)
        payload = req.volume.model_dump()
        reserved = state.admit(who, check_array(payload, int(state.limits["max_volume_mb"] * 2**20)))
        try:  # the volume's memory is reserved before it is decompressed
            volume = decode_array(payload, reserved + 1)
            window = resolve_window(req.window, volume)
            geometry = req.geometry.model_dump() if req.geometry is not None else None
            session = Session(secrets.token_urlsafe(16), who, volume, window, geometry, engine, model)
            session.reserved = reserved
            state.add_session(session)
        except BaseException:
            state.memory.release(who, reserved)
            raise
        log.info("session %s: %s %s, window %s, model %s", session.id[:8], list(volume.shape), volume.dtype,
                 window.name, model)
        return session.info(state.limits["idle_timeout_s"])

    @app.get(f"{P}/sessions/{{session_id}}", tags=["sessions"], response_model=SessionInfo)
    def get_session(session_id: str, who: str = Depends(owner)):
        return state.session(who, session_id).info(state.limits["idle_timeout_s"])

    @app.delete(f"{P}/sessions/{{session_id}}", tags=["sessions"], summary="Close a session (idempotent)")
    def delete_session(session_id: str, who: str = Depends(owner)):
        try:
            session = state.session(who, session_id)
        except HTTPException:
            return {"closed": False}
        state.close_session(session)
        return {"closed": True}

    @app.put(f"{P}/sessions/{{session_id}}/window", tags=["sessions"], response_model=SessionInfo,
             summary="Change the intensity window (embeddings of other windows stay cached)")
    def set_window(session_id: str, spec: WindowSpec, who: str = Depends(owner)):
        session = state.session(who, session_id)
        session.window = resolve_window(spec, session.volume)
        return session.info(state.limits["idle_timeout_s"])

    @app.post(f"{P}/sessions/{{session_id}}/segment", tags=["segment"], response_model=SegmentReply,
              summary="Mask for one box on one slice (idempotent)")
    def segment(session_id: str, req: SegmentRequest, who: str = Depends(owner)):
        session = state.session(who, session_id)
        pred = session.predictor(state, req.axis)
        check_index(req.index, pred.n_slices, req.axis)
        size = slice_shape(session.volume.shape, req.axis)
        check_box(req.box, size)
        mask, score = pred(req.index, list(req.box))
        session.touch()
        return {"index": req.index, "size": list(size), "score": float(score), "mask": encode_mask(mask)}

    @app.post(f"{P}/sessions/{{session_id}}/prefetch", tags=["segment"], status_code=202,
              summary="Queue encoder work for slices about to be prompted")
    def prefetch(session_id: str, req: PrefetchRequest, who: str = Depends(owner)):
        session = state.session(who, session_id)
        pred = session.predictor(state, req.axis)
        n = pred.n_slices
        wanted = [i for i in dict.fromkeys(req.indices) if 0 <= i < n]
        bulk = state.new_predictor(session, req.axis, None)
        bulk.interactive = False
        bulk.prefetch(wanted)
        return {"queued": len(wanted)}

    @app.post(f"{P}/jobs/{{job_id}}/cancel", tags=["jobs"], summary="Cancel a running propagation")
    def cancel_job(job_id: str, who: str = Depends(owner)):
        with state.lock:
            job = state.jobs.get((who, job_id))
        if job is None:
            raise http_error(404, "job_unknown", "no such running job (it may have finished)")
        job.cancel.set()
        return {"cancelled": True}

    # -- streamed jobs: validated in full before the stream starts, run on a job thread ---------------

    stream_responses = {200: {"description": STREAM_DOC, "content": {"application/x-ndjson": {}}}}

    @app.post(f"{P}/sessions/{{session_id}}/propagate", tags=["3d"], responses=stream_responses,
              summary="Grow from a slice (box or mask) with stop rules, streamed")
    async def propagate(session_id: str, req: PropagateRequest, who: str = Depends(owner)):
        return await jobs.start(state, state.session(who, session_id), "propagate", req)

    @app.post(f"{P}/sessions/{{session_id}}/box3d", tags=["3d"], responses=stream_responses,
              summary="Segment every slice of a 3D box (in-plane box + slice range), streamed")
    async def box3d(session_id: str, req: Box3DRequest, who: str = Depends(owner)):
        return await jobs.start(state, state.session(who, session_id), "box3d", req)

    @app.post(f"{P}/sessions/{{session_id}}/key-slices", tags=["3d"], responses=stream_responses,
              summary="Boxes on key slices, interpolated between them, streamed")
    async def key_slices(session_id: str, req: KeySlicesRequest, who: str = Depends(owner)):
        return await jobs.start(state, state.session(who, session_id), "key-slices", req)

    @app.post(f"{P}/sessions/{{session_id}}/repropagate", tags=["3d"], responses=stream_responses,
              summary="Recompute beyond a corrected slice, streamed (masks cropped to what changed)")
    async def repropagate(session_id: str, req: RepropagateRequest, who: str = Depends(owner)):
        return await jobs.start(state, state.session(who, session_id), "repropagate", req)

    return app
