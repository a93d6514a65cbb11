"""The server's state: its models, sessions (a volume, a window and a model per session), running jobs,
the shared embedding cache and the scheduler; the idle-session reaper. No HTTP here beyond the
errors a caller turns into replies (`httputil.http_error`).

Tenancy: each session belongs to the owner tag of the token that created it ("local" without
tokens) and is invisible (404) to every other owner.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import __version__
from ..cache import EmbeddingCache, default_budget_bytes
from ..errors import InputError
from ..predictor import volume_key
from ..slicing import check_axis, slice_distance
from ..windowing import IntensityWindow
from .httputil import http_error
from .protocol import API_VERSION, window_to_wire
from .scheduler import Scheduler, ScheduledPredictor

log = logging.getLogger("medsam_slicer.server")

DEFAULTS = dict(
    max_sessions=16,  # sessions alive at once (all tokens)
    idle_timeout_s=1800.0,  # a session unused this long is closed
    max_request_mb=1024.0,  # request bodies (compressed volumes, base64) above this get 413
    max_volume_mb=2048.0,  # decompressed voxels of one volume
    max_batch=4,  # slices per encoder call
    heartbeat_s=5.0,  # idle streams send a heartbeat line this often
    memory_gb=None,  # one budget for volumes, masks in flight and embeddings (None: half the machine's RAM)
    token_share=0.5,  # with tokens: the most of the sessions and of the volume memory one token may hold
    parse_workers=2,  # worker processes parsing large request bodies (more wait their turn)
)


def machine_memory_bytes() -> int:
    """Physical memory of this machine (0 when the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


class MemoryBudget:
    """Bytes held by sessions' volumes and jobs' masks, against one budget and a per-owner share.
    Reserved before anything is allocated; released when the session closes or the job ends."""

    def __init__(self, total: int, owner_share: Optional[float]):
        self.total = int(total)
        self.per_owner = int(total * owner_share) if owner_share else self.total
        self.used = 0
        self.by_owner: Dict[str, int] = {}
        self._lock = threading.Lock()

    def reserve(self, owner: str, nbytes: int, what: str) -> int:
        nbytes = int(nbytes)
        mb = nbytes / 2**20
        with self._lock:
            if nbytes > self.per_owner:
                raise http_error(413, "too_large", f"{what} needs {mb:.0f} MiB; this server allows at most "
                                 f"{self.per_owner / 2**20:.0f} MiB per user")
            mine = self.by_owner.get(owner, 0)
            if mine + nbytes > self.per_owner:
                raise http_error(429, "memory_share_used",
                                 f"{what} needs {mb:.0f} MiB but your sessions already hold {mine / 2**20:.0f} of "
                                 f"your {self.per_owner / 2**20:.0f} MiB: close a session first", {"Retry-After": "30"})
            if self.used + nbytes > self.total:
                raise http_error(507, "memory_full",
                                 f"{what} needs {mb:.0f} MiB but only {(self.total - self.used) / 2**20:.0f} MiB of "
                                 "the server's memory budget is free; try again later", {"Retry-After": "30"})
            self.used += nbytes
            self.by_owner[owner] = mine + nbytes
        return nbytes

    def release(self, owner: str, nbytes: int) -> None:
        with self._lock:
            self.used -= int(nbytes)
            left = self.by_owner.get(owner, 0) - int(nbytes)
            if left > 0:
                self.by_owner[owner] = left
            else:
                self.by_owner.pop(owner, None)


class ServerCache(EmbeddingCache):
    """The shared embedding cache, which also forgets every embedding of a closed volume."""

    def drop_volume(self, key: str) -> int:
        with self._lock:
            gone = [k for k in self._items if isinstance(k, tuple) and k and k[0] == key]
            for k in gone:
                del self._items[k]
                self.used_bytes -= self._sizes.pop(k)
        return len(gone)


class Job:
    def __init__(self, job_id: str, owner: str, session_id: str):
        self.id = job_id
        self.owner = owner
        self.session_id = session_id
        self.cancel = threading.Event()
        self.finished = threading.Event()
        self.reserved = 0  # bytes of the memory budget its masks hold (released when it ends)


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
        self.reserved = 0  # bytes of the memory budget this session holds (its volume)
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


def owner_tag(token: Optional[str]) -> str:
    if token is None:
        return "local"
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def named_tokens(tokens) -> List[Tuple[str, str]]:
    """[(name, token)] from tokens given as strings (named token1, token2, ...) or (name, token) pairs."""
    named = []
    for n, t in enumerate(tokens or [], 1):
        named.append((str(t[0]), str(t[1])) if isinstance(t, (tuple, list)) else (f"token{n}", str(t)))
    return named


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
        self.tokens = [(t.encode(), owner_tag(t), name) for name, t in named_tokens(tokens)]
        budget = int(cache_mb * 2**20) if cache_mb else default_budget_bytes(self.engine.device)
        memory = int(float(self.limits["memory_gb"]) * 2**30) if self.limits["memory_gb"] else \
            machine_memory_bytes() // 2 or 8 * 2**30
        if self.engine.device == "cpu":  # embeddings live in the same RAM: they count against the budget
            budget = min(budget, memory // 4)
            memory -= budget
        self.cache = ServerCache(budget)  # one budget for every model (keys include the model)
        share = float(self.limits["token_share"]) if self.tokens else None
        self.memory = MemoryBudget(memory, share)
        self.token_sessions = max(1, int(self.limits["max_sessions"] * share)) if share else None
        self.scheduler = Scheduler(max_batch=self.limits["max_batch"])
        self.sessions: Dict[str, Session] = {}
        self.jobs: Dict[Tuple[str, str], Job] = {}
        self.lock = threading.Lock()
        self.started = time.time()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="medsam-session-reaper", daemon=True)
        self._reaper.start()

    def set_tokens(self, tokens) -> List[str]:
        """Replaces the tokens (a reloaded token file): sessions of a token no longer listed are
        closed; a token kept under a new name keeps its sessions. Returns the names now valid."""
        new = [(t.encode(), owner_tag(t), name) for name, t in named_tokens(tokens)]
        if self.tokens and not new:
            raise InputError("a server started with tokens cannot drop them all")
        kept = {tag for _, tag, _ in new}
        self.tokens = new
        with self.lock:
            revoked = [s for s in self.sessions.values() if s.owner not in kept]
        for session in revoked:
            self.close_session(session)
        if revoked:
            log.info("closed %d session(s) of revoked tokens", len(revoked))
        return [name for _, _, name in new]

    # -- models -------------------------------------------------------------------------------------

    def model(self, name: Optional[str]) -> Tuple[str, Any]:
        """(name, engine) of one of the server's models; None: the default (the first)."""
        if name is None or not str(name).strip():
            return self.default_model, self.engine
        key = str(name).strip().lower()
        engine = self.engines.get(key)
        if engine is None:
            raise http_error(400, "unknown_model", f"this server has no model '{str(name)[:64]}': it holds "
                        f"{', '.join(self.engines)}")
        return key, engine

    # -- sessions -----------------------------------------------------------------------------------

    def new_predictor(self, session: Session, axis: str, job: Optional[Job]) -> ScheduledPredictor:
        return ScheduledPredictor(
            self.scheduler, session.id, job is None, job.cancel if job is not None else None,
            engine=session.engine, volume=session.volume, window=session.window, axis=axis, cache=self.cache,
            key=session.key, slice_mm=slice_distance((session.geometry or {}).get("spacing"), axis),
        )

    def admit(self, owner: str, nbytes: int) -> int:
        """Room for one more session of `owner` whose volume takes `nbytes`: checked and reserved
        before the volume is decompressed (release it with memory.release if the session is not made)."""
        self.reap()
        with self.lock:
            self._check_room(owner)
        return self.memory.reserve(owner, nbytes, "this volume")

    def _check_room(self, owner: str) -> None:
        if len(self.sessions) >= self.limits["max_sessions"]:
            raise http_error(503, "server_full", f"the server is full ({self.limits['max_sessions']} sessions open); "
                             "close a session or try again later", {"Retry-After": "30"})
        if self.token_sessions is not None:
            mine = sum(1 for s in self.sessions.values() if s.owner == owner)
            if mine >= self.token_sessions:
                raise http_error(429, "too_many_sessions", f"you have {mine} sessions open, the most one user may "
                                 "hold here: close one first", {"Retry-After": "30"})

    def add_session(self, session: Session) -> None:
        with self.lock:
            self._check_room(session.owner)
            self.sessions[session.id] = session

    def session(self, owner: str, sid: str) -> Session:
        with self.lock:
            session = self.sessions.get(sid)
        if session is None or not hmac.compare_digest(session.owner, owner):
            raise http_error(404, "session_unknown", f"no session {sid[:64]} on this server (closed, expired or restarted)")
        session.touch()
        return session

    def close_session(self, session: Session) -> None:
        """Cancels its jobs, drops its queued work, frees its memory share and forgets its embeddings
        (unless another open session of the same owner holds the same volume)."""
        with self.lock:
            was_open = self.sessions.pop(session.id, None) is not None
            jobs = list(session.jobs.values())
            shared = any(s.key == session.key for s in self.sessions.values())
        for job in jobs:
            job.cancel.set()
        self.scheduler.drop_group(session.id)
        if was_open:
            reserved, session.reserved = session.reserved, 0
            self.memory.release(session.owner, reserved)
            if not shared:
                self.cache.drop_volume(session.key)

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

    def add_job(self, session: Session, job_id: Optional[str], reserved: int = 0) -> Job:
        """A running job of `session`; it takes over `reserved` bytes of the memory budget (released
        when it ends; at once when it cannot start)."""
        job = Job(job_id or secrets.token_urlsafe(12), session.owner, session.id)
        try:
            self._add_job(session, job)
        except BaseException:
            self.memory.release(session.owner, reserved)
            raise
        job.reserved = reserved
        return job

    def _add_job(self, session: Session, job: Job) -> None:
        with self.lock:
            if (job.owner, job.id) in self.jobs:
                raise http_error(409, "job_exists", f"a job {job.id} is already running")
            if len(self.jobs) >= 2 * self.limits["max_sessions"]:
                raise http_error(429, "too_many_jobs", "too many jobs are running on the server; try again shortly",
                            {"Retry-After": "5"})
            self.jobs[(job.owner, job.id)] = job
            session.jobs[job.id] = job

    def end_job(self, session: Session, job: Job) -> None:
        job.finished.set()
        with self.lock:
            self.jobs.pop((job.owner, job.id), None)
            session.jobs.pop(job.id, None)
            reserved, job.reserved = job.reserved, 0
        self.memory.release(job.owner, reserved)
        session.touch()

    def info(self, owner: str, user: Optional[str] = None) -> Dict[str, Any]:
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
        tenant = bool(self.tokens)  # with tokens each user sees their own use, not the others'
        memory = {"budget_bytes": self.memory.total, "per_user_bytes": self.memory.per_owner,
                  "used_bytes": self.memory.by_owner.get(owner, 0) if tenant else self.memory.used}
        reply = {
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
            "memory": memory,
            "max_sessions_per_user": self.token_sessions,
            "user": user,
        }
        if tenant:
            for name in ("sessions_open", "cache", "queue", "worker", "gpu"):
                reply.pop(name)
        return reply


def _model_info(name: str, engine, default: bool) -> Dict[str, Any]:
    arch = getattr(engine, "architecture", None)
    return {"name": name, "title": engine.family.TITLE, "model_id": engine.model_id,
            "architecture": getattr(arch, "name", arch), "input_size": int(engine.family.INPUT_SIZE),
            "device": engine.device, "precision": engine.precision, "default": default}
