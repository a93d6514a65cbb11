"""Voxel-index conventions shared by every front end.

Volumes are numpy arrays indexed [k, j, i] (SimpleITK's and Slicer's array order). A 2D slice
cut along one of the IJK axes is shown with its rows and columns as below, and a 2D box on it is
[x_min, y_min, x_max, y_max] with x along the slice's columns, corners inclusive.

    axis  array dim  slice rows  slice columns (x)
    k     0          j           i
    j     1          k           i
    i     2          k           j
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import InputError

AXES = ("i", "j", "k")
_ARRAY_DIM = {"k": 0, "j": 1, "i": 2}
# For each slicing axis: (IJK index of the slice's x, IJK index of its y), IJK index i=0, j=1, k=2.
_IN_PLANE = {"k": (0, 1), "j": (0, 2), "i": (1, 2)}
_IJK = {"i": 0, "j": 1, "k": 2}

Box2D = Tuple[int, int, int, int]


def check_axis(axis: str) -> str:
    if axis not in _ARRAY_DIM:
        raise InputError(f"unknown axis '{axis}': use i, j or k")
    return axis


def array_dim(axis: str) -> int:
    return _ARRAY_DIM[check_axis(axis)]


def slice_count(shape_kji: Sequence[int], axis: str) -> int:
    return int(shape_kji[array_dim(axis)])


def slice_shape(shape_kji: Sequence[int], axis: str) -> Tuple[int, int]:
    """(rows, columns) of a slice cut along `axis` from a volume of array shape [k, j, i]."""
    rows, cols = (int(n) for d, n in enumerate(shape_kji[:3]) if d != array_dim(axis))
    return rows, cols


def get_slice(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """One slice, rows and columns as in the table above (a colour volume [k, j, i, rgb] keeps its
    channels); a 2D array is its own slice."""
    return volume if volume.ndim == 2 else np.take(volume, index, axis=array_dim(axis))


def slice_distance(spacing_ijk, axis: str) -> Optional[float]:
    """Millimetres between neighbouring slices cut along `axis`, from the voxel spacing (i, j, k mm);
    None when the spacing is not known or not a positive finite number."""
    if spacing_ijk is None:
        return None
    try:
        value = float(np.asarray(spacing_ijk, dtype=float).ravel()[_IJK[check_axis(axis)]])
    except (TypeError, ValueError, IndexError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def slice_index(axis: str, index: int) -> tuple:
    """Numpy index that selects slice `index` of a [k, j, i] array (usable for assignment)."""
    idx = [slice(None)] * 3
    idx[array_dim(axis)] = index
    return tuple(idx)


@dataclass(frozen=True)
class Box3D:
    """Inclusive voxel-index corners (i0, j0, k0) and (i1, j1, k1)."""

    lo: Tuple[int, int, int]
    hi: Tuple[int, int, int]

    @classmethod
    def from_corners(cls, values: Sequence[float], shape_kji: Sequence[int]) -> "Box3D":
        """Validates a user's box against a volume of array shape [k, j, i]."""
        if len(values) != 6:
            raise InputError("a box needs six numbers: I0 J0 K0 I1 J1 K1")
        try:
            corners = [int(v) for v in values]
        except (TypeError, ValueError):
            raise InputError(f"box corners must be integers, got {list(values)}") from None
        if any(float(v) != int(v) for v in values):
            raise InputError(f"box corners must be whole voxel indices, got {list(values)}")
        lo, hi = corners[:3], corners[3:]
        size_ijk = (shape_kji[2], shape_kji[1], shape_kji[0])
        text = " ".join(str(c) for c in corners)
        for n, name in enumerate("IJK"):
            if lo[n] < 0 or hi[n] < 0:
                raise InputError(f"box {text}: negative index on {name}")
            if lo[n] > hi[n]:
                raise InputError(f"box {text}: inverted on {name} ({name}0 {lo[n]} > {name}1 {hi[n]})")
            if hi[n] >= size_ijk[n]:
                raise InputError(
                    f"box {text}: {name} index {hi[n]} is outside the image (size {size_ijk[n]} on {name})"
                )
        return cls(tuple(lo), tuple(hi))

    def in_plane(self, axis: str) -> Box2D:
        """The box's extent on a slice cut along `axis`, as [x0, y0, x1, y1]."""
        xa, ya = _IN_PLANE[check_axis(axis)]
        return (self.lo[xa], self.lo[ya], self.hi[xa], self.hi[ya])

    def slice_range(self, axis: str) -> Tuple[int, int]:
        n = _IJK[check_axis(axis)]
        return self.lo[n], self.hi[n]

    @classmethod
    def from_plane(cls, axis: str, box: Box2D, first: int, last: int) -> "Box3D":
        xa, ya = _IN_PLANE[check_axis(axis)]
        lo, hi = [0, 0, 0], [0, 0, 0]
        lo[xa], lo[ya], hi[xa], hi[ya] = box[0], box[1], box[2], box[3]
        n = _IJK[axis]
        lo[n], hi[n] = first, last
        return cls(tuple(lo), tuple(hi))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two 2D masks; 1 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


def mask_bbox(mask: np.ndarray):
    """Inclusive [x0, y0, x1, y1] of a 2D mask's foreground, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def grow_box(box, mx: int, my: int, shape) -> Tuple[int, int, int, int]:
    """An inclusive [x0, y0, x1, y1] box with each side moved out by (mx, my) pixels, clipped to a
    slice of `shape` (H, W)."""
    h, w = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = box
    return (max(0, x0 - mx), max(0, y0 - my), min(w - 1, x1 + mx), min(h - 1, y1 + my))
