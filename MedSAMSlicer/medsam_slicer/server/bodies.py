"""Request bodies, parsed and validated away from the event loop.

A route reads its body whole (the request-size limit has bounded it already). A small body (a
prompt, a window) is parsed on the spot: microseconds. A larger one is parsed, validated and
base64-decoded in a worker process, PARSE_WORKERS at a time: JSON and pydantic parse holding
Python's global lock, so in a thread a 7 MB body still stalled every other request for about a
second. What comes back is the request without its bulk data, plus that data as bytes (`Bulk`):
the volume's zlib stream, or each mask's zlib stream (the last one sent per slice: it replaces
the earlier ones), and a protected area's masks the same way. The worker processes run at a
lower priority than the model. The route then reserves the memory the decoded data will take
(`state.MemoryBudget`) and only then inflates it, in a thread (zlib and numpy release the lock).

Nothing here imports FastAPI: a worker process imports this module, `schemas` and `protocol` only.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from pydantic import BaseModel, ValidationError

from . import schemas
from .protocol import b64decode, check_index, paste_crop

log = logging.getLogger("medsam_slicer.server")

INLINE_BYTES = 64 * 1024  # bodies up to this size are parsed on the event loop (a prompt is ~200 bytes)
PARSE_WORKERS = 2  # worker processes parsing large bodies; more bodies wait their turn

# what each route's body is
MODELS: Dict[str, type] = {
    "sessions": schemas.CreateSession,
    "window": schemas.WindowSpec,
    "segment": schemas.SegmentRequest,
    "prefetch": schemas.PrefetchRequest,
    "propagate": schemas.PropagateRequest,
    "box3d": schemas.Box3DRequest,
    "key-slices": schemas.KeySlicesRequest,
    "repropagate": schemas.RepropagateRequest,
}


class BodyInvalid(Exception):
    """The body is not JSON or does not match its schema (a 422); the message is one line."""


class ParserGone(Exception):
    """A parser process died (out of memory?): a 503, the next body gets a fresh pool."""


def describe_errors(errors: Sequence[Dict[str, Any]]) -> str:
    """One line for pydantic's validation errors (the first, and how many more)."""
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{loc or 'request'}: {msg}{more}"[:500].replace("\n", " ")


class MaskBundle:
    """Masks of several slices as received, not yet inflated: per slice its crop (row, col, height,
    width) and zlib stream (cut from one blob, so it crosses processes cheaply). A later mask of a
    slice replaces an earlier one, so only the last is kept; `lowest` and `highest` are over every
    index sent, so an index outside the volume is refused even when replaced."""

    def __init__(self, indices: List[int], crops: List[Tuple[int, int, int, int]], blob: bytes, ends: List[int],
                 lowest: Optional[int] = None, highest: Optional[int] = None, sent: int = 0):
        self.indices, self.crops, self.blob, self.ends = indices, crops, blob, ends
        self.lowest, self.highest, self.sent = lowest, highest, sent

    @classmethod
    def from_items(cls, items: Sequence[Any]) -> "MaskBundle":
        last: Dict[int, Any] = {}  # slice -> its last mask (in the order slices first appear)
        for item in items:
            last[int(item.index)] = item.mask
        indices, crops, parts, ends, end = [], [], [], [], 0
        for index, mask in last.items():
            h, w = mask.shape
            data = b64decode(mask.data, f"mask of slice {index}") if h and w else b""
            indices.append(index)
            crops.append((int(mask.offset[0]), int(mask.offset[1]), int(h), int(w)))
            parts.append(data)
            end += len(data)
            ends.append(end)
        lowest = min(last) if last else None
        highest = max(last) if last else None
        return cls(indices, crops, b"".join(parts), ends, lowest, highest, len(items))

    def __len__(self) -> int:
        return self.sent

    def check_indices(self, n: int, axis: str) -> int:
        """Every index sent inside the volume; returns how many distinct slices the masks cover."""
        for index in (self.lowest, self.highest):
            if index is not None:
                check_index(index, n, axis, "mask of slice")
        return len(self.indices)

    def items(self) -> Iterator[Tuple[int, Tuple[int, int, int, int], bytes]]:
        start = 0
        view = memoryview(self.blob)
        for index, crop, end in zip(self.indices, self.crops, self.ends):
            yield index, crop, bytes(view[start:end])
            start = end

    def decode(self, size: Tuple[int, int]) -> Dict[int, np.ndarray]:
        """{slice index: full (H, W) bool mask}."""
        return {index: paste_crop(np.zeros(size, dtype=bool), crop, blob, f"mask of slice {index}")
                for index, crop, blob in self.items()}


