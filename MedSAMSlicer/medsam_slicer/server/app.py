"""The resident MedSAM server: FastAPI on uvicorn, the model loaded once, many users at once.

    medsam-slicer serve --checkpoint medsam_vit_b.pth            # 127.0.0.1:8765, no token
    medsam-slicer serve --host 0.0.0.0 --token-file tokens.txt   # off loopback: a token is required

Endpoints are under /v1 and documented by the OpenAPI schema (/openapi.json, /docs). Volumes and
masks travel as described in `protocol.py` (zlib-compressed raw bytes in JSON, never pickled).
Every model call runs on the scheduler's single worker thread (`scheduler.py`).

Tenancy: with tokens configured (one per line in --token-file), each session belongs to the token
that created it and is invisible (404) to every other token. With no token the server is single
tenant and may only listen on a loopback address.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .. import __version__
from ..cache import EmbeddingCache, default_budget_bytes
from ..errors import InputError, MedSAMError
from ..predictor import volume_key
from ..propagation import check_box
from ..slicing import check_axis, slice_count, slice_shape
from ..windowing import IntensityWindow, choose_window
from .protocol import (
    API_PREFIX,
    API_VERSION,
    DEVICES,
    JOB_ID_PATTERN,
    JOB_OPTIONS,
    check_index,
    decode_array,
    decode_mask,
    encode_mask,
    option_default,
    rule_fields,
    rules_from_wire,
    window_from_wire,
    window_to_wire,
)
from .scheduler import Scheduler, ScheduledPredictor, SessionGone

log = logging.getLogger("medsam_slicer.server")

MIN_TOKEN_LENGTH = 16
DEFAULTS = dict(
    max_sessions=16,  # sessions alive at once (all tokens)
    idle_timeout_s=1800.0,  # a session unused this long is closed
    max_request_mb=1024.0,  # request bodies (compressed volumes, base64) above this get 413
    max_volume_mb=2048.0,  # decompressed voxels of one volume
    max_batch=4,  # slices per encoder call
    heartbeat_s=5.0,  # idle streams send a heartbeat line this often
)

Number = Union[int, float]


# ----------------------------------------------------------------------------------------------
# request and reply models (they document the API in the OpenAPI schema)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ArrayPayload(_Strict):
    """Voxels as raw little-endian C-order bytes of the [k, j, i] array, zlib-compressed, base64."""

    dtype: str = Field(description="uint8, int8, uint16, int16, uint32, int32, float32 or float64")
    shape: List[int] = Field(min_length=3, max_length=3, description="[k, j, i]")
    compression: str = Field("zlib", description="zlib")
    data: str = Field(description="base64 of the zlib-compressed bytes")


class MaskPayload(_Strict):
    """A 2D mask cropped to the extent that changed: rows offset[0].., columns offset[1]..;
    data = base64(zlib(numpy.packbits(crop))). shape [0, 0]: unchanged."""

    offset: List[int] = Field(min_length=2, max_length=2)
    shape: List[int] = Field(min_length=2, max_length=2)
    data: str = ""


class WindowSpec(_Strict):
    """One of: width + level; a preset (ct-abdomen, ct-lung, ct-brain, ct-bone, ct-mediastinum,
    mr, auto); or the resolved low + high (+ keep_zero) of an IntensityWindow."""

    width: Optional[float] = None
    level: Optional[float] = None
    preset: Optional[str] = Field(None, max_length=64)
    low: Optional[float] = None
    high: Optional[float] = None
    keep_zero: bool = False
    name: str = Field("custom", max_length=64)


class Geometry(_Strict):
    """Where the voxels sit (kept with the session and returned; the model works in voxel space)."""

    spacing: Optional[List[float]] = Field(None, min_length=3, max_length=3)
    origin: Optional[List[float]] = Field(None, min_length=3, max_length=3)
    directions: Optional[List[float]] = Field(None, min_length=9, max_length=9)


class CreateSession(_Strict):
    volume: ArrayPayload
    model: Optional[str] = Field(None, max_length=64, description="one of the server's models (GET /v1/info); "
                                 "default: the first it holds")
    window: WindowSpec = Field(default_factory=lambda: WindowSpec(preset="auto"))
    geometry: Optional[Geometry] = None


class WindowOut(BaseModel):
    low: float
    high: float
    keep_zero: bool
    name: str


class SessionInfo(BaseModel):
    session_id: str
    shape: List[int]
    dtype: str
    volume_key: str
    model: str
    window: WindowOut
    geometry: Optional[Geometry] = None
    idle_timeout_s: float


class SegmentRequest(_Strict):
    axis: str = Field("k", description="i, j or k")
    index: int
    box: List[Number] = Field(min_length=4, max_length=4, description="[x0, y0, x1, y1], inclusive pixels")


class SegmentReply(BaseModel):
    index: int
    size: List[int]
    score: float
    mask: MaskPayload


class PrefetchRequest(_Strict):
    axis: str = "k"
    indices: List[int] = Field(max_length=4096)


def _rules_model():
    """The wire form of propagation.StopRules, one optional field per rule (a new rule is written once)."""
    from pydantic import create_model

    fields = {name: (Optional[kind], Field(None, description=f"default {getattr(_default_rules(), name)!r}"))
              for name, kind in rule_fields().items()}
    model = create_model("Rules", __base__=_Strict, **fields)
    model.__doc__ = ("Stop rules of open-ended growth (see propagation.StopRules): an omitted field keeps its "
                     "default, an explicit null switches that rule off.")
    return model


def _default_rules():
    from ..propagation import StopRules

    return StopRules()


Rules = _rules_model()


def _option(route: str, name: str, description: str = "", **kw):
    """A job option left out of a request takes the propagation function's own default (shown here)."""
    text = f"{description}; " if description else ""
    return Field(None, description=f"{text}default: {option_default(route, name)!r}", **kw)


