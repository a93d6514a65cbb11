"""How the server is reached: the client retries a busy (503) server after its Retry-After; the server offers
its OpenAPI schema but no CDN-loaded docs page."""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from medsam_slicer.server.client import RemoteEngine, ServerBusy


def _server(answers):
    """A loopback HTTP server answering GET /v1/health with the statuses in `answers`, then 200."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            seen.append(time.monotonic())
            status = answers.pop(0) if answers else 200
            body = json.dumps({"status": "ok"} if status == 200 else {"error": "busy", "message": "server full"}).encode()
            self.send_response(status)
            if status == 503:
                self.send_header("Retry-After", "0.2")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_a_busy_server_is_retried_after_its_retry_after():
    server, seen = _server([503, 503])
    try:
        engine = RemoteEngine(f"http://127.0.0.1:{server.server_address[1]}", retries=3, check_version=False)
        assert engine.health() == {"status": "ok"}
        assert len(seen) == 3 and seen[1] - seen[0] >= 0.19 and seen[2] - seen[1] >= 0.19
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_stays_busy_gives_one_line():
    server, seen = _server([503] * 10)
    try:
        engine = RemoteEngine(f"http://127.0.0.1:{server.server_address[1]}", retries=2, check_version=False)
        with pytest.raises(ServerBusy) as err:
            engine.health()
        assert "\n" not in str(err.value) and "busy" in str(err.value)
        assert len(seen) == 3
    finally:
        server.shutdown()
        server.server_close()


def test_the_server_serves_its_schema_but_no_cdn_page(tiny_engine):
    """FastAPI's /docs and /redoc load scripts from a CDN: the server offers only /openapi.json."""
    from fastapi.testclient import TestClient

    from medsam_slicer.server.app import create_app

    with TestClient(create_app(tiny_engine), base_url="http://127.0.0.1") as client:
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_token_files_must_be_private_and_a_byte_order_mark_is_not_a_token(tmp_path):
    import os

    from medsam_slicer.errors import InputError
    from medsam_slicer.server.serve import load_tokens

    token = "a" * 40
    path = tmp_path / "tokens.txt"
    path.write_bytes(b"\xef\xbb\xbf" + token.encode() + b"\n")
    os.chmod(path, 0o644)
    with pytest.raises(InputError, match="chmod 600"):
        load_tokens(token_file=str(path))
    os.chmod(path, 0o600)
    assert load_tokens(token_file=str(path)) == [("token1", token)]
