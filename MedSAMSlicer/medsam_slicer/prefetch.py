"""Background encoding: embed the slices a user is likely to visit next, and keep propagation's
next slices encoding while the current one is decoded.

`PrefetchingPredictor(predictor)` wraps a `SlicePredictor` and offers the same interface
(`__call__(index, box)`, `n_slices`, `slice_shape`, `image`, `probabilities`, `prefetch`, `encoded`),
plus `focus(index)` for speculative neighbours. One background thread does the encoding:

* `prefetch(indices)` (what propagation calls) queues the slices and returns at once; they are
  encoded in order, `engine.max_batch` slices per encoder call (several on a GPU, one on a CPU).
* `focus(index, radius)` replaces the speculative queue with the uncached neighbours of `index`,
  nearest first. These run after any `prefetch` work.
* A user call never waits behind the queue: the thread takes one encoder batch at a time and
  checks between transformer blocks whether a foreground call needs the encoder for another slice;
  if so it abandons that batch (it is queued again) and lets the foreground call run. A foreground
  call for a slice that is being encoded in the background waits for that encode instead of
  starting a second one, so every slice is encoded once. Decoding uses its own engine lock, so a
  re-prompt on a cached slice does not wait for a background encode at all.
* `cancel()` drops the queues and interrupts the batch in progress; `close()` also ends the thread.
"""
from __future__ import annotations

import atexit
import threading
import weakref
from collections import deque
from typing import Deque, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .cache import own_copy

# A background thread still inside torch when the interpreter (or Slicer) exits aborts the
# process, so every prefetcher left open is stopped and joined at exit.
_LIVE: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for prefetcher in list(_LIVE):
        prefetcher.close()


class Prefetcher:
    """The background thread over one `SlicePredictor` (use it through PrefetchingPredictor)."""

    def __init__(self, predictor, batch_size: Optional[int] = None):
        self.predictor = predictor
        engine = predictor.engine
        self.batch_size = max(1, int(batch_size or getattr(engine, "max_batch", 1)))
        self._cond = threading.Condition()
        self._urgent: Deque[int] = deque()  # from prefetch(): propagation's next slices
        self._speculative: Deque[int] = deque()  # from focus(): neighbours of the viewed slice
        self._inflight: Dict[int, threading.Event] = {}
        self._foreground = 0  # foreground calls that need the encoder for a slice not in flight
        self._cancel_batch = False
        self._closed = False
        self.encoded = 0  # slices this thread encoded to completion
        self.interrupted = 0  # batches abandoned for a foreground call or cancel()
        self.errors: List[BaseException] = []
        _LIVE.add(self)
        self._thread = threading.Thread(target=self._loop, name="medsam-prefetch", daemon=True)
        self._thread.start()

    # -- queueing ---------------------------------------------------------------------------
    def _wanted(self, index: int) -> bool:
        return 0 <= index < self.predictor.n_slices and index not in self._inflight and not self.predictor.is_cached(index)

    def prefetch(self, indices: Iterable[int]) -> None:
        with self._cond:
            for i in indices:
                i = int(i)
                if self._wanted(i) and i not in self._urgent:
                    self._urgent.append(i)
            self._cond.notify_all()

    def focus(self, index: int, radius: int = 2) -> None:
        """Speculatively encode index, index+1, index-1, ... index±radius (replacing older wishes)."""
        order = [int(index)]
        for d in range(1, int(radius) + 1):
            order += [int(index) + d, int(index) - d]
        with self._cond:
            self._speculative.clear()
            self._speculative.extend(i for i in order if self._wanted(i))
            self._cond.notify_all()

    def cancel(self) -> None:
        """Drops every queued slice and interrupts the batch being encoded."""
        with self._cond:
            self._urgent.clear()
            self._speculative.clear()
            if self._inflight:
                self._cancel_batch = True
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
        self.cancel()
        self._thread.join(timeout)

    def pending(self) -> int:
        with self._cond:
            return len(self._urgent) + len(self._speculative) + len(self._inflight)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Blocks until both queues are empty and nothing is in flight (tests, benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._urgent or self._speculative or self._inflight), timeout)

    # -- foreground side --------------------------------------------------------------------
    def embedding(self, index: int):
        """The embedding of one slice for a user call: from the cache, from the background encode
        already running for it, or encoded right now (interrupting a background batch)."""
        pred = self.predictor
        while True:
            with self._cond:
                event = self._inflight.get(index)
                if event is None:
                    if pred.is_cached(index):
                        emb = pred.cache.get(pred.cache_key(index))
                        if emb is not None:
                            return emb
                    self._foreground += 1
                    for q in (self._urgent, self._speculative):
                        if index in q:
                            q.remove(index)
                    break
            event.wait()  # encoded once, in the background; then read it from the cache
        try:
            return pred.embedding(index)
        finally:
            with self._cond:
                self._foreground -= 1
                self._cond.notify_all()

    # -- background side --------------------------------------------------------------------
    def _interrupt(self) -> bool:
        return self._foreground > 0 or self._cancel_batch or self._closed

    def _next_batch(self) -> List[int]:
        batch: List[int] = []
        for q in (self._urgent, self._speculative):
            while q and len(batch) < self.batch_size:
                i = q.popleft()
                if self._wanted(i) and i not in batch:
                    batch.append(i)
            if batch:
                break  # never mix urgent and speculative slices in one batch
        return batch

    def _loop(self) -> None:
        pred = self.predictor
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._foreground == 0 and (self._urgent or self._speculative)))
                if self._closed:
                    return
                batch = self._next_batch()
                if not batch:
                    continue
                events = {i: threading.Event() for i in batch}
                self._inflight.update(events)
                self._cancel_batch = False
            done = interrupted = False
            try:
                images = [pred.image(i) for i in batch]
                embs = pred.engine.encode_batch(images, interrupt=self._interrupt)
                for n, i in enumerate(batch):
                    pred.cache.put(pred.cache_key(i), own_copy(embs, n))
                pred.encoded += len(batch)
                done = True
            except Exception as exc:  # noqa: BLE001 - kept for the caller; the thread goes on
                from .fast_encoder import EncodeInterrupted

                if isinstance(exc, EncodeInterrupted):
                    interrupted = True
                else:
                    self.errors.append(exc)
            with self._cond:
                for i in batch:
                    self._inflight.pop(i, None)
                if done:
                    self.encoded += len(batch)
                elif interrupted:
                    self.interrupted += 1
                    if not (self._cancel_batch or self._closed):  # yielded to a user call: retry later
                        self._urgent.extendleft(reversed([i for i in batch if not pred.is_cached(i)]))
                self._cancel_batch = False
                self._cond.notify_all()
            for event in events.values():
                event.set()