class _JobOptions(_Strict):
    axis: str = "k"
    margin: Optional[Union[Number, List[Number]]] = Field(
        None, description="pixels: one number or [x, y]; default: the model's own (its scale's default margin)")
    keep_largest: Optional[bool] = _option("propagate", "keep_largest")
    fill_holes: Optional[bool] = _option("propagate", "fill_holes")
    lookahead: Optional[int] = _option("propagate", "lookahead", ge=1, le=64)
    job_id: Optional[str] = Field(None, pattern=JOB_ID_PATTERN, description="client-chosen id for /v1/jobs/{id}/cancel")


class PropagateRequest(_JobOptions):
    seed_index: int
    seed_box: Optional[List[Number]] = Field(None, min_length=4, max_length=4)
    seed_mask: Optional[MaskPayload] = None
    direction: Optional[str] = _option("propagate", "direction", "both, up or down")
    rules: Optional[Rules] = None


class Box3DRequest(_JobOptions):
    box: List[Number] = Field(min_length=4, max_length=4)
    first: int
    last: int
    start: Optional[int] = _option("box3d", "start", "slice to start from (None: the middle)")
    clip_to_box: Optional[bool] = _option("box3d", "clip_to_box")


class KeyBox(_Strict):
    index: int
    box: List[Number] = Field(min_length=4, max_length=4)


class KeySlicesRequest(_JobOptions):
    key_boxes: List[KeyBox] = Field(min_length=1, max_length=4096)
    combine: Optional[str] = _option("key-slices", "combine", "union, intersect, interpolate or propagate")
    gap_fill: Optional[str] = _option("key-slices", "gap_fill", "larger or both")


class IndexedMask(_Strict):
    index: int
    mask: MaskPayload


class RepropagateRequest(_JobOptions):
    masks: List[IndexedMask] = Field(max_length=65536)
    corrected_index: int
    corrected_mask: MaskPayload
    seed_index: int
    rules: Optional[Rules] = None


class ErrorReply(BaseModel):
    error: str
    message: str


STREAM_DOC = (
    "NDJSON stream, one JSON object per line: `start` {job_id, n_slices}; `slice` {index, done, total, mask} "
    "as each slice finishes (mask cropped to its extent; for re-propagation, to the extent changed against the "
    "mask sent for that slice); `heartbeat` while the worker is busy; `mask` {index, mask} for a final mask "
    "that differs from its streamed one; finally `done` {indices, stop_reasons, cancelled} or "
    "`error` {status, message}. Closing the connection, or POST /v1/jobs/{job_id}/cancel, cancels the job."
)


# ----------------------------------------------------------------------------------------------
# state


