"""Oracle predictors for testing and evaluating propagation (never used by the product).

An oracle answers a box prompt on a slice with a known 3D mask (an expert segmentation or a
synthetic shape) cut to the box: the perfect box-prompted model. Degraded oracles imitate model
errors: a dilated or eroded truth, boundary noise, slices where the model finds nothing. They
separate the propagation logic (boxes, stop rules, post-processing) from model quality.

Also: the expert segmentation of slicerio's CT sample as [k, j, i] masks, and synthetic shapes.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from medsam_slicer.slicing import array_dim, get_slice, slice_count


class Oracle:
    """`(slice index, box) -> (truth on that slice cut to the box, score)`.

    truth: bool [k, j, i]; axis: the slicing axis; dropped: slices answered with an empty mask;
    score: returned with every answer (None: the oracle gives no score). Records every request.
    """

    def __init__(self, truth: np.ndarray, axis: str = "k", dropped: Iterable[int] = (), score: Optional[float] = 1.0):
        self.truth = np.asarray(truth, dtype=bool)
        self.axis = axis
        self.dropped = set(int(i) for i in dropped)
        self.score = score
        self.requests: List[Tuple[int, Tuple[int, int, int, int]]] = []
        self.calls: Counter = Counter()
        self.prefetched: List[int] = []

    @property
    def n_slices(self) -> int:
        return slice_count(self.truth.shape, self.axis)

    @property
    def slice_shape(self) -> Tuple[int, int]:
        return tuple(get_slice(self.truth, self.axis, 0).shape)

    def prefetch(self, indices) -> None:
        self.prefetched.extend(int(i) for i in indices)

    def __call__(self, index: int, box):
        index = int(index)
        x0, y0, x1, y1 = (int(v) for v in box)
        h, w = self.slice_shape
        assert 0 <= index < self.n_slices, f"slice {index} requested outside 0..{self.n_slices - 1}"
        assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h, f"bad box {box} for slice shape {(h, w)}"
        self.requests.append((index, (x0, y0, x1, y1)))
        self.calls[index] += 1
        out = np.zeros((h, w), dtype=bool)
        if index not in self.dropped:
            out[y0 : y1 + 1, x0 : x1 + 1] = get_slice(self.truth, self.axis, index)[y0 : y1 + 1, x0 : x1 + 1]
        return out, self.score


# ---------------------------------------------------------------------------------------------
# degraded truths

DEGRADATIONS = ("exact", "dilated", "eroded", "dropped", "noisy")


def degraded_oracle(truth: np.ndarray, kind: str, axis: str = "k", seed: int = 0, protect: Sequence[int] = ()) -> Oracle:
    """An oracle with one kind of error (scores are None for degraded ones: no quality signal).

    dilated: truth dilated by one voxel in 3D (6-neighbourhood): 1 px fatter in-plane and one
        extra slice at each end, like a model that bleeds into partial-volume voxels.
    eroded: truth eroded by 1 px in each slice: thin parts and small end slices vanish.
    dropped: 15% of the slices holding the structure (never those in `protect`) come back empty.
    noisy: each pixel within 1 px of the boundary flips with probability 0.3.
    """
    truth = np.asarray(truth, dtype=bool)
    rng = np.random.default_rng(seed)
    if kind == "exact":
        return Oracle(truth, axis)
    if kind == "dilated":
        return Oracle(ndimage.binary_dilation(truth), axis, score=None)
    dim = array_dim(axis)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[tuple(1 if d == dim else slice(None) for d in range(3))] = ndimage.generate_binary_structure(2, 1)
    if kind == "eroded":
        return Oracle(ndimage.binary_erosion(truth, structure=in_plane), axis, score=None)
    if kind == "dropped":
        present = [i for i in range(slice_count(truth.shape, axis)) if get_slice(truth, axis, i).any() and i not in set(protect)]
        count = max(1, int(round(0.15 * len(present)))) if present else 0
        dropped = rng.choice(present, size=count, replace=False) if count else []
        return Oracle(truth, axis, dropped=dropped, score=None)
    if kind == "noisy":
        band = ndimage.binary_dilation(truth, structure=in_plane) & ~ndimage.binary_erosion(truth, structure=in_plane)
        flip = band & (rng.random(truth.shape) < 0.3)
        return Oracle(truth ^ flip, axis, score=None)
    raise ValueError(f"unknown degradation {kind!r}")


# ---------------------------------------------------------------------------------------------
# the CT sample's expert segmentation


def sample_paths() -> Tuple[str, str]:
    import slicerio

    data = os.path.join(os.path.dirname(slicerio.__file__), "data")
    return os.path.join(data, "CTChest4.nrrd"), os.path.join(data, "Segmentation.seg.nrrd")


def expert_segments(seg_path: Optional[str] = None, shape_kji: Sequence[int] = (34, 128, 128)) -> Dict[str, np.ndarray]:
    """Each segment of slicerio's expert segmentation as a bool [k, j, i] mask on CTChest4's grid.

    slicerio returns voxels indexed (i, j, k) (NRRD order), possibly cropped to the segments'
    extent with `referenceImageExtentOffset` giving the crop's first (i, j, k) voxel. Checked: its
    ijkToLPS equals CTChest4.nrrd's geometry, and the lung segments sit on voxels below -500 HU.
    """
    import slicerio

    seg = slicerio.read_segmentation(seg_path or sample_paths()[1])
    voxels = np.asarray(seg["voxels"])
    offset = [int(v) for v in seg.get("referenceImageExtentOffset", (0, 0, 0))]
    out = {}
    for segment in seg["segments"]:
        layer = voxels[..., segment["layer"]] if voxels.ndim == 4 else voxels
        mask_ijk = layer == segment["labelValue"]
        full = np.zeros(tuple(shape_kji), dtype=bool)
        ni, nj, nk = mask_ijk.shape
        full[offset[2] : offset[2] + nk, offset[1] : offset[1] + nj, offset[0] : offset[0] + ni] = mask_ijk.transpose(2, 1, 0)
        out[segment["name"]] = full
    return out


# ---------------------------------------------------------------------------------------------
# synthetic 3D shapes, [k, j, i] bool


def _grid(shape):
    return np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")


def sphere(shape=(40, 64, 64), center=(20, 32, 32), radius=12.0) -> np.ndarray:
    k, j, i = _grid(shape)
    return (k - center[0]) ** 2 + (j - center[1]) ** 2 + (i - center[2]) ** 2 <= radius**2


def tilted_ellipsoid(shape=(40, 64, 64), center=(20, 32, 32), radii=(14.0, 7.0, 5.0), tilt_deg=35.0) -> np.ndarray:
    """Long axis along k, tilted toward i by tilt_deg: its cross-section drifts across slices."""
    k, j, i = _grid(shape)
    t = np.deg2rad(tilt_deg)
    dk, dj, di = k - center[0], j - center[1], i - center[2]
    u = dk * np.cos(t) + di * np.sin(t)
    w = -dk * np.sin(t) + di * np.cos(t)
    return (u / radii[0]) ** 2 + (dj / radii[1]) ** 2 + (w / radii[2]) ** 2 <= 1.0


def touching_blobs(shape=(40, 64, 64)) -> Tuple[np.ndarray, np.ndarray]:
    """Two spheres that touch (one labelled target, the other a neighbour of the same look)."""
    a = sphere(shape, (18, 32, 24), 9.0)
    b = sphere(shape, (22, 32, 41), 9.0) & ~a
    return a, b


def splitting_tube(shape=(40, 64, 64)) -> np.ndarray:
    """A vertical tube (k 6..20) that splits into two diverging branches (k 20..34): a Y."""
    k, j, i = _grid(shape)
    trunk = ((j - 32) ** 2 + (i - 32) ** 2 <= 6.0**2) & (k >= 6) & (k <= 20)
    spread = np.clip(k - 20, 0, None) * 0.9
    left = ((j - 32) ** 2 + (i - 32 + 3 + spread) ** 2 <= 4.0**2) & (k >= 18) & (k <= 34)
    right = ((j - 32) ** 2 + (i - 32 - 3 - spread) ** 2 <= 4.0**2) & (k >= 18) & (k <= 34)
    return trunk | left | right


def synthetic_shapes() -> Dict[str, np.ndarray]:
    blob, _ = touching_blobs()
    return {
        "sphere": sphere(),
        "tilted ellipsoid": tilted_ellipsoid(),
        "touching blobs (one)": blob,
        "touching blobs (both)": np.logical_or(*touching_blobs()),
        "splitting tube": splitting_tube(),
    }
