"""The server's request and reply schemas (pydantic): they validate every request and document the API
in its OpenAPI schema. Also what a request means for the engine: `resolve_window` and `job_kwargs`.

Job options a request leaves out are left out of the engine call too (their defaults are the
propagation functions', see protocol.JOB_OPTIONS); the stop rules' schema is built from StopRules.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError
from ..windowing import IntensityWindow, choose_window
from .protocol import JOB_ID_PATTERN, JOB_OPTIONS, option_default, rule_fields, rules_from_wire, window_from_wire

Number = Union[int, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ArrayPayload(_Strict):
    """Voxels as raw little-endian C-order bytes of the [k, j, i] array, zlib-compressed, base64."""

    dtype: str = Field(description="uint8, int8, uint16, int16, uint32, int32, float32 or float64")
    shape: List[int] = Field(min_length=3, max_length=3, description="[k, j, i]")
    compression: str = Field("zlib", description="zlib")
    data: str = Field(description="base64 of the zlib-compressed bytes")


class MaskPayload(_Strict):
    """A 2D mask cropped to the extent that changed: rows offset[0].., columns offset[1]..;
    data = base64(zlib(numpy.packbits(crop))). shape [0, 0]: unchanged."""

    offset: List[int] = Field(min_length=2, max_length=2)
    shape: List[int] = Field(min_length=2, max_length=2)
    data: str = ""


class WindowSpec(_Strict):
    """One of: width + level; a preset (ct-abdomen, ct-lung, ct-brain, ct-bone, ct-mediastinum,
    mr, auto); or the resolved low + high (+ keep_zero) of an IntensityWindow."""

    width: Optional[float] = None
    level: Optional[float] = None
    preset: Optional[str] = Field(None, max_length=64)
    low: Optional[float] = None
    high: Optional[float] = None
    keep_zero: bool = False
    name: str = Field("custom", max_length=64)


class Geometry(_Strict):
    """Where the voxels sit (kept with the session and returned; the model works in voxel space)."""

    spacing: Optional[List[float]] = Field(None, min_length=3, max_length=3)
    origin: Optional[List[float]] = Field(None, min_length=3, max_length=3)
    directions: Optional[List[float]] = Field(None, min_length=9, max_length=9)


class CreateSession(_Strict):
    volume: ArrayPayload
    model: Optional[str] = Field(None, max_length=64, description="one of the server's models (GET /v1/info); "
                                 "default: the first it holds")
    window: WindowSpec = Field(default_factory=lambda: WindowSpec(preset="auto"))
    geometry: Optional[Geometry] = None


class WindowOut(BaseModel):
    low: float
    high: float
    keep_zero: bool
    name: str


class SessionInfo(BaseModel):
    session_id: str
    shape: List[int]
    dtype: str
    volume_key: str
    model: str
    window: WindowOut
    geometry: Optional[Geometry] = None
    idle_timeout_s: float


class SegmentRequest(_Strict):
    axis: str = Field("k", description="i, j or k")
    index: int
    box: List[Number] = Field(min_length=4, max_length=4, description="[x0, y0, x1, y1], inclusive pixels")


class SegmentReply(BaseModel):
    index: int
    size: List[int]
    score: float
    mask: MaskPayload


class PrefetchRequest(_Strict):
    axis: str = "k"
    indices: List[int] = Field(max_length=4096)


def _rules_model():
    """The wire form of stop_rules.StopRules, one optional field per rule (a new rule is written once)."""
    from pydantic import create_model

    fields = {name: (Optional[kind], Field(None, description=f"default {getattr(_default_rules(), name)!r}"))
              for name, kind in rule_fields().items()}
    model = create_model("Rules", __base__=_Strict, **fields)
    model.__doc__ = ("Stop rules of open-ended growth (see stop_rules.StopRules): an omitted field keeps its "
                     "default, an explicit null switches that rule off.")
    return model


def _default_rules():
    from ..stop_rules import StopRules

    return StopRules()


Rules = _rules_model()


def _option(route: str, name: str, description: str = "", **kw):
    """A job option left out of a request takes the propagation function's own default (shown here)."""
    text = f"{description}; " if description else ""
    return Field(None, description=f"{text}default: {option_default(route, name)!r}", **kw)