class Job:
    def __init__(self, job_id: str, owner: str, session_id: str):
        self.id = job_id
        self.owner = owner
        self.session_id = session_id
        self.cancel = threading.Event()
        self.finished = threading.Event()


class Session:
    def __init__(self, sid: str, owner: str, volume: np.ndarray, window: IntensityWindow, geometry,
                 engine=None, model: str = ""):
        self.id = sid
        self.owner = owner
        self.engine = engine  # the model this session was opened with (one of the server's)
        self.model = model
        self.volume = volume
        self.window = window
        self.geometry = geometry
        # the owner is part of the cache key: identical uploads by two tokens share nothing
        self.key = f"{owner}:{volume_key(volume)}"
        self.volume_key = self.key.split(":", 1)[1]
        self.last_used = time.monotonic()
        self.jobs: Dict[str, Job] = {}
        self.lock = threading.Lock()
        self._interactive: Dict[str, ScheduledPredictor] = {}

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def predictor(self, state: "ServerState", axis: str, job: Optional[Job] = None) -> ScheduledPredictor:
        check_axis(axis)
        if job is None:
            with self.lock:
                pred = self._interactive.get(axis)
                if pred is None or pred.window != self.window:
                    pred = state.new_predictor(self, axis, None)
                    self._interactive[axis] = pred
                return pred
        return state.new_predictor(self, axis, job)

    def info(self, idle_timeout_s: float) -> Dict[str, Any]:
        w = self.window
        return {
            "session_id": self.id,
            "shape": [int(n) for n in self.volume.shape],
            "dtype": self.volume.dtype.name,
            "volume_key": self.volume_key,
            "model": self.model,
            "window": window_to_wire(w),
            "geometry": self.geometry,
            "idle_timeout_s": idle_timeout_s,
        }


def _owner_tag(token: Optional[str]) -> str:
    if token is None:
        return "local"
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def engines_by_name(engines) -> "Dict[str, Any]":
    """{model name: engine}, in the order given (the first is the default); one engine per family."""
    if not isinstance(engines, (list, tuple)):
        engines = [engines]
    if not engines:
        raise InputError("the server needs at least one model")
    named: Dict[str, Any] = {}
    for engine in engines:
        name = engine.family.NAME
        if name in named:
            raise InputError(f"two {name} models: a server holds one model per name")
        named[name] = engine
    return named


