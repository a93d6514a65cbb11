"""Wire encoding shared by the server and its client (numpy only: no torch, no FastAPI).

Arrays travel inside JSON as ``{"dtype", "shape", "compression": "zlib", "data": base64}``:
raw C-order bytes, zlib-compressed, base64-encoded. Nothing is ever pickled.

A 2D mask travels cropped to the extent that changed against a base the receiver already has
(an empty slice, or the mask it sent itself): ``{"offset": [row, col], "shape": [h, w], "data"}``
where ``data`` is base64(zlib(numpy.packbits(crop))). The receiver copies its base and overwrites
the crop; an empty crop (``shape`` [0, 0]) means "unchanged".

The one definition of everything both sides must agree on also lives here: API_VERSION, the
options each streamed job takes (JOB_OPTIONS, whose defaults are the propagation functions' own:
a request leaves out what the user left out), the stop rules and intensity window on the wire,
the slice-index check, and the devices a server may run on.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import zlib
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..model import DEVICES  # noqa: F401  (what `serve --device` accepts, for the server's users)
from ..windowing import IntensityWindow

API_PREFIX = "/v1"
API_VERSION = 1  # the server's /v1/info "api"; the client refuses another
# Voxel types a volume may be sent as (little-endian on the wire).
VOLUME_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"

# Streamed jobs: route -> (propagation function, keyword options that travel). An option left out of
# a request takes that function's default, so no default is written twice.
JOB_OPTIONS = {
    "propagate": ("propagate_from_slice", ("direction", "rules", "margin", "keep_largest", "fill_holes", "lookahead")),
    "box3d": ("segment_box3d", ("start", "margin", "keep_largest", "fill_holes", "clip_to_box", "min_appearance",
                                "recover", "lookahead")),
    "key-slices": ("segment_key_slices", ("margin", "keep_largest", "fill_holes", "combine", "gap_fill", "lookahead")),
    "repropagate": ("repropagate", ("rules", "margin", "keep_largest", "fill_holes", "lookahead")),
}


def job_function(route: str):
    """The propagation function a streamed route runs."""
    from .. import propagation

    return getattr(propagation, JOB_OPTIONS[route][0])


def option_default(route: str, name: str):
    """The default of one job option: the propagation function's own."""
    import inspect

    return inspect.signature(job_function(route)).parameters[name].default