class _JobOptions(_Strict):
    axis: str = "k"
    margin: Optional[Union[Number, List[Number]]] = Field(
        None, description="pixels: one number or [x, y]; default: the model's own (its scale's default margin)")
    keep_largest: Optional[bool] = _option("propagate", "keep_largest")
    fill_holes: Optional[bool] = _option("propagate", "fill_holes")
    lookahead: Optional[int] = _option("propagate", "lookahead", ge=1, le=64)
    job_id: Optional[str] = Field(None, pattern=JOB_ID_PATTERN, description="client-chosen id for /v1/jobs/{id}/cancel")


class IndexedMask(_Strict):
    index: int
    mask: MaskPayload


PROTECTED_DOC = ("where the user protects other segments: a mask per slice of the job's axis (slices left out are "
                 "unprotected); growth ends at the first slice whose mask lies half inside it")


class PropagateRequest(_JobOptions):
    seed_index: int
    seed_box: Optional[List[Number]] = Field(None, min_length=4, max_length=4)
    seed_mask: Optional[MaskPayload] = None
    direction: Optional[str] = _option("propagate", "direction", "both, up or down")
    rules: Optional[Rules] = None
    protected: Optional[List[IndexedMask]] = Field(None, max_length=65536, description=PROTECTED_DOC)


class Box3DRequest(_JobOptions):
    box: List[Number] = Field(min_length=4, max_length=4)
    first: int
    last: int
    start: Optional[int] = _option("box3d", "start", "slice to start from (None: the middle)")
    clip_to_box: Optional[bool] = _option("box3d", "clip_to_box")
    min_appearance: Optional[float] = _option("box3d", "min_appearance", "re-prompt with the 3D box below this share")
    recover: Optional[bool] = _option("box3d", "recover", "also prompt each slice with the 3D box; keep it when it scores clearly higher")


class KeyBox(_Strict):
    index: int
    box: List[Number] = Field(min_length=4, max_length=4)


class KeySlicesRequest(_JobOptions):
    key_boxes: List[KeyBox] = Field(min_length=1, max_length=4096)
    combine: Optional[str] = _option("key-slices", "combine", "union, intersect, interpolate or propagate")
    gap_fill: Optional[str] = _option("key-slices", "gap_fill", "larger or both")


class RepropagateRequest(_JobOptions):
    masks: List[IndexedMask] = Field(max_length=65536)
    corrected_index: int
    corrected_mask: MaskPayload
    seed_index: int
    rules: Optional[Rules] = None
    protected: Optional[List[IndexedMask]] = Field(None, max_length=65536, description=PROTECTED_DOC)


class ErrorReply(BaseModel):
    error: str
    message: str


STREAM_DOC = (
    "NDJSON stream, one JSON object per line: `start` {job_id, n_slices}; `slice` {index, done, total, mask} "
    "as each slice finishes (mask cropped to its extent; for re-propagation, to the extent changed against the "
    "mask sent for that slice); `heartbeat` while the worker is busy; `mask` {index, mask} for a final mask "
    "that differs from its streamed one; finally `done` {indices, stop_reasons, cancelled} or "
    "`error` {status, message}. Closing the connection, or POST /v1/jobs/{job_id}/cancel, cancels the job."
)


def resolve_window(spec: WindowSpec, volume: np.ndarray) -> IntensityWindow:
    if spec.low is not None or spec.high is not None:
        return window_from_wire(spec.model_dump())
    if spec.width is not None or spec.level is not None:
        if spec.width is None or spec.level is None:
            raise InputError("a window needs both width and level")
        if spec.preset is not None:
            raise InputError("give either a window (width, level) or a preset, not both")
        return choose_window(volume, window=(spec.width, spec.level))
    window = choose_window(volume, preset=spec.preset)
    if not (np.isfinite(window.low) and np.isfinite(window.high)):  # computed from infinite or NaN voxels
        raise InputError(f"the {window.name} window of this volume is not finite (low {window.low:g}, high "
                         f"{window.high:g}): the volume has infinite or NaN voxels; give a window (width, level)")
    return window


def job_kwargs(route: str, req: _JobOptions) -> Dict[str, Any]:
    """The options a request gave, as keyword arguments of its propagation function (JOB_OPTIONS);
    the ones it left out are left out, so the function's own defaults apply."""
    kw: Dict[str, Any] = {}
    for name in JOB_OPTIONS[route][1]:
        value = getattr(req, name)
        if name == "rules":
            value = rules_from_wire(value.model_dump(exclude_unset=True)) if value is not None else None
        if value is not None:
            kw[name] = value
    return kw