class ServerState:
    def __init__(self, engines, tokens: Optional[List[str]], cache_mb: Optional[float], **limits):
        self.engines = engines_by_name(engines)
        self.default_model = next(iter(self.engines))
        self.engine = self.engines[self.default_model]
        self.limits = dict(DEFAULTS, **limits)
        self.tokens = [(t.encode(), _owner_tag(t)) for t in (tokens or [])]
        budget = int(cache_mb * 2**20) if cache_mb else default_budget_bytes(self.engine.device)
        self.cache = EmbeddingCache(budget)  # one budget for every model (keys include the model)
        self.scheduler = Scheduler(max_batch=self.limits["max_batch"])
        self.sessions: Dict[str, Session] = {}
        self.jobs: Dict[Tuple[str, str], Job] = {}
        self.lock = threading.Lock()
        self.started = time.time()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="medsam-session-reaper", daemon=True)
        self._reaper.start()

    # -- auth ---------------------------------------------------------------------------------------

    def owner(self, credentials: Optional[HTTPAuthorizationCredentials]) -> str:
        if not self.tokens:
            return _owner_tag(None)
        if credentials is None or not credentials.credentials:
            raise _http(401, "token_required", "this server needs a bearer token (Authorization: Bearer <token>)",
                        {"WWW-Authenticate": "Bearer"})
        given = credentials.credentials.encode()
        owner = None
        for token, tag in self.tokens:  # every token is compared, in constant time each
            if hmac.compare_digest(given, token):
                owner = tag
        if owner is None:
            raise _http(403, "token_rejected", "the server rejected this token")
        return owner

    # -- models -------------------------------------------------------------------------------------

    def model(self, name: Optional[str]) -> Tuple[str, Any]:
        """(name, engine) of one of the server's models; None: the default (the first)."""
        if name is None or not str(name).strip():
            return self.default_model, self.engine
        key = str(name).strip().lower()
        engine = self.engines.get(key)
        if engine is None:
            raise _http(400, "unknown_model", f"this server has no model '{str(name)[:64]}': it holds "
                        f"{', '.join(self.engines)}")
        return key, engine

    # -- sessions -----------------------------------------------------------------------------------

    def new_predictor(self, session: Session, axis: str, job: Optional[Job]) -> ScheduledPredictor:
        return ScheduledPredictor(
            self.scheduler, session.id, job is None, job.cancel if job is not None else None,
            engine=session.engine, volume=session.volume, window=session.window, axis=axis, cache=self.cache,
            key=session.key,
        )

    def add_session(self, session: Session) -> None:
        self.reap()
        with self.lock:
            if len(self.sessions) >= self.limits["max_sessions"]:
                raise _http(503, "server_full",
                            f"the server is full ({self.limits['max_sessions']} sessions open); "
                            "close a session or try again later", {"Retry-After": "30"})
            self.sessions[session.id] = session

    def session(self, owner: str, sid: str) -> Session:
        with self.lock:
            session = self.sessions.get(sid)
        if session is None or not hmac.compare_digest(session.owner, owner):
            raise _http(404, "session_unknown", f"no session {sid[:64]} on this server (closed, expired or restarted)")
        session.touch()
        return session

    def close_session(self, session: Session) -> None:
        with self.lock:
            self.sessions.pop(session.id, None)
            jobs = list(session.jobs.values())
        for job in jobs:
            job.cancel.set()
        self.scheduler.drop_group(session.id)

    def reap(self) -> int:
        """Closes sessions idle for longer than the timeout (those running a job are busy, not idle)."""
        limit = self.limits["idle_timeout_s"]
        now = time.monotonic()
        with self.lock:
            idle = [s for s in self.sessions.values() if not s.jobs and now - s.last_used > limit]
        for session in idle:
            log.info("closing idle session %s", session.id[:8])
            self.close_session(session)
        return len(idle)

    def _reap_loop(self) -> None:
        period = max(0.5, min(30.0, self.limits["idle_timeout_s"] / 4))
        while not self._stop.wait(period):
            try:
                self.reap()
            except Exception:  # pragma: no cover - keep reaping
                log.exception("session reaper failed")

    def shutdown(self) -> None:
        self._stop.set()
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel.set()
        self.scheduler.stop()

    # -- jobs ---------------------------------------------------------------------------------------

    def add_job(self, session: Session, job_id: Optional[str]) -> Job:
        job = Job(job_id or secrets.token_urlsafe(12), session.owner, session.id)
        with self.lock:
            if (job.owner, job.id) in self.jobs:
                raise _http(409, "job_exists", f"a job {job.id} is already running")
            if len(self.jobs) >= 2 * self.limits["max_sessions"]:
                raise _http(429, "too_many_jobs", "too many jobs are running on the server; try again shortly",
                            {"Retry-After": "5"})
            self.jobs[(job.owner, job.id)] = job
            session.jobs[job.id] = job
        return job

    def end_job(self, session: Session, job: Job) -> None:
        job.finished.set()
        with self.lock:
            self.jobs.pop((job.owner, job.id), None)
            session.jobs.pop(job.id, None)
        session.touch()

    def info(self, owner: str) -> Dict[str, Any]:
        engine = self.engine
        arch = getattr(engine, "architecture", None)
        models = [_model_info(name, e, name == self.default_model) for name, e in self.engines.items()]
        gpu = None
        if str(engine.device).startswith("cuda"):
            try:
                import torch

                free, total = torch.cuda.mem_get_info(torch.device(engine.device))
                gpu = {"name": torch.cuda.get_device_name(torch.device(engine.device)), "free_bytes": int(free),
                       "total_bytes": int(total)}
            except Exception:  # pragma: no cover - info must not fail
                gpu = None
        with self.lock:
            mine = sum(1 for s in self.sessions.values() if s.owner == owner)
            total_sessions = len(self.sessions)
            jobs = sum(1 for (o, _) in self.jobs if o == owner)
        return {
            "name": "medsam-slicer",
            "version": __version__,
            "api": API_VERSION,
            "architecture": getattr(arch, "name", arch),
            "model": self.default_model,  # the default; every model the server holds is in "models"
            "model_id": engine.model_id,
            "models": models,
            "device": engine.device,
            "precision": engine.precision,
            "gpu": gpu,
            "sessions": mine,
            "sessions_open": total_sessions,
            "jobs": jobs,
            "max_sessions": self.limits["max_sessions"],
            "idle_timeout_s": self.limits["idle_timeout_s"],
            "max_request_bytes": int(self.limits["max_request_mb"] * 2**20),
            "cache": {"entries": len(self.cache), "used_bytes": self.cache.used_bytes, "budget_bytes": self.cache.budget_bytes},
            "queue": self.scheduler.queued(),
            "worker": dict(self.scheduler.stats),
            "uptime_s": round(time.time() - self.started, 1),
        }


