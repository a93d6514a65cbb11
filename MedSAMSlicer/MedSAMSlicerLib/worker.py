"""One persistent inference thread, and a queue of its events for the main thread to poll.

torch (and the engine) only ever run on this thread. The thread never touches MRML or Qt: jobs
report through ``job.report(payload)`` and finish with a result or an error; the main thread calls
``poll()`` from a qt.QTimer and applies the events there.
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
        self.state = "queued"

    def report(self, payload) -> None:
        """Called on the worker thread: hands a progress payload to the main thread."""
        self._worker._events.put((self, PROGRESS, payload))

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
        self._events: "queue.Queue[Tuple[Job, str, Any]]" = queue.Queue()
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
                job.state = CANCELLED
                self._events.put((job, CANCELLED, None))
                continue
            self.current = job
            job.state = "running"
            try:
                result = job._fn(job, *job._args, **job._kwargs)
            except BaseException as exc:  # reported to the main thread, never raised here
                job.state = ERROR
                self._events.put((job, ERROR, (exc, traceback.format_exc())))
            else:
                job.state = DONE
                self._events.put((job, DONE, result))
            finally:
                self.current = None

    @property
    def busy(self) -> bool:
        return self.current is not None or not self._jobs.empty()

    def poll(self, limit: Optional[int] = None) -> List[Tuple[Job, str, Any]]:
        """Events ready now, oldest first (main thread)."""
        events = []
        while limit is None or len(events) < limit:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return events

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
            job.state = CANCELLED
            self._events.put((job, CANCELLED, None))

    def stop(self, timeout: float = 5.0) -> None:
        self.cancel_all()
        self._jobs.put(None)
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


_shared: Optional[InferenceWorker] = None


def shared_worker() -> InferenceWorker:
    """The process-wide worker (one per Slicer session)."""
    global _shared
    if _shared is None:
        _shared = InferenceWorker()
    return _shared
