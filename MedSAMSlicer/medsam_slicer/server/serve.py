"""`medsam-slicer serve`: checks the configuration (tokens, bind address, limits, port) before
loading anything, loads the models once and runs the app on uvicorn.

    medsam-slicer serve --model litemedsam --model medsam             # 127.0.0.1:8765, no token
    medsam-slicer serve --host 0.0.0.0 --token-file tokens.txt        # off loopback: a token is required
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from typing import List, Optional, Tuple

from .. import __version__
from ..errors import InputError
from .app import create_app
from .protocol import API_PREFIX


MIN_TOKEN_LENGTH = 16


def load_tokens(token: Optional[str] = None, token_file: Optional[str] = None) -> List[str]:
    """Tokens from --token, or --token-file (one per line; blank lines and # comments skipped)."""
    if token is not None and token_file is not None:
        raise InputError("give either --token or --token-file, not both")
    tokens: List[str] = []
    if token is not None:
        tokens = [token.strip()]
    elif token_file is not None:
        try:
            with open(token_file, encoding="utf-8-sig") as f:  # an editor's byte-order mark is not a token
                tokens = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
        except OSError as exc:
            raise InputError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        if not tokens:
            raise InputError(f"the token file {token_file} holds no token")
        try:
            shared = os.name == "posix" and bool(os.stat(token_file).st_mode & 0o077)
        except OSError:
            shared = False
        if shared:  # every local user could read every user's token
            raise InputError(f"the token file {token_file} is readable by other users: run chmod 600 {token_file}")
    for t in tokens:
        if len(t) < MIN_TOKEN_LENGTH or re.search(r"\s", t):
            raise InputError(
                f"tokens need at least {MIN_TOKEN_LENGTH} characters and no spaces; make one with: "
                "python -c \"import secrets; print(secrets.token_urlsafe(32))\""
            )
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tokens: List[str]) -> None:
    if not is_loopback(host) and not tokens:
        raise InputError(
            f"refusing to listen on {host} without a token: pass --token or --token-file, "
            "or keep the default 127.0.0.1 and reach the server through an SSH tunnel"
        )


def _check_limits(cache_mb: Optional[float], limits: dict) -> None:
    """Zero or negative limits would start a server that refuses every session or request."""
    for name, value in dict(limits, cache_mb=cache_mb).items():
        if value is not None and not value > 0:
            flag = "--idle-timeout" if name == "idle_timeout_s" else "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be positive, got {value}")


def _check_port_free(host: str, port: int) -> None:
    if not 0 <= int(port) <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server running? "
                             "choose another --port)") from None


def model_plan(models=None, checkpoints=None) -> List[Tuple[Optional[str], Optional[str]]]:
    """(model name or None, checkpoint or None) per model to load, checked before loading anything.

    models: registry names (repeatable --model); checkpoints: one file, or one per model in the same
    order (repeatable --checkpoint); a checkpoint given without a model names its family by its tensors.
    """
    from ..models import DEFAULT_MODEL, check_model

    models = [check_model(m) for m in (models or [])]
    if isinstance(checkpoints, str):
        checkpoints = [checkpoints]
    checkpoints = [c for c in (checkpoints or []) if c is not None and str(c).strip()]
    if len(set(models)) != len(models):
        raise InputError(f"--model {' '.join(models)}: each model once")
    if models and checkpoints and len(checkpoints) != len(models):
        raise InputError(f"{len(checkpoints)} --checkpoint for {len(models)} --model: give none (each model's own "
                         "weights) or one per --model, in the same order")
    if not models:
        return [(None, c) for c in checkpoints] or [(DEFAULT_MODEL, None)]
    return [(m, checkpoints[n] if checkpoints else None) for n, m in enumerate(models)]


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    checkpoint=None,
    models=None,
    device: str = "auto",
    precision: str = "auto",
    token: Optional[str] = None,
    token_file: Optional[str] = None,
    cache_mb: Optional[float] = None,
    log_level: str = "info",
    engine=None,
    **limits,
) -> None:
    """Loads the models once and serves until interrupted. `models`: registry names, the first is
    the default; `checkpoint`: a file or one per model (see model_plan); `engine`: loaded engine(s)
    to serve instead; `limits`: see DEFAULTS."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, str(log_level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokens = load_tokens(token, token_file)
    check_bind(host, tokens)
    _check_limits(cache_mb, limits)
    _check_port_free(host, port)
    if engine is None:
        from ..engine import MedSAMEngine

        engines = [MedSAMEngine.load(name, path, device=device, precision=precision, progress=True)
                   for name, path in model_plan(models, checkpoint)]
    else:
        engines = list(engine) if isinstance(engine, (list, tuple)) else [engine]
    app = create_app(engines, tokens=tokens, cache_mb=cache_mb, **limits)
    held = ", ".join(f"{e.family.NAME}: {e.family.TITLE} ({getattr(e, 'architecture', '?')})" for e in engines)
    first = engines[0]
    print(f"medsam-slicer {__version__} serving {held} on {first.device} ({first.precision}) at "
          f"http://{host}:{port}{API_PREFIX} ({'token required' if tokens else 'no token: loopback only'})",
          flush=True)
    config = uvicorn.Config(app, host=host, port=int(port), log_level=log_level, server_header=False,
                            timeout_graceful_shutdown=5, access_log=log_level == "debug")
    uvicorn.Server(config).run()