def _model_info(name: str, engine, default: bool) -> Dict[str, Any]:
    arch = getattr(engine, "architecture", None)
    return {"name": name, "title": engine.family.TITLE, "model_id": engine.model_id,
            "architecture": getattr(arch, "name", arch), "input_size": int(engine.family.INPUT_SIZE),
            "device": engine.device, "precision": engine.precision, "default": default}


# ----------------------------------------------------------------------------------------------
# errors and limits


def _http(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "message": message}, headers=headers)


def _error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{loc or 'request'}: {msg}{more}"[:500]


class BodyLimit:
    """Pure ASGI middleware: request bodies over `max_bytes` get 413 before the app sees them."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _error_response(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                if declared > self.max_bytes:
                    return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while uploading
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        mb = self.max_bytes / 2**20
        response = _error_response(413, "too_large", f"the request is larger than the server's limit of {mb:.0f} MiB",
                                   {"Connection": "close"})
        await response(scope, receive, send)


def _resolve_window(spec: WindowSpec, volume: np.ndarray) -> IntensityWindow:
    if spec.low is not None or spec.high is not None:
        return window_from_wire(spec.model_dump())
    if spec.width is not None or spec.level is not None:
        if spec.width is None or spec.level is None:
            raise InputError("a window needs both width and level")
        if spec.preset is not None:
            raise InputError("give either a window (width, level) or a preset, not both")
        return choose_window(volume, window=(spec.width, spec.level))
    return choose_window(volume, preset=spec.preset)


def job_kwargs(route: str, req: "_JobOptions") -> Dict[str, Any]:
    """The options a request gave, as keyword arguments of its propagation function (JOB_OPTIONS);
    the ones it left out are left out, so the function's own defaults apply."""
    kw: Dict[str, Any] = {}
    for name in JOB_OPTIONS[route][1]:
        value = getattr(req, name)
        if name == "rules":
            value = rules_from_wire(value.model_dump(exclude_unset=True)) if value is not None else None
        if value is not None:
            kw[name] = value
    return kw


