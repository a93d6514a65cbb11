"""One GPU worker thread that runs all model work for all sessions, fairly.

Work arrives as small tasks: *encode* (fill the shared embedding cache for one slice) and
*decode* (masks for boxes on one slice, encoding it first when its embedding is missing).

Order: interactive tasks (a user's single-slice prompt) first, FIFO; then bulk tasks (propagation,
3D boxes, prefetch) round-robin across groups (sessions), one task per group per turn. Long jobs
submit one slice at a time, so a 300-slice propagation delays another user's prompt by at most the
work of one step.

Pre-emption: a bulk encode checks between transformer blocks whether a prompt is waiting; if so
it stops, goes back to the front of its queue, and the prompt runs first (with an engine whose
encoder supports `interrupt`, see fast_encoder). A prompt then waits for about one transformer
block of background work, not a whole slice.

Models: each task runs on its predictor's engine, so one worker serves every model the server holds.

Batching: when the task picked needs the encoder, the worker encodes in the same
`engine.encode_batch` call the other waiting slices of the same class and model: every waiting interactive
slice (several users prompting at once), or the head slice of each other session's bulk queue
(several propagations at once). One step therefore encodes at most one slice per session.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Deque, Dict, List, Sequence, Tuple

import numpy as np

from ..cache import own_copy
from ..errors import InputError, MedSAMError
from ..predictor import SlicePredictor
from .protocol import check_index

log = logging.getLogger("medsam_slicer.server")

# A waiting caller gives up after this long (a stuck worker must not hang request threads forever).
RESULT_TIMEOUT_S = 3600.0


class SessionGone(MedSAMError):
    """The session was closed while work for it was queued."""


class _Interrupted(Exception):
    pass


class _Task:
    __slots__ = ("kind", "predictor", "index", "boxes", "group", "interactive", "job", "future", "queued_at")

    def __init__(self, kind, predictor, index, boxes, group, interactive, job):
        self.kind = kind
        self.predictor = predictor
        self.index = int(index)
        self.boxes = boxes
        self.group = group
        self.interactive = interactive
        self.job = job
        self.future: Future = Future()
        self.queued_at = time.monotonic()

    def needs_encoder(self) -> bool:
        return not self.predictor.is_cached(self.index)

    def abandoned(self) -> bool:
        return self.job is not None and self.job.is_set()


def _interruptible(engine) -> bool:
    try:
        return "interrupt" in inspect.signature(engine.encode_batch).parameters
    except (TypeError, ValueError):
        return False


class Scheduler:
    """engine: optional; it only answers `interruptible` (each task runs on its predictor's engine)."""

    def __init__(self, engine=None, max_batch: int = 4):
        self.engine = engine
        self.max_batch = max(1, int(max_batch))
        self._cond = threading.Condition()
        self._interactive: Deque[_Task] = deque()
        self._bulk: "OrderedDict[str, Deque[_Task]]" = OrderedDict()
        self._stopped = False
        self.stats = {"tasks": 0, "encoder_calls": 0, "encoded_slices": 0, "largest_batch": 0, "decodes": 0,
                      "preempted": 0}
        self._interruptible = engine is not None and _interruptible(engine)
        self._thread = threading.Thread(target=self._run, name="medsam-gpu-worker", daemon=True)
        self._thread.start()

    # -- submitting -------------------------------------------------------------------------------

    def _submit(self, task: _Task) -> Future:
        with self._cond:
            if self._stopped:
                raise MedSAMError("the server is shutting down")
            if task.interactive:
                self._interactive.append(task)
            else:
                self._bulk.setdefault(task.group, deque()).append(task)
            self._cond.notify()
        return task.future

    def encode(self, predictor, index: int, group: str, interactive: bool, job=None) -> Future:
        return self._submit(_Task("encode", predictor, index, None, group, interactive, job))

    def decode(self, predictor, index: int, boxes, group: str, interactive: bool, job=None) -> Future:
        return self._submit(_Task("decode", predictor, index, boxes, group, interactive, job))

    def drop_group(self, group: str) -> int:
        """Forgets the queued work of a closed session; waiting callers get SessionGone."""
        with self._cond:
            dropped = list(self._bulk.pop(group, ()))
            keep = deque(t for t in self._interactive if t.group != group)
            dropped += [t for t in self._interactive if t.group == group]
            self._interactive = keep
        for task in dropped:
            task.future.set_exception(SessionGone("the session was closed"))
        return len(dropped)

    def queued(self) -> Dict[str, int]:
        with self._cond:
            return {"interactive": len(self._interactive), "bulk": sum(len(q) for q in self._bulk.values())}

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            pending = list(self._interactive) + [t for q in self._bulk.values() for t in q]
            self._interactive.clear()
            self._bulk.clear()
            self._cond.notify_all()
        for task in pending:
            task.future.set_exception(MedSAMError("the server is shutting down"))
        self._thread.join(timeout=10)

    # -- the worker -------------------------------------------------------------------------------

    def _pick(self) -> Tuple[_Task, List[_Task]]:
        """Next task and the other waiting tasks whose slices may share its encoder call."""
        if self._interactive:
            task = self._interactive.popleft()
            peers = list(self._interactive)
        else:
            group, queue = next(iter(self._bulk.items()))
            task = queue.popleft()
            del self._bulk[group]
            if queue:
                self._bulk[group] = queue  # to the back of the round
            peers = [q[0] for g, q in self._bulk.items() if g != group]
        return task, peers

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._interactive and not self._bulk:
                    self._cond.wait()
                if self._stopped:
                    return
                task, peers = self._pick()
            try:
                self._execute(task, peers)
            except BaseException as exc:  # never let the worker die
                if not task.future.done():
                    task.future.set_exception(exc)
                if not isinstance(exc, MedSAMError):
                    log.exception("model work failed")
            # let go of the task while waiting: it holds its predictor, hence its session's volume,
            # which must be freed when the session closes, not when the next task arrives
            del task, peers

    def _execute(self, task: _Task, peers: Sequence[_Task]) -> None:
        self.stats["tasks"] += 1
        if task.kind == "encode" and task.abandoned():
            task.future.set_result(None)  # prefetch for a cancelled job
            return
        embedding = None
        if task.needs_encoder():
            engine = task.predictor.engine
            batch = [task] + [p for p in peers
                              if p.predictor.engine is engine and not p.abandoned() and p.needs_encoder()]
            try:
                embedding = self._encode(batch[: self.max_batch], preemptible=not task.interactive)
            except _Interrupted:
                self._requeue_front(task)
                return
        if task.kind == "encode":
            task.future.set_result(None)
            return
        pred = task.predictor
        if embedding is None:
            embedding = pred.cache.get(pred.cache_key(task.index))
            if embedding is None:  # evicted between its encode and now (tiny cache budget)
                embedding = self._encode([task])
        probs, scores = pred.engine.decode(embedding, np.asarray(task.boxes, dtype=np.float64), pred.slice_shape)
        self.stats["decodes"] += 1
        task.future.set_result((probs, scores))

    def _prompt_waiting(self) -> bool:
        return bool(self._interactive)

    def _requeue_front(self, task: _Task) -> None:
        """A pre-empted bulk task gets the next bulk turn, ahead of its own queue."""
        with self._cond:
            if self._stopped:
                task.future.set_exception(MedSAMError("the server is shutting down"))
                return
            self._bulk.setdefault(task.group, deque()).appendleft(task)
            self._bulk.move_to_end(task.group, last=False)
        self.stats["preempted"] += 1

    def _encode(self, tasks: Sequence[_Task], preemptible: bool = False):
        """Encodes the distinct slices of `tasks` in one call; returns the first task's embedding."""
        todo: "OrderedDict[tuple, _Task]" = OrderedDict()
        for t in tasks:
            todo.setdefault(t.predictor.cache_key(t.index), t)
        images = []
        for key, t in list(todo.items()):
            try:
                images.append(t.predictor.image(t.index))
            except InputError as exc:  # a peer with a bad index: fail it alone
                del todo[key]
                if t is tasks[0]:
                    raise
                t.future.set_exception(exc)
        engine = tasks[0].predictor.engine
        if preemptible and _interruptible(engine):
            try:
                embs = engine.encode_batch(images, interrupt=self._prompt_waiting)
            except Exception as exc:
                if type(exc).__name__ == "EncodeInterrupted":
                    raise _Interrupted() from None
                raise
        else:
            embs = engine.encode_batch(images)
        self.stats["encoder_calls"] += 1
        self.stats["encoded_slices"] += len(images)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(images))
        first = None
        for n, (key, t) in enumerate(todo.items()):
            emb = own_copy(embs, n)
            t.predictor.cache.put(key, emb)
            t.predictor.encoded += 1
            if n == 0:
                first = emb
        return first


