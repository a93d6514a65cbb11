"""`medsam-slicer serve`: checks the configuration (tokens, bind address, limits, port) before
loading anything, loads the models once and runs the app on uvicorn.

    medsam-slicer serve --model litemedsam --model medsam             # 127.0.0.1:8765, no token
    medsam-slicer serve --host 0.0.0.0 --token-file tokens.txt        # off loopback: a token is required
    MEDSAM_SLICER_TOKEN=... medsam-slicer serve --host 0.0.0.0        # one token, not visible in `ps`

The token file (chmod 600) holds one token per line, `name:token` or just the token (then named
token1, token2, ... by its place); names appear in the access log, tokens never. `kill -HUP <pid>`
reloads it: removed tokens are refused from then on and their sessions closed, new ones accepted;
a file that fails the checks keeps the tokens in use (one log line says why).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
from typing import Any, List, Optional, Tuple

from .. import __version__
from ..errors import InputError
from .app import create_app
from .httputil import is_loopback_name
from .protocol import API_PREFIX

log = logging.getLogger("medsam_slicer.server")

MIN_TOKEN_LENGTH = 16
TOKEN_ENV = "MEDSAM_SLICER_TOKEN"  # one token from the environment instead of --token (which `ps` shows)
NAME_PATTERN = r"[A-Za-z0-9_.@+-]{1,64}"
# uvicorn: connection limits and timeouts (see uvicorn_config)
SERVE_DEFAULTS = dict(
    limit_concurrency=64,  # connections and requests at once; more get 503 at once
    timeout_keep_alive=5,  # seconds an idle keep-alive connection stays open
    header_timeout=10.0,  # seconds a client has to send a request's headers (slow-header protection)
    max_header_bytes=16 * 1024,  # a request head larger than this is refused (h11)
)


def _check_token(token: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH or re.search(r"\s", token):
        raise InputError(
            f"tokens need at least {MIN_TOKEN_LENGTH} characters and no spaces; make one with: "
            "python -c \"import secrets; print(secrets.token_urlsafe(32))\""
        )
    return token


def read_token_file(token_file: str) -> List[Tuple[str, str]]:
    """[(name, token)] from a token file: one per line, `name:token` or the token alone (named
    token<n>); blank lines and # comments skipped; refused when other users may read it."""
    try:
        with open(token_file, encoding="utf-8-sig") as f:  # an editor's byte-order mark is not a token
            lines = [ln.strip() for ln in f]
        shared = os.name == "posix" and bool(os.stat(token_file).st_mode & 0o077)
    except OSError as exc:
        raise InputError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"the token file {token_file} is not UTF-8 text") from None
    if shared:  # every local user could read every user's token
        raise InputError(f"the token file {token_file} is readable by other users: run chmod 600 {token_file}")
    pairs: List[Tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = f"token{len(pairs) + 1}", line
        name, token = name.strip(), token.strip()
        if not re.fullmatch(NAME_PATTERN, name):
            raise InputError(f"{token_file} line {number}: a token's name is 1-64 letters, digits or _.@+-")
        pairs.append((name, _check_token(token)))
    if not pairs:
        raise InputError(f"the token file {token_file} holds no token")
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise InputError(f"{token_file}: each token's name once ({', '.join(sorted({n for n in names if names.count(n) > 1}))} repeated)")
    if len({t for _, t in pairs}) != len(pairs):
        raise InputError(f"{token_file}: a token is listed twice")
    return pairs


def load_tokens(token: Optional[str] = None, token_file: Optional[str] = None,
                environ: Optional[dict] = None) -> List[Tuple[str, str]]:
    """[(name, token)] from --token, --token-file or, with neither, $MEDSAM_SLICER_TOKEN."""
    if token is not None and token_file is not None:
        raise InputError("give either --token or --token-file, not both")
    if token_file is not None:
        return read_token_file(token_file)
    if token is None:
        token = (os.environ if environ is None else environ).get(TOKEN_ENV) or None
    return [] if token is None else [("token1", _check_token(token.strip()))]


def is_loopback(host: str) -> bool:
    return is_loopback_name(host)


def check_bind(host: str, tokens: List[str]) -> None:
    if not is_loopback(host) and not tokens:
        raise InputError(
            f"refusing to listen on {host} without a token: give a --token-file (or ${TOKEN_ENV}), "
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


def guarded_h11(header_timeout: float):
    """uvicorn's h11 protocol with slow-header protection: a connection that has not sent a whole
    request head `header_timeout` seconds after connecting, or after the first byte of its next
    request, is closed (uvicorn itself only times out idle keep-alive connections)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _head_timer: Any = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                if self._head_timer is None:
                    self._arm_head_timer()
            else:
                self._cancel_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_too_slow)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.close()

    return GuardedH11


def connection_settings(**connections) -> dict:
    """SERVE_DEFAULTS with the settings given (None: the default), each checked."""
    unknown = set(connections) - set(SERVE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown connection settings: {', '.join(sorted(unknown))}")
    opts = dict(SERVE_DEFAULTS, **{k: v for k, v in connections.items() if v is not None})
    for name, value in opts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")
    return opts


def uvicorn_config(app, host: str, port: int, log_level: str = "info", **connections):
    """uvicorn's Config for the app: SERVE_DEFAULTS (overridden by `connections`), no Server header,
    uvicorn's own access log off (httputil.AccessLog writes one line per request instead)."""
    import uvicorn

    opts = connection_settings(**connections)
    return uvicorn.Config(app, host=host, port=int(port), log_level=log_level, server_header=False,
                          timeout_graceful_shutdown=5, access_log=False, http=guarded_h11(float(opts["header_timeout"])),
                          limit_concurrency=int(opts["limit_concurrency"]),
                          timeout_keep_alive=int(opts["timeout_keep_alive"]),
                          h11_max_incomplete_event_size=int(opts["max_header_bytes"]))


def reload_tokens_on_hangup(state, token_file: str) -> None:
    """SIGHUP rereads the token file (in a thread: the handler may interrupt code holding the
    state's lock); a file that fails its checks leaves the tokens in use."""
    import threading

    def reload() -> None:
        try:
            names = state.set_tokens(read_token_file(token_file))
        except InputError as exc:
            log.warning("token file not reloaded, the tokens in use stay: %s", exc)
        else:
            log.warning("token file reloaded: %d token(s): %s", len(names), ", ".join(names))

    signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=reload, daemon=True).start())


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    checkpoint=None,
    models=None,
    device: str = "auto",
    precision: str = "auto",
    backend: Optional[str] = None,
    token: Optional[str] = None,
    token_file: Optional[str] = None,
    cache_mb: Optional[float] = None,
    log_level: str = "info",
    engine=None,
    limit_concurrency: Optional[int] = None,
    timeout_keep_alive: Optional[int] = None,
    header_timeout: Optional[float] = None,
    max_header_bytes: Optional[int] = None,
    **limits,
) -> None:
    """Loads the models once and serves until interrupted. `models`: registry names, the first is
    the default; `checkpoint`: a file or one per model (see model_plan); `token`: one token (else
    `token_file`, else $MEDSAM_SLICER_TOKEN); `engine`: loaded engine(s) to serve instead; the
    connection settings: see SERVE_DEFAULTS; `limits`: see state.DEFAULTS."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, str(log_level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokens = load_tokens(token, token_file)
    check_bind(host, tokens)
    _check_limits(cache_mb, limits)
    connections = connection_settings(limit_concurrency=limit_concurrency, timeout_keep_alive=timeout_keep_alive,
                                      header_timeout=header_timeout, max_header_bytes=max_header_bytes)
    _check_port_free(host, port)
    if engine is None:
        from ..engine import MedSAMEngine

        engines = [MedSAMEngine.load(name, path, device=device, precision=precision, progress=True, backend=backend)
                   for name, path in model_plan(models, checkpoint)]
    else:
        engines = list(engine) if isinstance(engine, (list, tuple)) else [engine]
    app = create_app(engines, tokens=tokens, cache_mb=cache_mb, **limits)
    if token_file is not None and hasattr(signal, "SIGHUP"):
        reload_tokens_on_hangup(app.state.medsam, token_file)
    held = ", ".join(f"{e.family.NAME}: {e.family.TITLE} ({getattr(e, 'architecture', '?')})" for e in engines)
    first = engines[0]
    print(f"medsam-slicer {__version__} serving {held} on {first.device} ({first.precision}) at "
          f"http://{host}:{port}{API_PREFIX} ({'token required' if tokens else 'no token: loopback only'})",
          flush=True)
    uvicorn.Server(uvicorn_config(app, host, port, log_level, **connections)).run()
