"""Bilinear resize and sigmoid in numpy, as torch computes them, for the families' `postprocess`.

Every decode's logits become probabilities here, so a process that runs cached exported backends
never imports torch. `bilinear` is `F.interpolate(mode="bilinear", align_corners=False)` (tested
equal within 1e-5 on real logits, the same masks).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def _axis(src: int, dst: int):
    """Source indices and weights along one axis as torch computes them (align_corners False:
    source = scale * (dst + 0.5) - 0.5 with a float32 scale, one rounding as its fused multiply-add
    gives (two float32 roundings differed from torch by 1e-4 on logits), clamped at 0)."""
    scale = np.float64(np.float32(src) / np.float32(dst))
    real = (scale * (np.arange(dst) + 0.5) - 0.5).astype(np.float32)
    real = np.maximum(real, np.float32(0.0))
    lo = np.minimum(np.floor(real).astype(np.int64), src - 1)
    frac = np.clip(real - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
    hi = np.minimum(lo + 1, src - 1)
    return lo, hi, np.float32(1.0) - frac, frac


def bilinear(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(N, h, w) float32 -> (N, H, W): width first, then height, as torch's CPU kernel sums."""
    x = np.asarray(x, dtype=np.float32)
    ylo, yhi, y0, y1 = _axis(x.shape[-2], int(size[0]))
    xlo, xhi, x0, x1 = _axis(x.shape[-1], int(size[1]))
    rows = x[..., xlo] * x0 + x[..., xhi] * x1
    return rows[..., ylo, :] * y0[:, None] + rows[..., yhi, :] * y1[:, None]


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative logits: 1/inf = 0
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32, copy=False)
