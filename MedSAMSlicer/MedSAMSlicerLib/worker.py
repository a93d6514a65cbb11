"""One persistent inference thread, and a queue of its events for the main thread to poll.

torch (and the engine) only ever run on this thread. The thread never touches MRML or Qt: jobs
report through ``job.report(payload)`` and finish with a result or an error; the main thread calls
``job.poll()`` from a qt.QTimer and applies the events there (each job has its own event queue, so
several editor widgets can share the one thread).
"""
from __future__ import annotations

import itertools
import queue
import threading
import traceback
from typing import Any, Callable, List, Optional, Tuple

PROGRESS, DONE, ERROR, CANCELLED = "progress", "done", "error", "cancelled"


class Job:
    _ids = itertools.count(1)

    def __init__(self, worker: "InferenceWorker", fn: Callable, args, kwargs, tag: Any):
        self.id = next(Job._ids)
        self.tag = tag
        self.cancel_event = threading.Event()
        self._worker = worker
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._events: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self.state = "queued"

    def report(self, payload) -> None:
        """Called on the worker thread: hands a progress payload to the main thread."""
        self._events.put((PROGRESS, payload))

    def _finish(self, kind: str, payload) -> None:
        self.state = kind
        self._events.put((kind, payload))

    @property
    def finished(self) -> bool:
        return self.state in (DONE, ERROR, CANCELLED)

    def poll(self, limit: Optional[int] = None) -> List[Tuple[str, Any]]:
        """(kind, payload) events ready now, oldest first (main thread); the last one of a job is
        DONE (payload: the result), ERROR (payload: (exception, traceback text)) or CANCELLED."""
        events = []
        while limit is None or len(events) < limit:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return events

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.tag!r}, {self.state})"


class InferenceWorker:
    """Runs submitted callables ``fn(job, *args, **kwargs)`` one at a time on a single daemon thread."""

    def __init__(self, name: str = "MedSAMInference"):
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._name = name
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.current: Optional[Job] = None

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def submit(self, fn: Callable, *args, tag: Any = None, **kwargs) -> Job:
        job = Job(self, fn, args, kwargs, tag)
        self._ensure_thread()
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled:
                job._finish(CANCELLED, None)
                continue
            self.current = job
            job.state = "running"
            try:
                result = job._fn(job, *job._args, **job._kwargs)
            except BaseException as exc:  # reported to the main thread, never raised here
                self.current = None
                job._finish(ERROR, (exc, traceback.format_exc()))
            else:
                self.current = None
                job._finish(DONE, result)

    @property
    def busy(self) -> bool:
        return self.current is not None or not self._jobs.empty()

    def cancel_all(self) -> None:
        current = self.current
        if current is not None:
            current.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                continue
            job.cancel()
            job._finish(CANCELLED, None)

    def stop(self, timeout: float = 5.0) -> bool:
        """Cancels every job and ends the thread; True when it ended within `timeout` seconds (a job in
        the middle of a slice finishes that slice first)."""
        self.cancel_all()
        self._jobs.put(None)
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()


_shared: Optional[InferenceWorker] = None


def shared_worker() -> InferenceWorker:
    """The process-wide worker (one per Slicer session)."""
    global _shared
    if _shared is None:
        _shared = InferenceWorker()
    return _shared


def stop_shared(timeout: float = 5.0) -> bool:
    """Stops the process-wide worker's thread (at application exit); True when it ended in time."""
    global _shared
    shared, _shared = _shared, None
    return shared.stop(timeout) if shared is not None else True
