"""The resident MedSAM server: FastAPI on uvicorn, the models loaded once, many users at once.

This file is the app factory and its routes, kept thin: request schemas are in `schemas.py`,
sessions, jobs and models in `state.py`, streamed jobs in `jobs.py`, HTTP helpers and
authentication in `httputil.py`, the `serve` command in `serve.py`.

Endpoints are under /v1 and documented by the OpenAPI schema (/openapi.json; no /docs page, which
would load scripts from a CDN). Volumes and
masks travel as described in `protocol.py` (zlib-compressed raw bytes in JSON, never pickled).
Every model call runs on the scheduler's single worker thread (`scheduler.py`).

Request bodies are read whole by each route and parsed, validated and decoded off the event loop
(`bodies.py`): small ones at once, large ones in worker processes, so health checks and prompts
never wait behind a large upload.

Tenancy: with tokens configured (one per line in --token-file), each session belongs to the token
that created it and is invisible (404) to every other token. With no token the server is single
tenant, may only listen on a loopback address and answers only requests whose Host header is a
loopback name (a web page cannot reach it by DNS rebinding). Every request gets one access-log
line naming its token's name (`httputil.AccessLog`).
"""
from __future__ import annotations

import contextlib
import logging
import secrets
from typing import List, Optional

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import MedSAMError
from ..propagation import check_box
from ..slicing import slice_shape
from . import jobs
from .bodies import MODELS, BodyInvalid, Parsers, ParserGone
from .httputil import (
    USER_KEY,
    AccessLog,
    BodyLimit,
    LoopbackHostOnly,
    authenticate,
    describe_validation,
    error_response,
    http_error,
)
from .protocol import API_PREFIX, API_VERSION, check_array, check_index, encode_mask, inflate_array
from .scheduler import SessionGone
from .schemas import STREAM_DOC, ErrorReply, SegmentReply, SessionInfo, resolve_window
from .state import DEFAULTS, Session, ServerState, owner_tag

log = logging.getLogger("medsam_slicer.server")