class ScheduledPredictor(SlicePredictor):
    """A SlicePredictor whose model work runs on the scheduler's worker (same masks, same cache keys).

    `interactive` predictors serve single prompts; bulk ones serve one job (`job`: its cancel
    event) and prefetch asynchronously, one queued encode task per slice.
    """

    def __init__(self, scheduler: Scheduler, group: str, interactive: bool, job=None, **kwargs):
        super().__init__(**kwargs)
        self.scheduler = scheduler
        self.group = group
        self.interactive = interactive
        self.job = job

    def _check(self, index: int) -> int:
        return check_index(index, self.n_slices, self.axis)

    def embedding(self, index: int):
        index = self._check(index)
        key = self.cache_key(index)
        emb = self.cache.get(key)
        if emb is None:
            self.scheduler.encode(self, index, self.group, self.interactive, self.job).result(RESULT_TIMEOUT_S)
            emb = self.cache.get(key)
        return emb

    def prefetch(self, indices: Sequence[int]) -> None:
        for index in dict.fromkeys(int(i) for i in indices):
            if 0 <= index < self.n_slices and not self.is_cached(index):
                self.scheduler.encode(self, index, self.group, self.interactive, self.job)

    def probabilities(self, index: int, boxes) -> Tuple[np.ndarray, np.ndarray]:
        index = self._check(index)
        future = self.scheduler.decode(self, index, boxes, self.group, self.interactive, self.job)
        return future.result(RESULT_TIMEOUT_S)
