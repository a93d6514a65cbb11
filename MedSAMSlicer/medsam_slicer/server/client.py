"""Client of the medsam-slicer server: `RemoteEngine(url).open_session(volume, window)` returns a
`RemoteSession` with the same methods and return types as `LocalSession`.

Loaded inside Slicer: Python 3.9 syntax, no torch, no FastAPI (HTTP through `requests`).

Robustness: separate connect / read / upload timeouts; idempotent calls (GET, DELETE, window,
single-slice prompts, prefetch) are retried on connection failures and 502/503/504, other calls
only when the connection was never made; a session the server lost (restart, idle timeout) is
uploaded again and the call retried once; long jobs stream slice by slice with heartbeats, so no
proxy or read timeout fires while the GPU works. Errors are one-line `MedSAMError`s.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .. import __version__
from ..errors import InputError, MedSAMError
from ..slicing import check_axis, get_slice, slice_count, slice_distance, slice_shape
from ..windowing import IntensityWindow
from .protocol import (
    API_PREFIX,
    API_VERSION,
    JOB_OPTIONS,
    decode_mask,
    encode_array,
    encode_mask,
    rules_to_wire,
    version_tuple,
    window_from_wire,
    window_request,
)


class RemoteError(MedSAMError):
    """The server could not do what was asked (unreachable, refused, failed)."""


class ServerUnreachable(RemoteError):
    pass


class AuthError(RemoteError):
    pass


class VersionMismatch(RemoteError):
    pass


class ServerBusy(RemoteError):
    pass


class _SessionLost(RemoteError):
    """404 session_unknown: the server restarted or closed the session; upload again."""


@dataclass
class Timeouts:
    """Seconds. read: longest wait for the next bytes of a reply (streams send heartbeats)."""

    connect: float = 5.0
    read: float = 120.0
    upload: float = 600.0


_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)
_MAX_RETRY_AFTER_S = 5.0  # a server's Retry-After is honoured up to this, so a prompt never hangs long


def _retry_delay(response, attempt: int) -> float:
    """Seconds before retrying: the server's Retry-After (capped) if it sent one, else the backoff."""
    try:
        return min(_MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("Retry-After", ""))))
    except ValueError:
        return _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]


def _jsonable(value):
    """numpy scalars / arrays and tuples to plain JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _wire_volume(volume: np.ndarray) -> np.ndarray:
    """Types the wire does not carry become ones that window identically (bool, float16, 64-bit ints)."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"the remote engine takes 3D grey volumes [k, j, i], got shape {volume.shape}")
    if volume.dtype == bool:
        return volume.astype(np.uint8)
    if volume.dtype == np.float16:
        return volume.astype(np.float32)
    if volume.dtype.kind in "iu" and volume.dtype.itemsize == 8:
        lo, hi = (int(volume.min()), int(volume.max())) if volume.size else (0, 0)
        if lo >= np.iinfo(np.int32).min and hi <= np.iinfo(np.int32).max:
            return volume.astype(np.int32)
        return volume.astype(np.float64)
    if volume.dtype.kind not in "iuf":
        raise InputError(f"cannot send voxels of type {volume.dtype}")
    return volume


def _window_from_reply(reply: Dict[str, Any]) -> IntensityWindow:
    try:
        return window_from_wire(reply["window"])
    except (InputError, KeyError, TypeError, AttributeError):
        raise RemoteError(f"the MedSAM server sent an unusable intensity window: {reply.get('window')!r}") from None


