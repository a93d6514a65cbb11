"""The resident MedSAM server and its client.

- `app`: the FastAPI application and `serve()` (imports FastAPI and uvicorn; server side only).
- `scheduler`: the single GPU worker queue shared by every session.
- `protocol`: the wire encoding (numpy only), shared by server and client.
- `client`: `RemoteEngine` / `RemoteSession`, the same interface as `LocalSession`; loaded inside
  Slicer, so it imports neither torch nor FastAPI.

Importing this package imports none of them.
"""
from __future__ import annotations