def check_index(index: int, n: int, axis: str, what: str = "slice") -> int:
    """A slice index along `axis` of a volume with `n` slices there (the message every front end shows)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < n:
        raise InputError(f"{what} {index} is outside the volume (0..{n - 1} along {axis})")
    return int(index)


# -- intensity windows ------------------------------------------------------------------------------


def window_to_wire(window: IntensityWindow) -> Dict[str, Any]:
    """A resolved window as it travels: {low, high, keep_zero, name}."""
    return {"low": float(window.low), "high": float(window.high), "keep_zero": bool(window.keep_zero),
            "name": str(window.name)}


def window_from_wire(spec: Dict[str, Any]) -> IntensityWindow:
    """The inverse of window_to_wire; bounds must be finite with high > low."""
    low, high = spec.get("low"), spec.get("high")
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise InputError("a window given as low/high needs both, as numbers") from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise InputError(f"a window needs finite low < high, got low {low:g}, high {high:g}")
    return IntensityWindow(low, high, bool(spec.get("keep_zero", False)), str(spec.get("name", "custom")))


def window_request(window) -> Dict[str, Any]:
    """What a client asks for: an IntensityWindow as is, (width, level), a preset name, or None (auto)."""
    if window is None:
        return {"preset": "auto"}
    if isinstance(window, IntensityWindow):
        return window_to_wire(window)
    if isinstance(window, str):
        return {"preset": window}
    try:
        width, level = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"a window is an IntensityWindow, (width, level) or a preset name, got {window!r}") from None
    return {"width": width, "level": level}


# -- stop rules --------------------------------------------------------------------------------------


def rule_fields() -> Dict[str, Any]:
    """StopRules' fields as {name: type}, resolved (the server's request model is built from them)."""
    import typing

    from ..stop_rules import StopRules

    return typing.get_type_hints(StopRules)


def _rule_off(kind) -> Any:
    """What null means for a rule: off (0 for a count, False for a check, None where None is off)."""
    if kind is bool:
        return False
    if kind is int:
        return 0
    return None


def rules_to_wire(rules) -> Optional[Dict[str, Any]]:
    """StopRules (or a dict of some of its fields) as JSON; None stays None (the engine's defaults)."""
    if rules is None:
        return None
    if dataclasses.is_dataclass(rules):
        return dataclasses.asdict(rules)
    return dict(rules)


def rules_from_wire(given: Optional[Dict[str, Any]]):
    """StopRules from the fields a request gave: omitted ones keep their defaults, an explicit null
    switches that rule off. None: None (the engine's defaults)."""
    from ..stop_rules import StopRules

    if given is None:
        return None
    kinds = rule_fields()
    unknown = set(given) - set(kinds)
    if unknown:
        raise InputError(f"unknown stop rule(s): {', '.join(sorted(unknown))}")
    values = {name: (_rule_off(kinds[name]) if value is None else value) for name, value in given.items()}
    return dataclasses.replace(StopRules(), **values)


class WireError(InputError):
    """Malformed data on the wire (bad base64, corrupt zlib, sizes that do not match)."""


def _b64decode(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise WireError(f"{what}: data must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise WireError(f"{what}: data is not valid base64") from None


def _inflate(blob: bytes, expected: int, what: str) -> bytes:
    """zlib-decompresses at most `expected` bytes; more (a decompression bomb) or less is an error."""
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(blob, expected + 1)
        if len(raw) > expected or inflater.unconsumed_tail:
            raise WireError(f"{what}: decompressed data is larger than its shape and dtype say ({expected} bytes)")
        raw += inflater.flush()
        if not inflater.eof:
            raise WireError(f"{what}: compressed data is truncated")
    except zlib.error:
        raise WireError(f"{what}: compressed data is corrupt") from None
    if len(raw) != expected:
        raise WireError(f"{what}: {len(raw)} bytes after decompression, but shape and dtype need {expected}")
    return raw


def encode_array(array: np.ndarray, level: int = 1) -> Dict[str, Any]:
    array = np.asarray(array)
    if array.dtype.name not in VOLUME_DTYPES:
        raise InputError(f"cannot send voxels of type {array.dtype}; convert to one of {', '.join(VOLUME_DTYPES)}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    raw = np.ascontiguousarray(little).tobytes()
    return {
        "dtype": array.dtype.name,
        "shape": [int(n) for n in array.shape],
        "compression": "zlib",
        "data": base64.b64encode(zlib.compress(raw, level)).decode("ascii"),
    }


def array_bytes(shape: Sequence[int], dtype_name: str) -> int:
    """Bytes of an array of this shape and dtype, in Python integers (numpy's int64 product
    overflows: [2**32, 2**32, 1] made 0 and passed every size check)."""
    size = np.dtype(dtype_name).itemsize
    for n in shape:
        size *= int(n)
    return size


def check_array(payload: Dict[str, Any], max_bytes: int, what: str = "volume", ndim: Sequence[int] = (3,)) -> int:
    """Checks an array payload's dtype, compression and shape (nothing decoded); returns its size in bytes."""
    dtype_name = payload.get("dtype")
    shape = payload.get("shape")
    if dtype_name not in VOLUME_DTYPES:
        raise WireError(f"{what}: unsupported dtype '{dtype_name}'; use one of {', '.join(VOLUME_DTYPES)}")
    if payload.get("compression", "zlib") != "zlib":
        raise WireError(f"{what}: unsupported compression '{payload.get('compression')}'; use zlib")
    if not isinstance(shape, (list, tuple)) or len(shape) not in ndim:
        raise WireError(f"{what}: shape must have {' or '.join(str(n) for n in ndim)} dimensions")
    if any((not isinstance(n, int)) or isinstance(n, bool) or n < 1 for n in shape):
        raise WireError(f"{what}: shape entries must be positive integers, got {list(shape)[:8]}")
    expected = array_bytes(shape, dtype_name)
    if expected > max_bytes:
        raise WireError(f"{what}: {expected / 2**20:.0f} MiB of voxels exceeds the server's limit of {max_bytes / 2**20:.0f} MiB")
    return expected


def decode_array(payload: Dict[str, Any], max_bytes: int, what: str = "volume", ndim: Sequence[int] = (3,)) -> np.ndarray:
    check_array(payload, max_bytes, what, ndim)
    return inflate_array(payload, _b64decode(payload.get("data"), what), max_bytes, what, ndim)


def inflate_array(payload: Dict[str, Any], blob: bytes, max_bytes: int, what: str = "volume",
                  ndim: Sequence[int] = (3,)) -> np.ndarray:
    """The array of a payload whose base64 `data` was already decoded into `blob` (zlib bytes)."""
    expected = check_array(payload, max_bytes, what, ndim)
    shape = [int(n) for n in payload["shape"]]
    dtype = np.dtype(payload["dtype"]).newbyteorder("<")
    raw = _inflate(blob, expected, what)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def b64decode(text: str, what: str) -> bytes:
    """base64 `data` of an array or mask payload as bytes (WireError when it is not base64)."""
    return _b64decode(text, what)


EMPTY_CROP = {"offset": [0, 0], "shape": [0, 0], "data": ""}


def encode_mask(mask: np.ndarray, base: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """`mask` cropped to the bounding box of the pixels that differ from `base` (default: empty)."""
    mask = np.asarray(mask, dtype=bool)
    changed = mask if base is None else (mask != np.asarray(base, dtype=bool))
    rows = np.flatnonzero(changed.any(axis=1))
    if rows.size == 0:
        return dict(EMPTY_CROP)
    cols = np.flatnonzero(changed.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = mask[r0:r1, c0:c1]
    return {
        "offset": [r0, c0],
        "shape": [r1 - r0, c1 - c0],
        "data": base64.b64encode(zlib.compress(np.packbits(crop).tobytes(), 6)).decode("ascii"),
    }


def decode_mask(payload: Dict[str, Any], size: Tuple[int, int], base: Optional[np.ndarray] = None,
                what: str = "mask") -> np.ndarray:
    """Rebuilds a full (H, W) bool mask from a crop over `base` (default: empty)."""
    height, width = int(size[0]), int(size[1])
    out = np.zeros((height, width), dtype=bool) if base is None else np.array(base, dtype=bool, copy=True)
    if out.shape != (height, width):
        raise WireError(f"{what}: base mask has shape {out.shape}, the slice is {(height, width)}")
    try:
        r0, c0 = (int(v) for v in payload["offset"])
        h, w = (int(v) for v in payload["shape"])
    except (KeyError, TypeError, ValueError):
        raise WireError(f"{what}: needs offset [row, col] and shape [h, w]") from None
    if h == 0 or w == 0:
        return out
    return paste_crop(out, (r0, c0, h, w), _b64decode(payload.get("data"), what), what)


def paste_crop(out: np.ndarray, crop: Sequence[int], blob: bytes, what: str = "mask") -> np.ndarray:
    """Writes a mask crop (r0, c0, h, w), `blob` = zlib(packbits(crop)) already base64-decoded, into `out`."""
    height, width = out.shape
    r0, c0, h, w = (int(v) for v in crop)
    if h == 0 or w == 0:
        return out
    if r0 < 0 or c0 < 0 or h < 0 or w < 0 or r0 + h > height or c0 + w > width:
        raise WireError(f"{what}: crop at {[r0, c0]} of size {[h, w]} lies outside the {height}x{width} slice")
    packed = _inflate(blob, (h * w + 7) // 8, what)
    out[r0 : r0 + h, c0 : c0 + w] = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=h * w).reshape(h, w)
    return out


def version_tuple(version: str) -> Tuple[int, int]:
    """major.minor of a version string such as 0.1.0 or 1.2.3.dev4."""
    parts = str(version).split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (-1, -1)