class RemoteEngine:
    """A connection to one medsam-slicer server (`medsam-slicer serve`)."""

    def __init__(self, url: str, token: Optional[str] = None, timeouts: Optional[Timeouts] = None,
                 retries: int = 3, check_version: bool = True):
        import requests

        url = str(url).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise InputError(f"the server URL must start with http:// or https://, got {url!r}")
        if url.endswith(API_PREFIX):
            url = url[: -len(API_PREFIX)]
        self.url = url
        self.token = token.strip() if token else None
        self.timeouts = timeouts or Timeouts()
        self.retries = max(0, int(retries))
        self.check_version = check_version
        self._http = requests.Session()
        self._http.trust_env = False  # never route a loopback/tunnel URL through an HTTP proxy
        self._info: Optional[Dict[str, Any]] = None

    # -- HTTP ---------------------------------------------------------------------------------------

    def _headers(self) -> Dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"medsam-slicer-client/{__version__}"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(self, method: str, path: str, body: Any = None, idempotent: bool = True, stream: bool = False,
                upload: bool = False):
        """One call with retries as the docstring of this module says; returns a requests.Response (< 400)."""
        import requests

        url = f"{self.url}{API_PREFIX}{path}"
        read = self.timeouts.upload if upload else self.timeouts.read
        data = None
        headers = self._headers()
        if body is not None:
            data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        attempts = 1 + self.retries
        for attempt in range(attempts):
            last = attempt + 1 >= attempts
            try:
                response = self._http.request(method, url, data=data, headers=headers, stream=stream,
                                              timeout=(self.timeouts.connect, read))
            except requests.exceptions.ReadTimeout:
                raise RemoteError(f"the MedSAM server at {self.url} did not answer within {read:g} s "
                                  "(busy or stuck; try again or raise the read timeout)") from None
            except requests.exceptions.ConnectionError as exc:
                never_connected = isinstance(exc, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(exc)
                if not last and (idempotent or never_connected):
                    time.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                    continue
                reason = "no answer" if isinstance(exc, requests.exceptions.ConnectTimeout) else (
                    "connection refused" if never_connected else "connection lost")
                raise ServerUnreachable(f"cannot reach the MedSAM server at {self.url} ({reason}): is it running, "
                                        "and is the SSH tunnel open?") from None
            except requests.exceptions.RequestException as exc:
                raise RemoteError(f"request to the MedSAM server at {self.url} failed: {type(exc).__name__}") from None
            if response.status_code in (502, 503, 504) and idempotent and not last:
                response.close()
                time.sleep(_retry_delay(response, attempt))
                continue
            if response.status_code >= 400:
                self._raise_for(response)
            return response
        raise RemoteError("unreachable")  # pragma: no cover - the loop always returns or raises

    def _raise_for(self, response) -> None:
        status = response.status_code
        try:
            body = response.json()
            code, message = str(body.get("error", "")), str(body.get("message", "")).splitlines()[0]
        except Exception:
            code, message = "", (response.text or "").strip().splitlines()[0][:200] if response.text else ""
        finally:
            response.close()
        where = f"the MedSAM server at {self.url}"
        if status == 401:
            raise AuthError(f"{where} needs a token: set it in the MedSAM module's settings (or pass --token)")
        if status == 403:
            raise AuthError(f"{where} rejected the token: check it (copy it again from the server's token file)")
        if status == 404 and code == "session_unknown":
            raise _SessionLost(message)
        if status == 413:
            raise InputError(f"{where} refused the upload: {message or 'too large'}")
        if status in (400, 422):
            raise InputError(message or f"{where} rejected the request ({status})")
        if status in (429, 503, 507):
            raise ServerBusy(f"{where} is busy: {message or status}")
        if status == 404:
            raise RemoteError(f"{where} does not offer this call ({message or 'not found'}): is it a medsam-slicer server?")
        raise RemoteError(f"{where} failed ({status}): {message or 'no details'}")

    # -- server -------------------------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        return self.request("GET", "/health").json()

    def info(self) -> Dict[str, Any]:
        info = self.request("GET", "/info").json()
        self._info = info
        return info

    def check(self) -> Dict[str, Any]:
        """info() plus the version check: major.minor of client and server must match."""
        info = self.info()
        theirs, ours = version_tuple(info.get("version", "")), version_tuple(__version__)
        if self.check_version and (theirs != ours or info.get("api") != API_VERSION):
            raise VersionMismatch(
                f"the MedSAM server at {self.url} runs medsam-slicer {info.get('version')}, this client is "
                f"{__version__}: update one of them so the major.minor versions match"
            )
        return info

    def models(self) -> Tuple[str, ...]:
        """Names of the models the server holds; the first is its default."""
        info = self._info or self.info()
        return tuple(str(m["name"]) for m in info.get("models", ())) or (str(info.get("model")),)

    def open_session(self, volume: np.ndarray, window=None, geometry: Optional[Dict[str, Any]] = None,
                     model: Optional[str] = None) -> "RemoteSession":
        """Uploads `volume` ([k, j, i]) once. window: IntensityWindow, (width, level), a preset name or None
        (auto); model: one of the server's models (`models()`), None for its default."""
        if self._info is None:
            self.check()
        return RemoteSession(self, volume, window, geometry, model=model)

    def close(self) -> None:
        self._http.close()


class RemotePredictor:
    """The `(index, box) -> (mask, score)` callable on a remote session (for propagation run locally)."""

    def __init__(self, session: "RemoteSession", axis: str):
        self.session = session
        self.axis = check_axis(axis)

    @property
    def n_slices(self) -> int:
        return slice_count(self.session.volume.shape, self.axis)

    @property
    def slice_shape(self) -> Tuple[int, int]:
        return slice_shape(self.session.volume.shape, self.axis)

    @property
    def slice_mm(self) -> Optional[float]:
        return slice_distance((self.session.geometry or {}).get("spacing"), self.axis)

    def image(self, index: int) -> np.ndarray:
        return self.session.window.apply(get_slice(self.session.volume, self.axis, index))

    def prefetch(self, indices: Sequence[int]) -> None:
        self.session._call("POST", "/prefetch", {"axis": self.axis, "indices": [int(i) for i in indices]})

    def __call__(self, index: int, box):
        return self.session.segment_slice(self.axis, index, box)


class RemoteSession:
    """Same methods and return types as `LocalSession`, computed by the server."""

    def __init__(self, engine: RemoteEngine, volume: np.ndarray, window=None, geometry=None,
                 model: Optional[str] = None):
        from ..predictor import volume_key

        self.engine = engine
        self.model: Optional[str] = str(model).strip().lower() if model else None
        self.volume = _wire_volume(volume)
        self.geometry = geometry
        self.key = volume_key(self.volume)
        self.session_id: Optional[str] = None
        self.uploads = 0
        self._window_request = window_request(window)
        self.window: Optional[IntensityWindow] = None
        self._upload()

    # -- plumbing -------------------------------------------------------------------------------------

    def _upload(self) -> None:
        body = {"volume": encode_array(self.volume), "window": self._window_request}
        if self.model is not None:
            body["model"] = self.model
        if self.geometry is not None:
            body["geometry"] = _jsonable_geometry(self.geometry)
        reply = self.engine.request("POST", "/sessions", body, idempotent=False, upload=True).json()
        self.session_id = reply["session_id"]
        self.window = _window_from_reply(reply)
        self.model = str(reply.get("model") or "") or None  # a re-upload asks for the same model
        # a re-upload must reproduce this window exactly, whatever the preset resolved to
        self._window_request = window_request(self.window)
        self.uploads += 1

    def _call(self, method: str, suffix: str, body: Any = None, idempotent: bool = True, stream: bool = False):
        if self.session_id is None:
            raise InputError("this session is closed")
        for attempt in (0, 1):
            try:
                return self.engine.request(method, f"/sessions/{self.session_id}{suffix}", body, idempotent, stream)
            except _SessionLost:
                if attempt:
                    raise RemoteError("the server lost the session again right after it was uploaded") from None
                self._upload()
        raise RemoteError("unreachable")  # pragma: no cover

    def predictor(self, axis: str) -> RemotePredictor:
        return RemotePredictor(self, axis)

    # -- LocalSession's interface ----------------------------------------------------------------------

    def set_window(self, window) -> None:
        spec = window_request(window)
        reply = self._call("PUT", "/window", spec).json()
        self.window = _window_from_reply(reply)
        self._window_request = window_request(self.window)

    def focus(self, axis: str, index: int, radius: int = 2) -> None:
        """The user is looking at this slice: the server embeds it and its neighbours in the background."""
        near = [int(index)] + [int(index) + s * d for d in range(1, int(radius) + 1) for s in (1, -1)]
        n = slice_count(self.volume.shape, axis)
        self.predictor(axis).prefetch([i for i in near if 0 <= i < n])

    def segment_slice(self, axis: str, index: int, box):
        """(bool mask (H, W), quality score) for one 2D box [x0, y0, x1, y1] on one slice."""
        body = {"axis": check_axis(axis), "index": _jsonable(index), "box": _jsonable(list(box))}
        reply = self._call("POST", "/segment", body).json()
        return decode_mask(reply["mask"], tuple(reply["size"])), float(reply["score"])

    def propagate(self, axis: str, seed_index: int, seed_box=None, seed_mask=None, **options):
        size = slice_shape(self.volume.shape, axis)
        body = {"axis": axis, "seed_index": _jsonable(seed_index)}
        if seed_box is not None:
            body["seed_box"] = _jsonable(list(seed_box))
        if seed_mask is not None:
            body["seed_mask"] = encode_mask(_check_mask(seed_mask, size, "seed mask"))
        return self._grown("propagate", body, options, {})

    def segment_box3d(self, axis: str, box2d, first: int, last: int, **options):
        body = {"axis": axis, "box": _jsonable(list(box2d)), "first": _jsonable(first), "last": _jsonable(last)}
        return self._job("box3d", body, options, {})

    def segment_key_slices(self, axis: str, key_boxes, **options):
        body = {"axis": axis,
                "key_boxes": [{"index": _jsonable(i), "box": _jsonable(list(b))} for i, b in dict(key_boxes).items()]}
        return self._job("key-slices", body, options, {})

    def repropagate(self, axis: str, masks, corrected_index: int, corrected_mask, seed_index: int, **options):
        size = slice_shape(self.volume.shape, axis)
        masks = getattr(masks, "masks", masks)
        base = {int(i): _check_mask(m, size, f"mask of slice {i}") for i, m in dict(masks).items()}
        body = {
            "axis": axis,
            "masks": [{"index": i, "mask": encode_mask(m)} for i, m in base.items()],
            "corrected_index": _jsonable(corrected_index),
            "corrected_mask": encode_mask(_check_mask(corrected_mask, size, "corrected mask")),
            "seed_index": _jsonable(seed_index),
        }
        return self._grown("repropagate", body, options, base)

    def close(self) -> None:
        """Frees the server's session (best effort: a server that is gone has nothing to free)."""
        sid, self.session_id = self.session_id, None
        if sid is None:
            return
        try:
            self.engine.request("DELETE", f"/sessions/{sid}")
        except RemoteError:
            pass

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- streamed jobs ---------------------------------------------------------------------------------

    def _grown(self, kind: str, body: Dict[str, Any], options: Dict[str, Any], base: Dict[int, np.ndarray]):
        """`_job` for open-ended growth, whose `protected` option (a callable index -> bool slice or
        None, see propagation.propagate_from_slice) travels as the masks of the slices it protects:
        the server ends growth there itself, computing nothing beyond."""
        protected = options.pop("protected", None)
        if protected is not None:
            check_axis(body["axis"])
            size = slice_shape(self.volume.shape, body["axis"])
            sent = []
            for index in range(slice_count(self.volume.shape, body["axis"])):
                area = protected(index)
                if area is not None:
                    area = _check_mask(area, size, f"protected area of slice {index}")
                    if area.any():
                        sent.append({"index": index, "mask": encode_mask(area)})
            body["protected"] = sent
        return self._job(kind, body, options, base)

    def _job(self, kind: str, body: Dict[str, Any], options: Dict[str, Any], base: Dict[int, np.ndarray]):
        from ..propagation import PropagationResult

        check_axis(body["axis"])
        progress: Optional[Callable] = options.pop("progress", None)
        cancel = options.pop("cancel", None)
        allowed = JOB_OPTIONS[kind][1]
        for name, value in options.items():
            if name not in allowed:
                raise TypeError(f"{kind}: unexpected option '{name}' (options: {', '.join(allowed + ('progress', 'cancel'))})")
            body[name] = _jsonable(rules_to_wire(value) if name == "rules" else value)
        size = slice_shape(self.volume.shape, body["axis"])
        job_id = secrets.token_urlsafe(12)
        body["job_id"] = job_id
        response = self._call("POST", f"/{kind}", body, idempotent=False, stream=True)
        finished = threading.Event()
        started = threading.Event()
        watcher = None
        if cancel is not None:
            watcher = threading.Thread(target=self._watch_cancel, args=(cancel, job_id, started, finished), daemon=True)
            watcher.start()
        streamed: Dict[int, np.ndarray] = {}
        final: Dict[int, np.ndarray] = {}
        try:
            for raw in response.iter_lines(chunk_size=65536):
                if not raw:
                    continue
                msg = json.loads(raw)
                kind_ = msg.get("type")
                if kind_ == "start":
                    started.set()
                elif kind_ == "slice":
                    index = int(msg["index"])
                    mask = decode_mask(msg["mask"], size, base.get(index))
                    streamed[index] = mask
                    if progress is not None:
                        progress(index, mask, int(msg["done"]), int(msg["total"]))
                elif kind_ == "mask":
                    index = int(msg["index"])
                    final[index] = decode_mask(msg["mask"], size, base.get(index))
                elif kind_ == "done":
                    masks = {}
                    for index in msg["indices"]:
                        index = int(index)
                        if index in final:
                            masks[index] = final[index]
                        elif index in streamed:
                            masks[index] = streamed[index]
                        elif index in base:
                            masks[index] = base[index].copy()
                        else:
                            masks[index] = np.zeros(size, dtype=bool)
                    return PropagationResult(masks=masks, stop_reasons=dict(msg["stop_reasons"]),
                                             cancelled=bool(msg["cancelled"]))
                elif kind_ == "error":
                    status = int(msg.get("status", 500))
                    text = str(msg.get("message", "the job failed"))
                    if status == 400:
                        raise InputError(text)
                    raise RemoteError(f"the MedSAM server failed during {kind}: {text}")
            raise RemoteError(f"the connection to the MedSAM server at {self.engine.url} ended during {kind} "
                              "(server restarted or network lost); run it again")
        except (ValueError, KeyError) as exc:
            if isinstance(exc, MedSAMError):
                raise
            raise RemoteError(f"the MedSAM server sent a malformed reply during {kind}") from None
        except Exception as exc:
            import requests

            if isinstance(exc, requests.exceptions.RequestException):
                raise RemoteError(f"the connection to the MedSAM server at {self.engine.url} broke during {kind} "
                                  f"({type(exc).__name__}); run it again") from None
            raise
        finally:
            finished.set()
            response.close()  # early exit (an exception in `progress`): the server cancels the job

    def _watch_cancel(self, cancel, job_id: str, started: threading.Event, finished: threading.Event) -> None:
        is_set = getattr(cancel, "is_set", None)
        check = is_set if callable(is_set) else cancel
        while not finished.wait(0.05):
            if started.is_set() and check():
                try:
                    self.engine.request("POST", f"/jobs/{job_id}/cancel")
                except MedSAMError:
                    pass  # finished meanwhile
                return


def _check_mask(mask, size: Tuple[int, int], what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(size):
        raise InputError(f"{what} is {mask.shape}, slices are {tuple(size)}")
    return mask.astype(bool, copy=False)


def _jsonable_geometry(geometry: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for name in ("spacing", "origin", "directions"):
        if geometry.get(name) is not None:
            out[name] = [float(v) for v in np.asarray(geometry[name], dtype=float).ravel()]
    return out