class Bulk:
    """The bulk data of a body, base64-decoded but still compressed."""

    def __init__(self, volume: Optional[bytes] = None, masks: Optional[MaskBundle] = None,
                 protected: Optional[MaskBundle] = None):
        self.volume = volume
        self.masks = masks
        self.protected = protected


def parse(kind: str, raw: bytes) -> Tuple[BaseModel, Bulk]:
    """The request of route `kind` from its raw body, without its bulk data, and the bulk.
    Raises BodyInvalid (422) or InputError (400) with one line."""
    model = MODELS[kind]
    try:
        req = model.model_validate_json(raw)
    except ValidationError as exc:
        raise BodyInvalid(describe_errors(exc.errors(include_url=False, include_context=False,
                                                     include_input=False))) from None
    bulk = Bulk()
    if kind == "sessions":
        bulk.volume = b64decode(req.volume.data, "volume")
        req.volume.data = ""
    elif kind == "repropagate":
        bulk.masks = MaskBundle.from_items(req.masks)
        req.masks = []
    if kind in ("propagate", "repropagate") and req.protected is not None:
        bulk.protected = MaskBundle.from_items(req.protected)
        req.protected = []
    return req, bulk


def _ready() -> bool:
    return True


def _worker_start() -> None:
    """A parser process yields the CPU to the model's work (and the server's own threads), and ends
    when the server is gone (a killed server cannot shut its pool down: its parsers would linger)."""
    try:
        os.nice(10)
    except (AttributeError, OSError):  # pragma: no cover - not on this system
        pass
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Parsers:
    """Parses bodies: small ones at once, larger ones in a pool of worker processes (started on
    first use or by warm(); a pool that cannot start falls back to one thread)."""

    def __init__(self, workers: int = PARSE_WORKERS, inline_bytes: int = INLINE_BYTES):
        self.workers = max(1, int(workers))
        self.inline_bytes = int(inline_bytes)
        self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
        self._fallback: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> concurrent.futures.Executor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self._pool is None and self._fallback is None:
                try:
                    self._pool = concurrent.futures.ProcessPoolExecutor(
                        self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start)
                except (OSError, ValueError, NotImplementedError) as exc:  # no processes here: one thread
                    log.warning("parsing large bodies in a thread (no worker processes: %s)", exc)
                    self._fallback = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medsam-parse")
            return self._pool if self._pool is not None else self._fallback

    def warm(self) -> None:
        """Starts the worker processes now rather than on the first large body."""
        try:
            executor = self._executor()
            for _ in range(self.workers):
                executor.submit(_ready)
        except Exception as exc:  # pragma: no cover - a cold start is only slower
            log.warning("could not start the body parsers: %s", exc)

    async def parse(self, kind: str, raw: bytes) -> Tuple[BaseModel, Bulk]:
        if len(raw) <= self.inline_bytes:
            return parse(kind, raw)
        executor = self._executor()
        try:
            return await asyncio.wrap_future(executor.submit(parse, kind, raw))
        except concurrent.futures.process.BrokenProcessPool:
            with self._lock:  # a worker died (out of memory?): the next body gets a fresh pool
                if self._pool is executor:
                    self._pool = None
            raise ParserGone("the server could not parse this request (a parser process died); "
                             "try again, or send less at once") from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, fallback, self._pool, self._fallback = self._pool, self._fallback, None, None
        for executor in (pool, fallback):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)  # a body being parsed takes seconds at most