# ----------------------------------------------------------------------------------------------
# the application


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
        return state.owner(credentials)

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, exc: HTTPException):
        detail = exc.detail
        if isinstance(detail, dict):
            return JSONResponse(detail, status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return _error_response(exc.status_code, "http_error", str(detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError):
        return _error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(SessionGone)
    async def _on_gone(request: Request, exc: SessionGone):
        return _error_response(404, "session_unknown", str(exc))

    @app.exception_handler(MedSAMError)
    async def _on_medsam(request: Request, exc: MedSAMError):
        return _error_response(400, "invalid_input", str(exc).splitlines()[0][:500] if str(exc) else "invalid input")

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal", "internal server error (details are in the server log)")

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
        volume = decode_array(req.volume.model_dump(), int(state.limits["max_volume_mb"] * 2**20))
        window = _resolve_window(req.window, volume)
        geometry = req.geometry.model_dump() if req.geometry is not None else None
        session = Session(secrets.token_urlsafe(16), who, volume, window, geometry, engine, model)
        state.add_session(session)
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
        session.window = _resolve_window(spec, session.volume)
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
            raise _http(404, "job_unknown", "no such running job (it may have finished)")
        job.cancel.set()
        return {"cancelled": True}

    # -- streamed jobs ----------------------------------------------------------------------------

    async def run_stream(session: Session, job_id: Optional[str], axis: str, base: Dict[int, np.ndarray],
                         work: Callable) -> StreamingResponse:
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
            return _error_response(first["status"], first["error"], first["message"])
        heartbeat = float(state.limits["heartbeat_s"])

        def line(obj) -> bytes:
            return (json.dumps(obj, separators=(",", ":")) + "\n").encode()

        async def lines():
            yield line({"type": "start", "job_id": job.id, "n_slices": int(pred.n_slices)})
            item = first
            while True:
                if item is None:
                    try:
                        item = await asyncio.wait_for(queue.get(), heartbeat)
                    except asyncio.TimeoutError:
                        yield line({"type": "heartbeat"})
                        continue
                yield line(item)
                if item["type"] in ("done", "error"):
                    return
                item = None

        return _JobStream(job, lines(), media_type="application/x-ndjson")

    stream_responses = {200: {"description": STREAM_DOC, "content": {"application/x-ndjson": {}}}}

    @app.post(f"{P}/sessions/{{session_id}}/propagate", tags=["3d"], responses=stream_responses,
              summary="Grow from a slice (box or mask) with stop rules, streamed")
    async def propagate(session_id: str, req: PropagateRequest, who: str = Depends(owner)):
        from ..propagation import propagate_from_slice

        session = state.session(who, session_id)
        size = slice_shape(session.volume.shape, req.axis)
        check_index(req.seed_index, slice_count(session.volume.shape, req.axis), req.axis, "seed slice")
        if req.seed_box is not None:
            check_box(req.seed_box, size, "seed box")
        seed_mask = decode_mask(req.seed_mask.model_dump(), size, what="seed mask") if req.seed_mask else None
        kw = job_kwargs("propagate", req)

        def work(pred, progress, cancel):
            return propagate_from_slice(pred, req.seed_index, seed_box=req.seed_box, seed_mask=seed_mask,
                                        progress=progress, cancel=cancel, **kw)

        return await run_stream(session, req.job_id, req.axis, {}, work)

    @app.post(f"{P}/sessions/{{session_id}}/box3d", tags=["3d"], responses=stream_responses,
              summary="Segment every slice of a 3D box (in-plane box + slice range), streamed")
    async def box3d(session_id: str, req: Box3DRequest, who: str = Depends(owner)):
        from ..propagation import segment_box3d

        session = state.session(who, session_id)
        size = slice_shape(session.volume.shape, req.axis)
        n = slice_count(session.volume.shape, req.axis)
        check_box(req.box, size)
        check_index(req.first, n, req.axis, "first slice")
        check_index(req.last, n, req.axis, "last slice")
        kw = job_kwargs("box3d", req)

        def work(pred, progress, cancel):
            return segment_box3d(pred, req.box, req.first, req.last, progress=progress, cancel=cancel, **kw)

        return await run_stream(session, req.job_id, req.axis, {}, work)

    @app.post(f"{P}/sessions/{{session_id}}/key-slices", tags=["3d"], responses=stream_responses,
              summary="Boxes on key slices, interpolated between them, streamed")
    async def key_slices(session_id: str, req: KeySlicesRequest, who: str = Depends(owner)):
        from ..propagation import segment_key_slices

        session = state.session(who, session_id)
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

        def work(pred, progress, cancel):
            return segment_key_slices(pred, boxes, progress=progress, cancel=cancel, **kw)

        return await run_stream(session, req.job_id, req.axis, {}, work)

    @app.post(f"{P}/sessions/{{session_id}}/repropagate", tags=["3d"], responses=stream_responses,
              summary="Recompute beyond a corrected slice, streamed (masks cropped to what changed)")
    async def repropagate(session_id: str, req: RepropagateRequest, who: str = Depends(owner)):
        from ..propagation import repropagate as run_repropagate

        session = state.session(who, session_id)
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

        def work(pred, progress, cancel):
            return run_repropagate(pred, masks, req.corrected_index, corrected, req.seed_index,
                                   progress=progress, cancel=cancel, **kw)

        return await run_stream(session, req.job_id, req.axis, dict(masks), work)

    return app


class _JobStream(StreamingResponse):
    """A streaming reply that cancels its job when the client goes away before the end."""

    def __init__(self, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished.is_set():
                self.job.cancel.set()


# ----------------------------------------------------------------------------------------------
# serve


def load_tokens(token: Optional[str] = None, token_file: Optional[str] = None) -> List[str]:
    """Tokens from --token, or --token-file (one per line; blank lines and # comments skipped)."""
    if token is not None and token_file is not None:
        raise InputError("give either --token or --token-file, not both")
    tokens: List[str] = []
    if token is not None:
        tokens = [token.strip()]
    elif token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                tokens = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
        except OSError as exc:
            raise InputError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        if not tokens:
            raise InputError(f"the token file {token_file} holds no token")
        try:
            if os.stat(token_file).st_mode & 0o077:
                log.warning("the token file %s is readable by other users: chmod 600 it", token_file)
        except OSError:
            pass
    for t in tokens:
        if len(t) < MIN_TOKEN_LENGTH or re.search(r"\s", t):
            raise InputError(
                f"tokens need at least {MIN_TOKEN_LENGTH} characters and no spaces; make one with: "
                "python -c \"import secrets; print(secrets.token_urlsafe(32))\""
            )
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tokens: List[str]) -> None:
    if not is_loopback(host) and not tokens:
        raise InputError(
            f"refusing to listen on {host} without a token: pass --token or --token-file, "
            "or keep the default 127.0.0.1 and reach the server through an SSH tunnel"
        )


def _check_limits(cache_mb: Optional[float], limits: dict) -> None:
    """Zero or negative limits would start a server that refuses every session or request."""
    for name, value in dict(limits, cache_mb=cache_mb).items():
        if value is not None and not value > 0:
            flag = "--idle-timeout" if name == "idle_timeout_s" else "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be positive, got {value}")


def _check_port_free(host: str, port: int) -> None:
    if not 0 <= int(port) <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server running? "
                             "choose another --port)") from None


