"""HTTP helpers: JSON error replies, readable validation messages, the request-size limit, the
loopback Host check, the access log, bearer-token authentication, and the streamed reply that
cancels its job when the client leaves.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from typing import Dict, Optional, Tuple

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.exceptions import HTTPException


def http_error(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "message": message}, headers=headers)


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def describe_validation(exc: RequestValidationError) -> str:
    from .bodies import describe_errors

    return describe_errors(exc.errors())


USER_KEY = "medsam.user"  # the scope key where authentication leaves the caller's token name
access_log = logging.getLogger("medsam_slicer.access")


class AccessLog:
    """Pure ASGI middleware: one log line per request when it ends: the token's name (never its
    value; "-" before authentication), method, path, status and duration (a stream: until its end)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [0]

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            client = scope.get("client") or ("-",)
            access_log.info("%s %s %s %s %d %.1f ms", client[0], scope.get(USER_KEY, "-"), scope["method"],
                            scope["path"], status[0], (time.perf_counter() - started) * 1000.0)


def is_loopback_name(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1; IPv6 with or without brackets)."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_header_is_loopback(value: str) -> bool:
    """A Host header naming a loopback host, with an optional port: localhost:8765, [::1]:8765."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[: end + 1], value[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
    else:
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            return False
    return is_loopback_name(name)


class LoopbackHostOnly:
    """Pure ASGI middleware for a server without tokens: a request whose Host header is not a loopback
    name gets 421 (a web page that rebinds its own domain to 127.0.0.1 sends its domain as Host)."""

    def __init__(self, app, enabled):
        self.app = app
        self.enabled = enabled  # a callable: the check applies while it returns True (no tokens)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.enabled():
            host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"").decode("latin-1")
            if not host_header_is_loopback(host):
                shown = host[:64] or "none"
                response = error_response(421, "host_not_allowed", f"this server has no token and answers only "
                                          f"requests addressed to localhost or 127.0.0.1, not to {shown}")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Pure ASGI middleware: request bodies over `max_bytes` get 413 before the app sees them."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await error_response(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                if declared > self.max_bytes:
                    return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while uploading
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        mb = self.max_bytes / 2**20
        response = error_response(413, "too_large", f"the request is larger than the server's limit of {mb:.0f} MiB",
                                   {"Connection": "close"})
        await response(scope, receive, send)


def authenticate(tokens, credentials: Optional[HTTPAuthorizationCredentials], anonymous: Tuple[str, str]
                 ) -> Tuple[str, str]:
    """(owner tag, token name) of the bearer token in `credentials`; `tokens`: [(token bytes, owner
    tag, name)]. Without tokens configured every caller is `anonymous`."""
    if not tokens:
        return anonymous
    if credentials is None or not credentials.credentials:
        raise http_error(401, "token_required", "this server needs a bearer token (Authorization: Bearer <token>)",
                         {"WWW-Authenticate": "Bearer"})
    given = credentials.credentials.encode()
    found = None
    for token, tag, name in tokens:  # every token is compared, in constant time each
        if hmac.compare_digest(given, token):
            found = (tag, name)
    if found is None:
        raise http_error(403, "token_rejected", "the server rejected this token")
    return found


class JobStream(StreamingResponse):
    """A streaming reply that cancels its job when the client goes away before the end."""

    def __init__(self, job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished.is_set():
                self.job.cancel.set()
