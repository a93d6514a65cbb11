"""The decoder's low-res logits -> foreground probabilities on the slice, in numpy.

The engine uses this for every decode so a process that runs cached exported backends never
imports torch. Each family's twin below does what that family's torch `postprocess` does (its
reference, tested equal to it within 1e-5 on real logits): crop, one bilinear resize as
`F.interpolate(mode="bilinear", align_corners=False)` computes it, sigmoid, in that family's order.
A family without a twin is not run here (`has_twin`); the engine then uses the family's own.
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


def _litemedsam(logits: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    from .models.litemedsam import resized_shape

    h, w = resized_shape(int(size[0]), int(size[1]))  # the padding is cropped off first
    return sigmoid(bilinear(logits[:, 0, :h, :w], size))


def _medsam(logits: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    return bilinear(sigmoid(np.asarray(logits[:, 0], dtype=np.float32)), size)


_TWINS = {"litemedsam": _litemedsam, "medsam": _medsam}


def has_twin(family) -> bool:
    return getattr(family, "NAME", None) in _TWINS


def probabilities(family, logits: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Low-res logits (N, 1, h, w) as numpy -> probabilities (N, H, W) float32."""
    return _TWINS[family.NAME](np.asarray(logits, dtype=np.float32), (int(size[0]), int(size[1])))
