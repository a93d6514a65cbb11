"""The resident MedSAM server and its client.

Server side (imports FastAPI; uvicorn only in `serve`):
- `app`: the app factory `create_app(engines, tokens, ...)` and its thin routes.
- `schemas`: request and reply schemas (they validate requests and document the API).
- `bodies`: request bodies parsed, validated and base64-decoded off the event loop (worker processes).
- `state`: models, sessions, jobs, the shared embedding cache, the idle-session reaper.
- `jobs`: streamed 3D jobs, validated before they start, reported as NDJSON.
- `httputil`: error replies, the request-size limit, bearer-token authentication.
- `serve`: the `medsam-slicer serve` command (configuration checks, model loading, uvicorn).
- `scheduler`: the single GPU worker queue shared by every session and model.

Both sides:
- `protocol`: the wire encoding and every definition both sides share (numpy only).
- `client`: `RemoteEngine` / `RemoteSession`, the same interface as `LocalSession`; loaded inside
  Slicer, so it imports neither torch nor FastAPI.

Importing this package imports none of them.
"""
from __future__ import annotations