class PrefetchingPredictor:
    """A SlicePredictor whose `prefetch` runs in the background (same interface, plus `focus`)."""

    def __init__(self, predictor, batch_size: Optional[int] = None):
        self.predictor = predictor
        self.prefetcher = Prefetcher(predictor, batch_size)

    def __getattr__(self, name: str):
        # the rest of the SlicePredictor interface (n_slices, slice_shape, engine, window, image,
        # default_margin, score_ranks_quality, ...) is the wrapped predictor's own: forwarded, so a
        # property added there is never missing here
        if name in ("predictor", "prefetcher"):  # not set yet (during __init__ or unpickling)
            raise AttributeError(name)
        return getattr(self.predictor, name)

    def embedding(self, index: int):
        if not 0 <= index < self.n_slices:
            self.predictor.image(index)  # raises the predictor's own out-of-range InputError
        return self.prefetcher.embedding(int(index))

    def prefetch(self, indices: Iterable[int]) -> None:
        """Queues the slices for background encoding and returns at once."""
        self.prefetcher.prefetch(indices)

    def focus(self, index: int, radius: int = 2) -> None:
        self.prefetcher.focus(index, radius)

    def probabilities(self, index: int, boxes) -> Tuple[np.ndarray, np.ndarray]:
        emb = self.embedding(index)
        return self.predictor.engine.decode(emb, np.asarray(boxes, dtype=np.float64), self.slice_shape)

    def __call__(self, index: int, box) -> Tuple[np.ndarray, float]:
        prob, score = self.probabilities(index, [box])
        if getattr(self.predictor, "keep_probabilities", False):
            self.predictor.kept.setdefault(index, []).append(prob[0])
        return prob[0] > 0.5, float(score[0])

    def cancel(self) -> None:
        self.prefetcher.cancel()

    def close(self) -> None:
        self.prefetcher.close()

    def __enter__(self) -> "PrefetchingPredictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