def _body(kind: str) -> dict:
    """The OpenAPI entry of a route that reads its body itself (see bodies.py): its schema by name."""
    name = MODELS[kind].__name__
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def create_app(engines, tokens: Optional[List[str]] = None, cache_mb: Optional[float] = None, **limits) -> FastAPI:
    """The FastAPI app around loaded engines (one, or a list: the first is the default model);
    `tokens`: strings or (name, token) pairs; `limits` override DEFAULTS."""
    unknown = set(limits) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown server limits: {', '.join(sorted(unknown))}")
    state = ServerState(engines, tokens, cache_mb, **limits)
    parsers = Parsers(int(state.limits["parse_workers"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        parsers.warm()
        yield
        parsers.close()
        state.shutdown()

    description = ("MedSAM and LiteMedSAM with box prompts, for 3D Slicer. A session names its model "
                   "(GET /v1/info lists them). All model work runs on one GPU worker "
                   "shared fairly by every session. Authenticate with `Authorization: Bearer <token>` when the "
                   "server has tokens.")
    app = FastAPI(
        lifespan=lifespan,
        # FastAPI's /docs and /redoc pages load their scripts from a CDN: a server that may hold
        # patient data serves its schema only (/openapi.json), which any viewer can open offline.
        docs_url=None,
        redoc_url=None,
        title="MedSAM Slicer server",
        version=__version__,
        description=description,
        responses={400: {"model": ErrorReply}, 401: {"model": ErrorReply}, 403: {"model": ErrorReply},
                   404: {"model": ErrorReply}, 413: {"model": ErrorReply}, 422: {"model": ErrorReply}},
    )
    app.state.medsam = state
    app.state.parsers = parsers
    # outermost last: the access log sees every reply, the Host check runs before the body is read
    app.add_middleware(BodyLimit, max_bytes=int(state.limits["max_request_mb"] * 2**20))
    app.add_middleware(LoopbackHostOnly, enabled=lambda: not state.tokens)
    app.add_middleware(AccessLog)
    bearer = HTTPBearer(auto_error=False, description="the server's token (when it has one)")

    def openapi():
        """FastAPI's schema plus the request bodies the routes parse themselves."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in MODELS.values()],
                                         ref_template="#/components/schemas/{model}")
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                known.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    async def owner(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> str:
        tag, name = authenticate(state.tokens, credentials, (owner_tag(None), "local"))
        request.scope[USER_KEY] = name  # for the access log
        return tag

    async def parse(request: Request, kind: str):
        return await parsers.parse(kind, await request.body())

    def in_thread(fn, *args):
        return anyio.to_thread.run_sync(fn, *args)

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, exc: HTTPException):
        detail = exc.detail
        if isinstance(detail, dict):
            return JSONResponse(detail, status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return error_response(exc.status_code, "http_error", str(detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", describe_validation(exc))

    @app.exception_handler(BodyInvalid)
    async def _on_body_invalid(request: Request, exc: BodyInvalid):
        return error_response(422, "invalid_request", str(exc))

    @app.exception_handler(ParserGone)
    async def _on_parser_gone(request: Request, exc: ParserGone):
        return error_response(503, "parser_gone", str(exc), {"Retry-After": "5"})

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
    async def health():
        return {"status": "ok", "version": __version__, "api": API_VERSION}

    @app.get(f"{P}/info", tags=["server"], summary="Models, device, version, limits; your own sessions and memory")
    async def info(request: Request, who: str = Depends(owner)):
        return state.info(who, request.scope.get(USER_KEY))

    def open_session(req, bulk, who: str):
        model, engine = state.model(req.model)
        payload = req.volume.model_dump()
        max_bytes = int(state.limits["max_volume_mb"] * 2**20)
        reserved = state.admit(who, check_array(payload, max_bytes))
        try:  # the volume's memory is reserved before it is decompressed
            volume = inflate_array(payload, bulk.volume, max_bytes)
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

    @app.post(f"{P}/sessions", tags=["sessions"], response_model=SessionInfo, status_code=201,
              summary="Upload a volume once and open a session on it", openapi_extra=_body("sessions"))
    async def create_session(request: Request, who: str = Depends(owner)):
        req, bulk = await parse(request, "sessions")
        return await anyio.to_thread.run_sync(open_session, req, bulk, who, limiter=jobs.check_limiter())

    @app.get(f"{P}/sessions/{{session_id}}", tags=["sessions"], response_model=SessionInfo)
    async def get_session(session_id: str, who: str = Depends(owner)):
        return state.session(who, session_id).info(state.limits["idle_timeout_s"])

    @app.delete(f"{P}/sessions/{{session_id}}", tags=["sessions"], summary="Close a session (idempotent)")
    async def delete_session(session_id: str, who: str = Depends(owner)):
        try:
            session = state.session(who, session_id)
        except HTTPException:
            return {"closed": False}
        state.close_session(session)
        return {"closed": True}

    @app.put(f"{P}/sessions/{{session_id}}/window", tags=["sessions"], response_model=SessionInfo,
             summary="Change the intensity window (embeddings of other windows stay cached)",
             openapi_extra=_body("window"))
    async def set_window(session_id: str, request: Request, who: str = Depends(owner)):
        spec, _ = await parse(request, "window")
        session = state.session(who, session_id)

        def change():
            session.window = resolve_window(spec, session.volume)
            return session.info(state.limits["idle_timeout_s"])

        return await in_thread(change)

    def run_segment(session, req):
        pred = session.predictor(state, req.axis)
        check_index(req.index, pred.n_slices, req.axis)
        size = slice_shape(session.volume.shape, req.axis)
        check_box(req.box, size)
        mask, score = pred(req.index, list(req.box))
        session.touch()
        return {"index": req.index, "size": list(size), "score": float(score), "mask": encode_mask(mask)}

    @app.post(f"{P}/sessions/{{session_id}}/segment", tags=["segment"], response_model=SegmentReply,
              summary="Mask for one box on one slice (idempotent)", openapi_extra=_body("segment"))
    async def segment(session_id: str, request: Request, who: str = Depends(owner)):
        req, _ = await parse(request, "segment")
        return await in_thread(run_segment, state.session(who, session_id), req)

    def run_prefetch(session, req):
        pred = session.predictor(state, req.axis)
        n = pred.n_slices
        wanted = [i for i in dict.fromkeys(req.indices) if 0 <= i < n]
        bulk = state.new_predictor(session, req.axis, None)
        bulk.interactive = False
        bulk.prefetch(wanted)
        return {"queued": len(wanted)}

    @app.post(f"{P}/sessions/{{session_id}}/prefetch", tags=["segment"], status_code=202,
              summary="Queue encoder work for slices about to be prompted", openapi_extra=_body("prefetch"))
    async def prefetch(session_id: str, request: Request, who: str = Depends(owner)):
        req, _ = await parse(request, "prefetch")
        return await in_thread(run_prefetch, state.session(who, session_id), req)

    @app.post(f"{P}/jobs/{{job_id}}/cancel", tags=["jobs"], summary="Cancel a running propagation")
    async def cancel_job(job_id: str, who: str = Depends(owner)):
        with state.lock:
            job = state.jobs.get((who, job_id))
        if job is None:
            raise http_error(404, "job_unknown", "no such running job (it may have finished)")
        job.cancel.set()
        return {"cancelled": True}

    # -- streamed jobs: validated in full before the stream starts, run on a job thread ---------------

    stream_responses = {200: {"description": STREAM_DOC, "content": {"application/x-ndjson": {}}}}

    async def stream(route: str, session_id: str, request: Request, who: str):
        req, bulk = await parse(request, route)
        return await jobs.start(state, state.session(who, session_id), route, req, bulk)

    @app.post(f"{P}/sessions/{{session_id}}/propagate", tags=["3d"], responses=stream_responses,
              summary="Grow from a slice (box or mask) with stop rules, streamed", openapi_extra=_body("propagate"))
    async def propagate(session_id: str, request: Request, who: str = Depends(owner)):
        return await stream("propagate", session_id, request, who)

    @app.post(f"{P}/sessions/{{session_id}}/box3d", tags=["3d"], responses=stream_responses,
              summary="Segment every slice of a 3D box (in-plane box + slice range), streamed",
              openapi_extra=_body("box3d"))
    async def box3d(session_id: str, request: Request, who: str = Depends(owner)):
        return await stream("box3d", session_id, request, who)

    @app.post(f"{P}/sessions/{{session_id}}/key-slices", tags=["3d"], responses=stream_responses,
              summary="Boxes on key slices, interpolated between them, streamed", openapi_extra=_body("key-slices"))
    async def key_slices(session_id: str, request: Request, who: str = Depends(owner)):
        return await stream("key-slices", session_id, request, who)

    @app.post(f"{P}/sessions/{{session_id}}/repropagate", tags=["3d"], responses=stream_responses,
              summary="Recompute beyond a corrected slice, streamed (masks cropped to what changed)",
              openapi_extra=_body("repropagate"))
    async def repropagate(session_id: str, request: Request, who: str = Depends(owner)):
        return await stream("repropagate", session_id, request, who)

    return app