def model_plan(models=None, checkpoints=None) -> List[Tuple[Optional[str], Optional[str]]]:
    """(model name or None, checkpoint or None) per model to load, checked before loading anything.

    models: registry names (repeatable --model); checkpoints: one file, or one per model in the same
    order (repeatable --checkpoint); a checkpoint given without a model names its family by its tensors.
    """
    from ..models import DEFAULT_MODEL, check_model

    models = [check_model(m) for m in (models or [])]
    if isinstance(checkpoints, str):
        checkpoints = [checkpoints]
    checkpoints = [c for c in (checkpoints or []) if c is not None and str(c).strip()]
    if len(set(models)) != len(models):
        raise InputError(f"--model {' '.join(models)}: each model once")
    if models and checkpoints and len(checkpoints) != len(models):
        raise InputError(f"{len(checkpoints)} --checkpoint for {len(models)} --model: give none (each model's own "
                         "weights) or one per --model, in the same order")
    if not models:
        return [(None, c) for c in checkpoints] or [(DEFAULT_MODEL, None)]
    return [(m, checkpoints[n] if checkpoints else None) for n, m in enumerate(models)]


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    checkpoint=None,
    models=None,
    device: str = "auto",
    precision: str = "auto",
    token: Optional[str] = None,
    token_file: Optional[str] = None,
    cache_mb: Optional[float] = None,
    log_level: str = "info",
    engine=None,
    **limits,
) -> None:
    """Loads the models once and serves until interrupted. `models`: registry names, the first is
    the default; `checkpoint`: a file or one per model (see model_plan); `engine`: loaded engine(s)
    to serve instead; `limits`: see DEFAULTS."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, str(log_level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokens = load_tokens(token, token_file)
    check_bind(host, tokens)
    _check_limits(cache_mb, limits)
    _check_port_free(host, port)
    if engine is None:
        from ..engine import MedSAMEngine

        engines = [MedSAMEngine.load(name, path, device=device, precision=precision, progress=True)
                   for name, path in model_plan(models, checkpoint)]
    else:
        engines = list(engine) if isinstance(engine, (list, tuple)) else [engine]
    app = create_app(engines, tokens=tokens, cache_mb=cache_mb, **limits)
    held = ", ".join(f"{e.family.NAME}: {e.family.TITLE} ({getattr(e, 'architecture', '?')})" for e in engines)
    first = engines[0]
    print(f"medsam-slicer {__version__} serving {held} on {first.device} ({first.precision}) at "
          f"http://{host}:{port}{API_PREFIX} ({'token required' if tokens else 'no token: loopback only'})",
          flush=True)
    config = uvicorn.Config(app, host=host, port=int(port), log_level=log_level, server_header=False,
                            timeout_graceful_shutdown=5, access_log=log_level == "debug")
    uvicorn.Server(config).run()
