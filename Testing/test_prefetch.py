"""Background prefetch: each slice encoded once, user calls overtake queued work, same results."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from medsam_slicer.fast_encoder import EncodeInterrupted
from medsam_slicer.predictor import SlicePredictor
from medsam_slicer.prefetch import PrefetchingPredictor
from medsam_slicer.windowing import choose_window

BOX = (20, 30, 60, 95)


class SlowEngine:
    """The tiny engine with a slow, interruptible encoder (10 steps of `step` seconds per slice) and
    a log of every encode started, finished and interrupted."""

    def __init__(self, engine, step=0.03):
        self.engine = engine
        self.device = engine.device
        self.model_id = engine.model_id
        self.max_batch = 1
        self.step = step
        self.log = []
        self.lock = threading.Lock()
        self.images = {}

    def tag(self, image):
        return self.images.get(image.tobytes()[:4096], "?")

    def encode_batch(self, images, interrupt=None):
        with self.lock:
            tags = [self.tag(img) for img in images]
            self.log.append(("start", tags))
            for _ in range(10):
                if interrupt is not None and interrupt():
                    self.log.append(("interrupted", tags))
                    raise EncodeInterrupted()
                time.sleep(self.step)
            out = self.engine.encode_batch(images)
            self.log.append(("done", tags))
            return out

    def encode(self, image):
        return self.encode_batch([image])[0:1]

    def decode(self, *args, **kwargs):
        return self.engine.decode(*args, **kwargs)

    def done(self):
        return [t for kind, tags in self.log if kind == "done" for t in tags]


@pytest.fixture()
def slow(tiny_engine, ct_array):
    engine = SlowEngine(tiny_engine)
    window = choose_window(ct_array)
    pred = SlicePredictor(engine, ct_array, window, "k")
    for k in range(ct_array.shape[0]):
        engine.images[pred.image(k).tobytes()[:4096]] = k
    assert len(engine.images) == ct_array.shape[0]  # every slice recognisable by its pixels
    wrapped = PrefetchingPredictor(pred)
    yield engine, pred, wrapped
    wrapped.close()


def test_prefetch_returns_at_once_and_encodes_each_slice_once(slow):
    engine, pred, wrapped = slow
    wrapped.prefetch(range(5, 11))
    wrapped.prefetch(range(8, 13))  # overlapping requests are not encoded twice
    assert engine.done() == [] and wrapped.prefetcher.pending() == 8  # queued, not encoded in the call
    for k in range(5, 13):
        mask, score = wrapped(k, BOX)
        assert mask.shape == wrapped.slice_shape and np.isfinite(score)
    assert wrapped.prefetcher.wait_idle(30)
    assert sorted(engine.done()) == list(range(5, 13))
    assert pred.encoded == 8


def test_user_request_overtakes_queued_prefetches(slow):
    engine, pred, wrapped = slow
    wrapped.prefetch(range(0, 12))  # about 3.6 s of queued encoding
    time.sleep(0.1)  # the thread is busy with slice 0
    wrapped(30, BOX)
    done_before = engine.done().index(30)
    assert done_before == 0, engine.log  # the running batch yielded; nothing queued went first
    assert wrapped.prefetcher.interrupted >= 1  # the running batch yielded to the user
    assert wrapped.prefetcher.wait_idle(30)
    assert sorted(engine.done()) == sorted(list(range(12)) + [30])  # the yielded slice was done later, once


def test_request_for_the_slice_in_flight_waits_instead_of_encoding_again(slow):
    engine, pred, wrapped = slow
    wrapped.prefetch([7])
    time.sleep(0.1)  # slice 7 is being encoded in the background
    wrapped(7, BOX)
    assert engine.done() == [7]
    assert wrapped.prefetcher.interrupted == 0


def test_focus_encodes_neighbours_nearest_first_and_cancel_stops(slow):
    engine, pred, wrapped = slow
    wrapped.focus(20, radius=2)
    assert wrapped.prefetcher.wait_idle(30)
    assert engine.done() == [20, 21, 19, 22, 18]
    wrapped.prefetch(range(0, 10))
    time.sleep(0.1)
    wrapped.cancel()
    assert wrapped.prefetcher.wait_idle(5)
    assert len(engine.done()) <= 6  # at most the batch running at cancel time finished


def test_decoding_does_not_wait_for_a_background_encode(tiny_engine, ct_array):
    window = choose_window(ct_array)
    engine = SlowEngine(tiny_engine, step=1.0)
    pred = SlicePredictor(engine, ct_array, window, "k")
    engine.images[pred.image(4).tobytes()[:4096]] = 4
    engine.step = 0.01
    with PrefetchingPredictor(pred) as wrapped:
        wrapped(3, BOX)  # cached
        engine.step = 1.0
        wrapped.prefetch([4])
        time.sleep(0.2)
        assert engine.log[-1] == ("start", [4])
        wrapped.probabilities(3, [BOX, (5, 5, 60, 60)])
        assert engine.log[-1] == ("start", [4])  # the re-prompt finished while the 10 s encode runs on
        assert wrapped.prefetcher.pending() == 1
        wrapped.cancel()


def test_propagation_through_prefetching_predictor_matches_plain(tiny_engine, ct_array):
    from medsam_slicer.propagation import propagate_from_slice

    window = choose_window(ct_array)
    plain = SlicePredictor(tiny_engine, ct_array, window, "k")
    expected = propagate_from_slice(plain, 17, seed_box=BOX, direction="both")
    fresh = SlicePredictor(tiny_engine, ct_array, window, "k", cache=None, key="other-volume-key")
    with PrefetchingPredictor(fresh) as wrapped:
        # the model's own margin and whether its score may stop growth pass through the wrapper
        assert wrapped.default_margin == fresh.default_margin
        assert wrapped.score_ranks_quality is fresh.score_ranks_quality is False  # ViT-B: unmeasured
        got = propagate_from_slice(wrapped, 17, seed_box=BOX, direction="both")
        assert wrapped.prefetcher.wait_idle(60)
    assert sorted(got.masks) == sorted(expected.masks)
    for k in expected.masks:
        np.testing.assert_array_equal(got.masks[k], expected.masks[k])
    assert fresh.encoded == plain.encoded  # the same slices, each encoded once


def test_background_session_focus_embeds_neighbours_once(tiny_engine, ct_array):
    """LocalSession(background=True): focus() embeds the viewed slice's neighbours, and prompting one
    of them afterwards costs only the decoder; results equal a plain session's."""
    from medsam_slicer.session import LocalSession
    from medsam_slicer.windowing import choose_window

    window = choose_window(ct_array)
    session = LocalSession(tiny_engine, ct_array, window, background=True)
    try:
        session.focus("k", 17, radius=1)
        pred = session.predictor("k")
        assert pred.prefetcher.wait_idle(120)
        assert pred.encoded == 3 and all(pred.is_cached(i) for i in (16, 17, 18))
        mask, _ = session.segment_slice("k", 18, (20, 30, 60, 95))
        assert pred.encoded == 3  # decoder only
        plain, _ = LocalSession(tiny_engine, ct_array, window).segment_slice("k", 18, (20, 30, 60, 95))
        assert (mask == plain).all()
    finally:
        session.close()


def test_cpu_prefetch_hint_encodes_nothing_ahead(tiny_engine, ct_array):
    """On a CPU (max_batch 1) SlicePredictor.prefetch is only a hint: growth that stops early never
    pays for slices past the structure's end."""
    from medsam_slicer.predictor import SlicePredictor
    from medsam_slicer.windowing import choose_window

    assert tiny_engine.max_batch == 1
    pred = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array), "k")
    pred.prefetch([3, 4, 5, 6])
    assert pred.encoded == 0
