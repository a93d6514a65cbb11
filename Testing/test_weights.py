"""The weights manager against a real HTTP server on 127.0.0.1 (Range, cuts, redirects, errors)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medsam_slicer import weights
from medsam_slicer.errors import InputError, WeightsError

SIZE = 3 * 1024 * 1024 + 12345  # not a multiple of the download chunk
CUT = 1_300_001  # bytes sent before the server drops an interrupted response
TIMEOUT = 5.0


def make_bytes(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


DATA = make_bytes(0)
DATA_SHA = hashlib.sha256(DATA).hexdigest()


class Behaviour:
    """What the server does; tests change it between downloads."""

    def __init__(self):
        self.data = DATA
        self.etag = '"v1"'
        self.honor_range = True
        self.cut_after = None  # int: close the connection after this many body bytes, once
        self.status = None  # int: answer every request with this status and no body
        self.linked_sha = None  # str: X-Linked-Etag on the /resolve/ redirect
        self.stall = None  # threading.Event: send headers then wait on it
        self.max_range = None  # int: a 206 carries at most this many bytes (as some CDNs do)
        self.range_from_zero = False  # bug: answer any Range with a 206 that starts at byte 0
        self.requests = []  # (path, headers dict) of every request


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        b = self.server.behaviour
        b.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        if b.status is not None:
            self.send_response(b.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/resolve/"):
            self.send_response(302)
            self.send_header("Location", "/cdn/" + self.path[len("/resolve/"):])
            if b.linked_sha:
                self.send_header("X-Linked-Etag", f'"{b.linked_sha}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, start = b.data, 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and b.honor_range and (if_range is None or if_range == b.etag):
            start = 0 if b.range_from_zero else int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = len(data) if b.max_range is None else min(len(data), start + b.max_range)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
            end = len(data)
        body = data[start:end]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", b.etag)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if b.stall is not None:
            self.wfile.flush()
            b.stall.wait(10)
            return
        if b.cut_after is not None:
            cut, b.cut_after = b.cut_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # dropped connections are the point of some tests


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def server():
    srv = QuietServer(("127.0.0.1", 0), Handler)
    srv.behaviour = Behaviour()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.url = srv.base + "/files/model.safetensors"
    yield srv
    if srv.behaviour.stall is not None:
        srv.behaviour.stall.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_manual_route(message: str):
    assert "\n" not in message
    assert weights.DRIVE_FOLDER in message
    assert weights.HF_PAGE in message
    assert "--checkpoint FILE" in message


# ----------------------------------------------------------------------------------------- paths


def test_cache_dir_env_argument_and_platform_default(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "env"))
    assert weights.cache_dir() == str(tmp_path / "env")
    assert weights.cache_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert weights.default_weights_path() == str(tmp_path / "env" / "medsam_vit_b.safetensors")
    assert not (tmp_path / "env").exists()  # asking for the path creates nothing
    monkeypatch.delenv(weights.CACHE_ENV)
    from platformdirs import user_cache_dir

    assert weights.cache_dir() == os.path.abspath(user_cache_dir("medsam-slicer"))
    monkeypatch.setenv(weights.CACHE_ENV, "   ")  # blank: ignored
    assert weights.cache_dir() == os.path.abspath(user_cache_dir("medsam-slicer"))


def test_default_source_lands_as_medsam_safetensors(cache):
    assert weights.DEFAULT_URL == "https://huggingface.co/wanglab/medsam-vit-base/resolve/main/model.safetensors"
    assert weights._resolve_dest(weights.DEFAULT_URL, None, None) == str(cache / "medsam_vit_b.safetensors")
    assert weights._resolve_dest("http://h/x/other.pth", None, None) == str(cache / "other.pth")


def test_sha256_file_matches_hashlib_and_reports_missing(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    assert weights.sha256_file(str(path), chunk_size=4099) == DATA_SHA
    with pytest.raises(WeightsError, match="no such file"):
        weights.sha256_file(str(tmp_path / "absent"))


# -------------------------------------------------------------------------------------- download


def test_full_download_verifies_and_records_digest(server, cache):
    seen = []
    path = weights.download(server.url, expected_sha256=DATA_SHA.upper(), progress=False, timeout=TIMEOUT,
                            progress_callback=lambda done, total: seen.append((done, total)))
    assert path == str(cache / "model.safetensors")
    with open(path, "rb") as handle:
        assert handle.read() == DATA
    assert leftovers(cache) == ["model.safetensors", "model.safetensors.sha256"]
    assert (cache / "model.safetensors.sha256").read_text().split() == [DATA_SHA, "model.safetensors"]
    assert seen[0] == (0, SIZE) and seen[-1] == (SIZE, SIZE)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert "range" not in server.behaviour.requests[0][1]
    assert server.behaviour.requests[0][1]["accept-encoding"] == "identity"


def test_progress_bar_goes_to_stderr(server, cache, capsys):
    weights.download(server.url, progress=True, timeout=TIMEOUT)
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "100%" in err
    weights.download(server.url, dest=str(cache / "again.bin"), progress=False, timeout=TIMEOUT)
    assert capsys.readouterr().err == ""


def test_pinned_digest_mismatch_deletes_download(server, cache, monkeypatch):
    monkeypatch.setitem(weights.PINNED_SHA256, "medsam_vit_b.safetensors", "ab" * 32)
    dest = cache / "medsam_vit_b.safetensors"
    with pytest.raises(WeightsError) as info:
        weights.download(server.url, dest=str(dest), progress=False, timeout=TIMEOUT)
    message = str(info.value)
    assert "pinned SHA-256" in message and "deleted" in message and "\n" not in message
    assert leftovers(cache) == []  # no final file, no .part, no digest record


def test_pinned_digest_match_is_accepted(server, cache, monkeypatch):
    monkeypatch.setitem(weights.PINNED_SHA256, "medsam_vit_b.safetensors", DATA_SHA)
    dest = cache / "medsam_vit_b.safetensors"
    assert weights.download(server.url, dest=str(dest), progress=False, timeout=TIMEOUT) == str(dest)
    assert weights.verify(str(dest)) == DATA_SHA
    dest.write_bytes(DATA[:-1] + b"\0")
    with pytest.raises(WeightsError, match="pinned SHA-256"):
        weights.verify(str(dest))


def test_explicit_digest_mismatch_and_bad_digest_argument(server, cache):
    with pytest.raises(WeightsError, match="expected SHA-256"):
        weights.download(server.url, expected_sha256="0" * 64, progress=False, timeout=TIMEOUT)
    assert leftovers(cache) == []
    with pytest.raises(InputError, match="64 hexadecimal"):
        weights.download(server.url, expected_sha256="1234", progress=False, timeout=TIMEOUT)


def test_interrupted_download_resumes_with_range(server, cache):
    server.behaviour.cut_after = CUT
    with pytest.raises(WeightsError) as info:
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    assert_manual_route(str(info.value))
    part = cache / "model.safetensors.part"
    assert not (cache / "model.safetensors").exists()
    have = part.stat().st_size
    assert 0 < have <= CUT
    assert part.read_bytes() == DATA[:have]
    meta = json.loads((cache / "model.safetensors.part.json").read_text())
    assert meta["url"] == server.url and meta["total"] == SIZE

    seen = []
    path = weights.download(server.url, progress=False, timeout=TIMEOUT,
                            progress_callback=lambda done, total: seen.append(done))
    headers = server.behaviour.requests[-1][1]
    assert headers["range"] == f"bytes={have}-"
    assert headers["if-range"] == '"v1"'
    assert seen[0] == have and seen[-1] == SIZE
    with open(path, "rb") as handle:
        assert handle.read() == DATA
    assert leftovers(cache) == ["model.safetensors", "model.safetensors.sha256"]
    assert weights.verify(path) == DATA_SHA  # the digest covers the resumed bytes too


def test_server_ignoring_range_restarts_from_zero(server, cache):
    server.behaviour.honor_range = False
    server.behaviour.cut_after = CUT
    with pytest.raises(WeightsError):
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    assert (cache / "model.safetensors.part").stat().st_size > 0
    path = weights.download(server.url, expected_sha256=DATA_SHA, progress=False, timeout=TIMEOUT)
    assert "range" in server.behaviour.requests[-1][1]  # asked to resume, got the whole file
    with open(path, "rb") as handle:
        assert handle.read() == DATA
    assert not (cache / "model.safetensors.part").exists()


def test_changed_remote_file_restarts_instead_of_splicing(server, cache):
    server.behaviour.cut_after = CUT
    with pytest.raises(WeightsError):
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    new = make_bytes(1)
    server.behaviour.data, server.behaviour.etag = new, '"v2"'
    path = weights.download(server.url, progress=False, timeout=TIMEOUT)
    assert server.behaviour.requests[-1][1]["if-range"] == '"v1"'
    with open(path, "rb") as handle:
        assert handle.read() == new


def test_short_ranges_are_continued(server, cache):
    server.behaviour.cut_after = CUT
    with pytest.raises(WeightsError):
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    server.behaviour.max_range = 700_000
    path = weights.download(server.url, expected_sha256=DATA_SHA, progress=False, timeout=TIMEOUT)
    ranges = [h["range"] for _, h in server.behaviour.requests[1:]]
    have = int(ranges[0][len("bytes="):-1])
    assert 0 < have <= CUT
    assert ranges == [f"bytes={start}-" for start in range(have, SIZE, 700_000)]
    with open(path, "rb") as handle:
        assert handle.read() == DATA


def test_range_answer_at_wrong_offset_restarts(server, cache):
    server.behaviour.cut_after = CUT
    with pytest.raises(WeightsError):
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    have = (cache / "model.safetensors.part").stat().st_size
    server.behaviour.range_from_zero = True
    path = weights.download(server.url, expected_sha256=DATA_SHA, progress=False, timeout=TIMEOUT)
    assert [h.get("range") for _, h in server.behaviour.requests[1:]] == [f"bytes={have}-", None]
    with open(path, "rb") as handle:
        assert handle.read() == DATA


def test_part_from_another_url_is_discarded(server, cache):
    cache.mkdir()
    (cache / "model.safetensors.part").write_bytes(b"x" * 1000)
    (cache / "model.safetensors.part.json").write_text(json.dumps({"url": "http://elsewhere/m", "total": SIZE}))
    path = weights.download(server.url, progress=False, timeout=TIMEOUT)
    assert "range" not in server.behaviour.requests[-1][1]
    with open(path, "rb") as handle:
        assert handle.read() == DATA


def test_part_without_note_is_not_resumed(server, cache):
    cache.mkdir()
    (cache / "model.safetensors.part").write_bytes(DATA[:5000])
    weights.download(server.url, expected_sha256=DATA_SHA, progress=False, timeout=TIMEOUT)
    assert "range" not in server.behaviour.requests[-1][1]


def test_unsatisfiable_range_restarts(server, cache):
    cache.mkdir()
    (cache / "model.safetensors.part").write_bytes(DATA + b"extra")
    (cache / "model.safetensors.part.json").write_text(json.dumps({"url": server.url, "total": None}))
    path = weights.download(server.url, expected_sha256=DATA_SHA, progress=False, timeout=TIMEOUT)
    statuses = [h.get("range") for _, h in server.behaviour.requests]
    assert statuses == [f"bytes={SIZE + 5}-", None]
    with open(path, "rb") as handle:
        assert handle.read() == DATA


def test_complete_part_is_finalized_without_network(server, cache):
    cache.mkdir()
    (cache / "model.safetensors.part").write_bytes(DATA)
    (cache / "model.safetensors.part.json").write_text(json.dumps({"url": server.url, "total": SIZE}))
    path = weights.download(server.url, expected_sha256=DATA_SHA, progress=False, timeout=TIMEOUT)
    assert server.behaviour.requests == []
    assert leftovers(cache) == ["model.safetensors", "model.safetensors.sha256"]
    with open(path, "rb") as handle:
        assert handle.read() == DATA


def test_http_404_names_manual_route_and_keeps_part(server, cache):
    server.behaviour.cut_after = CUT
    with pytest.raises(WeightsError):
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    have = (cache / "model.safetensors.part").stat().st_size
    server.behaviour.status = 404
    with pytest.raises(WeightsError) as info:
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    message = str(info.value)
    assert_manual_route(message)
    assert "HTTP 404" in message and server.url in message
    assert not (cache / "model.safetensors").exists()
    assert (cache / "model.safetensors.part").stat().st_size == have  # kept for a later resume


def test_refused_connection_names_manual_route(cache):
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        url = f"http://127.0.0.1:{blocker.getsockname()[1]}/model.safetensors"
        with pytest.raises(WeightsError) as info:
            weights.download(url, progress=False, timeout=TIMEOUT)
    finally:
        blocker.close()
    message = str(info.value)
    assert_manual_route(message)
    assert "refused" in message.lower()
    assert leftovers(cache) == []


def test_stalled_server_times_out(server, cache):
    server.behaviour.stall = threading.Event()
    with pytest.raises(WeightsError) as info:
        weights.download(server.url, progress=False, timeout=0.5)
    assert "timed out" in str(info.value)
    assert_manual_route(str(info.value))
    assert not (cache / "model.safetensors").exists()


def test_bad_url_is_an_input_error(cache):
    with pytest.raises(InputError, match="http"):
        weights.download("ftp://example.org/model.safetensors", progress=False)
    with pytest.raises(InputError):
        weights.download("model.safetensors", progress=False)


def test_advertised_lfs_digest_is_checked(server, cache):
    url = server.base + "/resolve/model.safetensors"
    server.behaviour.linked_sha = "cd" * 32
    with pytest.raises(WeightsError, match="server-advertised"):
        weights.download(url, progress=False, timeout=TIMEOUT)
    assert leftovers(cache) == []
    server.behaviour.linked_sha = DATA_SHA
    path = weights.download(url, progress=False, timeout=TIMEOUT)
    with open(path, "rb") as handle:
        assert handle.read() == DATA


def test_not_enough_disk_space(server, cache, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(WeightsError, match="not enough disk space"):
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    assert not (cache / "model.safetensors").exists()


def test_callback_exception_stops_and_keeps_part(server, cache):
    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done > CUT:
            raise Cancelled()

    with pytest.raises(Cancelled):
        weights.download(server.url, progress=False, timeout=TIMEOUT, progress_callback=cancel)
    assert not (cache / "model.safetensors").exists()
    have = (cache / "model.safetensors.part").stat().st_size
    assert have > CUT
    path = weights.download(server.url, progress=False, timeout=TIMEOUT)
    assert server.behaviour.requests[-1][1]["range"] == f"bytes={have}-"
    assert weights.verify(path) == DATA_SHA


# ------------------------------------------------------------------------- trust on first use, verify


def test_trust_on_first_use_detects_tampering(server, cache):
    path = weights.download(server.url, progress=False, timeout=TIMEOUT)
    assert weights.recorded_sha256(path) == DATA_SHA
    assert weights.verify(path) == DATA_SHA
    with open(path, "r+b") as handle:
        handle.seek(SIZE // 2)
        handle.write(b"\xff" if DATA[SIZE // 2] != 0xFF else b"\x00")
    with pytest.raises(WeightsError) as info:
        weights.verify(path)
    message = str(info.value)
    assert "recorded SHA-256" in message and "model.safetensors.sha256" in message and "\n" not in message
    assert os.path.exists(path)  # verify() reports, it does not delete


def test_redownload_must_match_first_recorded_digest(server, cache):
    path = weights.download(server.url, progress=False, timeout=TIMEOUT)
    os.remove(path)
    server.behaviour.data = make_bytes(2)
    with pytest.raises(WeightsError, match="recorded SHA-256"):
        weights.download(server.url, progress=False, timeout=TIMEOUT)
    assert leftovers(cache) == ["model.safetensors.sha256"]
    assert weights.recorded_sha256(path) == DATA_SHA


def test_verify_missing_file_and_first_use_recording(tmp_path):
    with pytest.raises(WeightsError, match="missing"):
        weights.verify(str(tmp_path / "nothing.pth"))
    path = tmp_path / "manual.pth"
    path.write_bytes(b"weights")
    digest = weights.verify(str(path))
    assert digest == hashlib.sha256(b"weights").hexdigest()
    assert weights.recorded_sha256(str(path)) == digest
    (tmp_path / "manual.pth.sha256").write_text("garbage\n")
    with pytest.raises(WeightsError, match="damaged"):
        weights.verify(str(path))


# -------------------------------------------------------------------------------------- ensure_weights


def test_ensure_weights_explicit_checkpoint(tmp_path, cache):
    with pytest.raises(InputError, match="no such file"):
        weights.ensure_weights(str(tmp_path / "missing.pth"))
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"anything")
    assert weights.ensure_weights(str(ckpt)) == str(ckpt)
    assert leftovers(cache) == []  # no download, no digest record for the user's own file


def test_ensure_weights_no_download_when_disabled(cache):
    with pytest.raises(WeightsError) as info:
        weights.ensure_weights(download_if_missing=False)
    assert_manual_route(str(info.value))
    assert str(cache) in str(info.value)


def test_ensure_weights_downloads_then_uses_cache(server, cache):
    path = weights.ensure_weights(progress=False, url=server.url, timeout=TIMEOUT)
    assert path == str(cache / "model.safetensors")
    assert len(server.behaviour.requests) == 1
    assert weights.ensure_weights(progress=False, url=server.url, timeout=TIMEOUT) == path
    assert len(server.behaviour.requests) == 1  # served from the cache, verified

    with open(path, "r+b") as handle:
        handle.write(b"\0\0\0\0")
    with pytest.raises(WeightsError, match="deleted"):
        weights.ensure_weights(progress=False, url=server.url, timeout=TIMEOUT)
    assert not os.path.exists(path)
    assert weights.ensure_weights(progress=False, url=server.url, timeout=TIMEOUT) == path
    assert len(server.behaviour.requests) == 2
    assert weights.verify(path) == DATA_SHA


def test_ensure_weights_uses_manual_pth_in_cache(cache):
    cache.mkdir()
    manual = cache / "medsam_vit_b.pth"
    manual.write_bytes(b"authors' weights")
    assert weights.ensure_weights(download_if_missing=False) == str(manual)
    assert weights.recorded_sha256(str(manual)) == hashlib.sha256(b"authors' weights").hexdigest()
    assert weights.ensure_weights(str(manual)) == str(manual)
