"""Intensity windowing to the uint8 slices MedSAM was trained on (never modifies its input).

Statistics (percentiles for MR) are computed once per volume in `choose_window`; applying the
window to a slice is then a cheap element-wise map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import InputError

# Published CT windows as (width, level) in Hounsfield units.
CT_PRESETS = {
    "ct-abdomen": (400.0, 40.0),
    "ct-lung": (1500.0, -600.0),
    "ct-brain": (80.0, 40.0),
    "ct-bone": (1800.0, 400.0),
    "ct-mediastinum": (350.0, 50.0),
}
PRESET_NAMES = tuple(CT_PRESETS) + ("mr", "auto")


@dataclass(frozen=True)
class IntensityWindow:
    """Maps raw intensities in [low, high] linearly to 0-255 (uint8, truncated).

    keep_zero: voxels that are exactly 0 stay 0 (the MR recipe).
    """

    low: float
    high: float
    keep_zero: bool = False
    name: str = "custom"

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Returns a new uint8 array; `values` is left untouched."""
        values = np.asarray(values)
        scale = 255.0 / max(self.high - self.low, 1e-8)
        out = (np.clip(values.astype(np.float32), self.low, self.high) - self.low) * scale
        out = out.astype(np.uint8)
        if self.keep_zero:
            out[values == 0] = 0
        return out

    def key(self) -> tuple:
        """Hashable identity for caches."""
        return (round(self.low, 4), round(self.high, 4), self.keep_zero)


def from_width_level(width: float, level: float, name: str = "custom") -> IntensityWindow:
    if not (width > 0 and math.isfinite(width)):
        raise InputError(f"window width must be a positive number, got {width:g}")
    if not math.isfinite(level):
        raise InputError(f"window level must be a number, got {level:g}")
    return IntensityWindow(level - width / 2.0, level + width / 2.0, False, name)


def mr_window(volume: np.ndarray) -> IntensityWindow:
    """0.5th-99.5th percentile of the voxels > 0; voxels that were 0 stay 0."""
    positive = np.asarray(volume)[np.asarray(volume) > 0]
    if positive.size == 0:
        return IntensityWindow(0.0, 1.0, True, "mr")
    low, high = np.percentile(positive, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return IntensityWindow(float(low), float(high), True, "mr")


def looks_like_hounsfield(volume: np.ndarray) -> bool:
    """CT in HU has air near -1000: a low percentile well below zero is the tell."""
    arr = np.asarray(volume)
    if arr.dtype == np.uint8 or arr.size == 0:
        return False
    sample = arr.ravel()[:: max(1, arr.size // 1_000_000)]
    return float(np.percentile(sample, 1)) < -500.0 and float(sample.max()) > 0.0


def choose_window(
    volume: np.ndarray,
    window: Optional[Sequence[float]] = None,
    preset: Optional[str] = None,
) -> IntensityWindow:
    """Resolves `--window W L` or `--preset NAME` (default `auto`) for one volume."""
    if window is not None and preset is not None:
        raise InputError("give either a window (W L) or a preset, not both")
    if window is not None:
        if len(window) != 2:
            raise InputError("a window is two numbers: width and level")
        return from_width_level(float(window[0]), float(window[1]))
    preset = (preset or "auto").lower()
    if preset == "auto":
        preset = "ct-abdomen" if looks_like_hounsfield(volume) else "mr"
    if preset == "mr":
        return mr_window(volume)
    if preset in CT_PRESETS:
        width, level = CT_PRESETS[preset]
        return from_width_level(width, level, preset)
    raise InputError(f"unknown intensity preset '{preset}'; choose from {', '.join(PRESET_NAMES)}")
