"""The GPU worker queue with the real tiny engine: priority, round-robin, batching, cancel, closing."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from medsam_slicer.cache import EmbeddingCache
from medsam_slicer.predictor import SlicePredictor
from medsam_slicer.server.scheduler import Scheduler, ScheduledPredictor, SessionGone
from medsam_slicer.windowing import choose_window

BOX = [30, 40, 90, 100]
WAIT_S = 300


class GatedPredictor(ScheduledPredictor):
    """Holds the worker inside its first image() until the test opens the gate (to queue work behind it)."""

    def __init__(self, gate: threading.Event, entered: threading.Event, **kwargs):
        super().__init__(**kwargs)
        self.gate, self.entered = gate, entered

    def image(self, index):
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        return super().image(index)


@pytest.fixture()
def volume(ct_array):
    return np.ascontiguousarray(ct_array[8:24])


@pytest.fixture()
def parts(tiny_engine, volume):
    scheduler = Scheduler(tiny_engine, max_batch=4)
    cache = EmbeddingCache(2**30)
    window = choose_window(volume)

    def make(group, interactive=False, job=None, cls=ScheduledPredictor, key="vol", **extra):
        return cls(scheduler=scheduler, group=group, interactive=interactive, job=job, engine=tiny_engine,
                   volume=volume, window=window, axis="k", cache=cache, key=key, **extra)

    def blocker():
        gate, entered = threading.Event(), threading.Event()
        pred = make("blocker", True, cls=GatedPredictor, key="blocker", gate=gate, entered=entered)
        future = scheduler.decode(pred, 0, [BOX], "blocker", True)
        assert entered.wait(WAIT_S)  # the worker is now inside the blocker
        return gate, future

    yield scheduler, make, blocker, window
    scheduler.stop()


def test_round_robin_across_sessions_and_prompts_first(parts):
    scheduler, make, blocker, _ = parts
    a, b, c = make("A"), make("B"), make("C", interactive=True)
    order = []
    gate, blocked = blocker()
    futures = []
    for n in range(6):
        futures.append(scheduler.decode(a, n, [BOX], "A", False))
        futures[-1].add_done_callback(lambda f, n=n: order.append(f"A{n}"))
    for n in range(2):
        futures.append(scheduler.decode(b, 8 + n, [BOX], "B", False))
        futures[-1].add_done_callback(lambda f, n=n: order.append(f"B{n}"))
    futures.append(scheduler.decode(c, 12, [BOX], "C", True))
    futures[-1].add_done_callback(lambda f: order.append("C"))
    gate.set()
    for f in futures + [blocked]:
        f.result(WAIT_S)
    # the single prompt jumps the queue; the two long jobs alternate slice by slice
    assert order == ["C", "A0", "B0", "A1", "B1", "A2", "A3", "A4", "A5"]


def test_a_long_job_delays_a_prompt_by_about_one_slice(parts):
    scheduler, make, _, _ = parts
    job, user = make("job"), make("user", interactive=True)
    long_job = [scheduler.decode(job, n, [BOX], "job", False) for n in range(16)]
    long_job[0].result(WAIT_S)
    done_before = sum(f.done() for f in long_job)
    prompt = scheduler.decode(user, 5, [[20, 30, 80, 90]], "user", True)
    prompt.result(WAIT_S)
    done_after = sum(f.done() for f in long_job)
    assert done_after - done_before <= 2, (done_before, done_after)
    assert done_after < 16
    for f in long_job:
        f.result(WAIT_S)


def test_waiting_slices_share_one_encoder_call_and_results_stay_exact(parts, tiny_engine, volume):
    scheduler, make, blocker, window = parts
    users = [make(f"user{n}", interactive=True, key=f"vol{n}") for n in range(3)]
    gate, blocked = blocker()
    calls_before = scheduler.stats["encoder_calls"]
    prompts = [scheduler.decode(p, 3 + n, [BOX], p.group, True) for n, p in enumerate(users)]
    jobs = [make(f"job{n}", key=f"jvol{n}") for n in range(3)]
    encodes = [scheduler.encode(p, 9, p.group, False) for p in jobs]
    gate.set()
    blocked.result(WAIT_S)
    results = [f.result(WAIT_S) for f in prompts]
    for f in encodes:
        f.result(WAIT_S)
    # blocker (1 call) + the three prompts (1 call) + the three job slices (1 call)
    assert scheduler.stats["encoder_calls"] - calls_before == 3
    assert scheduler.stats["largest_batch"] == 3
    assert all(p.encoded == 1 for p in users + jobs)
    plain = SlicePredictor(tiny_engine, volume, window, "k")
    for n, (probs, scores) in enumerate(results):
        expected_probs, expected_scores = plain.probabilities(3 + n, [BOX])
        np.testing.assert_array_equal(probs > 0.5, expected_probs > 0.5)
        np.testing.assert_allclose(probs, expected_probs, atol=1e-5)


def test_cancelled_prefetch_is_skipped_and_closing_drops_queued_work(parts):
    scheduler, make, blocker, _ = parts
    cancel = threading.Event()
    job = make("job", job=cancel)
    other = make("other", key="other")
    gate, blocked = blocker()
    job.prefetch(range(8))
    queued = [scheduler.decode(other, n, [BOX], "other", False) for n in range(3)]
    cancel.set()
    assert scheduler.drop_group("other") == 3
    gate.set()
    blocked.result(WAIT_S)
    for f in queued:
        with pytest.raises(SessionGone):
            f.result(WAIT_S)
    # the cancelled job's prefetch tasks finish without encoding anything
    job.scheduler.decode(make("probe", interactive=True, key="probe"), 0, [BOX], "probe", True).result(WAIT_S)
    for _ in range(100):
        if not scheduler.queued()["bulk"]:
            break
        threading.Event().wait(0.05)
    assert scheduler.queued() == {"interactive": 0, "bulk": 0}
    assert job.encoded == 0


def test_scheduled_predictor_is_a_drop_in_slice_predictor(parts, tiny_engine, volume):
    _, make, _, window = parts
    pred = make("s", interactive=True)
    plain = SlicePredictor(tiny_engine, volume, window, "k")
    mask, score = pred(4, BOX)
    expected, expected_score = plain(4, BOX)
    assert np.array_equal(mask, expected) and score == expected_score
    assert pred.n_slices == plain.n_slices and pred.slice_shape == plain.slice_shape
    with pytest.raises(Exception, match="outside the volume"):
        pred(99, BOX)


def test_a_waiting_prompt_preempts_a_background_encode(parts):
    scheduler, make, _, _ = parts
    if not scheduler._interruptible:
        pytest.skip("this engine's encoder cannot be interrupted")
    gate, entered = threading.Event(), threading.Event()
    job = make("job", cls=GatedPredictor, key="gated-job", gate=gate, entered=entered)
    user = make("user", interactive=True)
    order = []
    background = scheduler.decode(job, 2, [BOX], "job", False)
    background.add_done_callback(lambda f: order.append("job"))
    assert entered.wait(WAIT_S)  # the worker is preparing the background slice
    prompt = scheduler.decode(user, 6, [BOX], "user", True)
    prompt.add_done_callback(lambda f: order.append("prompt"))
    gate.set()  # the encoder starts, sees the waiting prompt, stops and requeues
    prompt.result(WAIT_S)
    probs, _ = background.result(WAIT_S)
    assert order == ["prompt", "job"]
    assert scheduler.stats["preempted"] == 1
    assert job.encoded == 1 and probs.shape == (1, 128, 128)
