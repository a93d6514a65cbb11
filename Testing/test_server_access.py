"""Who may reach the server and what it records (issue 13): named tokens, the token from the
environment, reloading the token file on SIGHUP, one access-log line per request naming the token
(never its value), the loopback Host check without tokens, uvicorn's connection limits and the
slow-header timeout, and /v1/info showing each user their own use. Real servers on loopback, the
tiny random checkpoint."""
from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from medsam_slicer.errors import InputError  # noqa: E402
from medsam_slicer.server.client import AuthError, RemoteEngine  # noqa: E402
from test_server import TOKEN_A, TOKEN_B, TOKEN_C, ServerProcess, _assert_4xx, private_token_file  # noqa: E402

SMALL = np.arange(2 * 16 * 16, dtype=np.int16).reshape(2, 16, 16)


def _wait_for(check, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout} s")


def _raw(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """One raw HTTP exchange (what a browser page or a hand-made client would send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return reply
            reply += chunk
            head, sep, body = reply.partition(b"\r\n\r\n")
            if sep and b"connection: close" in head.lower() and len(body) >= _content_length(head):
                return reply  # the whole reply (its body may come in a later packet)


def _content_length(head: bytes) -> int:
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


# ----------------------------------------------------------------------------------------------
# named tokens, the access log, SIGHUP


@pytest.fixture(scope="module")
def named(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("named")
    token_file = private_token_file(folder, f"# alice by name, the second by its place\nalice:{TOKEN_A}\n{TOKEN_B}\n")
    srv = ServerProcess(tiny_checkpoint, folder, token_file=str(token_file), log_level="info", max_sessions=8)
    srv.token_file = token_file
    yield srv.start()
    srv.stop()


def _access_lines(srv):
    with open(srv.log_path, errors="replace") as f:
        return [line for line in f if "medsam_slicer.access" in line]


def test_each_request_gets_one_access_line_with_the_tokens_name_not_its_value(named):
    before = len(_access_lines(named))
    assert requests.get(f"{named.url}/v1/info", headers={"Authorization": f"Bearer {TOKEN_A}"},
                        timeout=10).status_code == 200
    assert requests.get(f"{named.url}/v1/info", headers={"Authorization": f"Bearer {TOKEN_B}"},
                        timeout=10).status_code == 200
    assert requests.get(f"{named.url}/v1/info", headers={"Authorization": "Bearer wrong-0123456789abcdef"},
                        timeout=10).status_code == 403
    assert requests.get(f"{named.url}/v1/health", timeout=10).status_code == 200
    _wait_for(lambda: len(_access_lines(named)) >= before + 4, what="four access lines")
    lines = _access_lines(named)[before:]
    # the start-up's own health polls may still reach the log after `before` was counted
    while len(lines) > 4 and " GET /v1/health " in lines[0]:
        lines.pop(0)
    assert len(lines) == 4, lines
    assert " alice GET /v1/info 200 " in lines[0] and lines[0].rstrip().endswith(" ms")
    assert " token2 GET /v1/info 200 " in lines[1]
    assert " - GET /v1/info 403 " in lines[2]
    assert " - GET /v1/health 200 " in lines[3]
    log = open(named.log_path, errors="replace").read()
    assert TOKEN_A not in log and TOKEN_B not in log and "wrong-0123456789abcdef" not in log


def test_info_shows_each_user_their_own_use_and_the_servers_limits(named):
    alice = RemoteEngine(named.url, token=TOKEN_A)
    mine = [alice.open_session(SMALL + n, "mr") for n in range(2)]
    try:
        own = alice.info()
        other = RemoteEngine(named.url, token=TOKEN_B).info()
        assert own["user"] == "alice" and own["sessions"] == 2 and own["memory"]["used_bytes"] == 2 * SMALL.nbytes
        assert other["user"] == "token2" and other["sessions"] == 0 and other["memory"]["used_bytes"] == 0
        for reply in (own, other):
            assert reply["max_sessions"] == 8 and reply["max_sessions_per_user"] == 4
            assert reply["memory"]["budget_bytes"] > 0 and reply["memory"]["per_user_bytes"] > 0
            assert reply["max_request_bytes"] > 0 and reply["models"]
            for server_wide in ("sessions_open", "cache", "queue", "worker", "gpu"):
                assert server_wide not in reply
    finally:
        for session in mine:
            session.close()


def test_sighup_reloads_the_token_file(named):
    """A token removed from the file is refused after SIGHUP and its sessions are closed, a new one is
    accepted, a renamed one keeps its sessions; a file that fails the checks keeps the tokens in use."""
    alices = RemoteEngine(named.url, token=TOKEN_A).open_session(SMALL, "mr")
    seconds = RemoteEngine(named.url, token=TOKEN_B).open_session(SMALL, "mr")
    named.token_file.write_text(f"carol:{TOKEN_C}\nalice-renamed:{TOKEN_A}\n")
    named.proc.send_signal(signal.SIGHUP)

    def reloaded():
        return requests.get(f"{named.url}/v1/info", headers={"Authorization": f"Bearer {TOKEN_C}"},
                            timeout=10).status_code == 200

    _wait_for(reloaded, what="the new token accepted")
    with pytest.raises(AuthError, match="rejected the token"):
        RemoteEngine(named.url, token=TOKEN_B).info()
    assert RemoteEngine(named.url, token=TOKEN_A).info()["user"] == "alice-renamed"
    assert RemoteEngine(named.url, token=TOKEN_A).info()["sessions"] == 1  # alice's session survives
    assert alices.segment_slice("k", 1, [2, 2, 10, 10])[0].shape == (16, 16)
    assert alices.uploads == 1
    assert named.proc.poll() is None  # SIGHUP does not end the server

    os.chmod(named.token_file, 0o644)  # refused: the tokens in use stay
    named.token_file.write_text(f"{TOKEN_B}\n")
    named.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: "token file not reloaded" in named.log(), what="the refusal logged")
    assert "chmod 600" in named.log()
    assert RemoteEngine(named.url, token=TOKEN_C).info()["user"] == "carol"
    with pytest.raises(AuthError):
        RemoteEngine(named.url, token=TOKEN_B).info()
    alices.close()
    seconds.close()


def test_token_file_names_and_the_environment_variable(tmp_path):
    from medsam_slicer.server.serve import load_tokens

    path = private_token_file(tmp_path, f"alice:{TOKEN_A}\n{TOKEN_B}\n  bob : {TOKEN_C}  \n")
    assert load_tokens(token_file=str(path)) == [("alice", TOKEN_A), ("token2", TOKEN_B), ("bob", TOKEN_C)]
    for text, message in ((f"alice:{TOKEN_A}\nalice:{TOKEN_B}\n", "each token's name once"),
                          (f"a b:{TOKEN_A}\n", "name is 1-64"), (f"{TOKEN_A}\nx:{TOKEN_A}\n", "listed twice"),
                          ("alice:short\n", "at least 16 characters")):
        path = private_token_file(tmp_path, text)
        with pytest.raises(InputError, match=message):
            load_tokens(token_file=str(path))
    assert load_tokens(environ={"MEDSAM_SLICER_TOKEN": f" {TOKEN_C}\n"}) == [("token1", TOKEN_C)]
    assert load_tokens(token=TOKEN_A, environ={"MEDSAM_SLICER_TOKEN": TOKEN_C}) == [("token1", TOKEN_A)]
    assert load_tokens(environ={"MEDSAM_SLICER_TOKEN": ""}) == []


def test_a_server_takes_its_token_from_the_environment(tiny_checkpoint, tmp_path):
    srv = ServerProcess(tiny_checkpoint, tmp_path, env={"MEDSAM_SLICER_TOKEN": TOKEN_C}).start()
    try:
        _assert_4xx(requests.get(f"{srv.url}/v1/info", timeout=10), 401)
        assert RemoteEngine(srv.url, token=TOKEN_C).info()["user"] == "token1"
    finally:
        srv.stop()
    assert TOKEN_C not in " ".join(srv.proc.args)  # not on the command line, so not in `ps`


# ----------------------------------------------------------------------------------------------
# without a token: loopback Host only; connection limits and slow headers


@pytest.fixture(scope="module")
def open_server(tiny_checkpoint, tmp_path_factory):
    srv = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("open"), limit_concurrency=4, header_timeout=1.0)
    yield srv.start()
    srv.stop()


def test_without_a_token_only_loopback_host_names_are_answered(open_server, named):
    """DNS rebinding: a web page on evil.example whose name now resolves to 127.0.0.1 sends
    Host: evil.example; a server without tokens refuses it (421 Misdirected Request)."""
    port = open_server.port
    for host in (b"evil.example", b"evil.example:%d" % port, b"127.0.0.1.evil.example", b"localhost.evil",
                 b"[::1]x", b"10.0.0.1", b""):
        reply = _raw(port, b"GET /v1/health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert _status(reply) == 421, (host, reply[:200])
        assert b"host_not_allowed" in reply
    for host in (b"127.0.0.1:%d" % port, b"localhost:%d" % port, b"localhost", b"[::1]:%d" % port, b"127.0.0.1",
                 b"LOCALHOST"):
        reply = _raw(port, b"GET /v1/health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert _status(reply) == 200, (host, reply[:200])
    # with tokens the token protects the server: any Host is fine
    reply = _raw(named.port, b"GET /v1/health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert _status(reply) == 200


def test_slow_headers_are_cut_off_and_connections_are_limited(open_server):
    port = open_server.port
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end of the head
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)
        # 3 connections open + this one = the limit of 4: refused at once
        assert requests.get(f"{open_server.url}/v1/health", timeout=10).status_code == 503
        t0 = time.monotonic()
        assert slow.recv(100) == b""  # the server closed the slow connection after its 1 s header timeout
        assert time.monotonic() - t0 < 5
        for s in idle:
            assert s.recv(100) == b""
    finally:
        slow.close()
        for s in idle:
            s.close()
    _wait_for(lambda: requests.get(f"{open_server.url}/v1/health", timeout=10).status_code == 200,
              what="the server answering again")


def test_the_connection_settings_reach_uvicorn():
    from medsam_slicer.server.serve import SERVE_DEFAULTS, uvicorn_config

    config = uvicorn_config(object(), "127.0.0.1", 8765, "warning")
    assert config.limit_concurrency == SERVE_DEFAULTS["limit_concurrency"] == 64
    assert config.timeout_keep_alive == SERVE_DEFAULTS["timeout_keep_alive"]
    assert config.h11_max_incomplete_event_size == SERVE_DEFAULTS["max_header_bytes"]
    assert config.http.__name__ == "GuardedH11" and not config.access_log and not config.server_header
    config = uvicorn_config(object(), "127.0.0.1", 8765, limit_concurrency=7, timeout_keep_alive=2)
    assert config.limit_concurrency == 7 and config.timeout_keep_alive == 2
    with pytest.raises(InputError, match="--header-timeout must be a positive number"):
        uvicorn_config(object(), "127.0.0.1", 8765, header_timeout=-1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan that exited may wait for a reaper that never comes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_body_parsers_end_when_a_killed_server_cannot_stop_them():
    import subprocess
    import sys

    script = ("import time; from medsam_slicer.server.bodies import Parsers\n"
              "p = Parsers(); p.warm(); time.sleep(1.0)\n"
              "print(' '.join(str(pid) for pid in p._pool._processes), flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(v) for v in proc.stdout.readline().split()]
        assert pids and all(_running(pid) for pid in pids)
    finally:
        proc.kill()  # as the kernel's OOM killer or `kill -9` would: no shutdown code runs
        proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.5)
    assert not any(_running(pid) for pid in pids)
