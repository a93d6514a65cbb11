"""HTTP helpers: JSON error replies, readable validation messages, the request-size limit, bearer-token
authentication, and the streamed reply that cancels its job when the client leaves.
"""
from __future__ import annotations

import hmac
from typing import Dict, Optional

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.exceptions import HTTPException


def http_error(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "message": message}, headers=headers)


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def describe_validation(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{loc or 'request'}: {msg}{more}"[:500]


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


def authenticate(tokens, credentials: Optional[HTTPAuthorizationCredentials], anonymous: str) -> str:
    """The owner tag of the bearer token in `credentials`; `tokens`: [(token bytes, owner tag)].
    Without tokens configured every caller is `anonymous`."""
    if not tokens:
        return anonymous
    if credentials is None or not credentials.credentials:
        raise http_error(401, "token_required", "this server needs a bearer token (Authorization: Bearer <token>)",
                         {"WWW-Authenticate": "Bearer"})
    given = credentials.credentials.encode()
    owner = None
    for token, tag in tokens:  # every token is compared, in constant time each
        if hmac.compare_digest(given, token):
            owner = tag
    if owner is None:
        raise http_error(403, "token_rejected", "the server rejected this token")
    return owner


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
