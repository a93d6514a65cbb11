"""Slice-view geometry: which IJK axis and slice a view shows, and display boxes as voxel boxes.

Array and box conventions are those of ``medsam_slicer.slicing``: arrays are indexed [k, j, i]
from the first voxel of the image's extent, and a 2D box on a slice cut along an axis is
[x0, y0, x1, y1] (inclusive) with x along the slice's columns:

    axis k: x = i, y = j      axis j: x = i, y = k      axis i: x = j, y = k
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

AXES = ("i", "j", "k")
# (IJK index of the slice's x, IJK index of its y) for each slicing axis, as in medsam_slicer.slicing.
IN_PLANE = {"k": (0, 1), "j": (0, 2), "i": (1, 2)}
# |cos| of the angle between the view normal and an IJK axis above which the view counts as aligned.
ALIGNED_COS = 0.9999


class ObliqueViewError(ValueError):
    """The slice view is not parallel to any of the volume's IJK planes."""


class OutsideVolumeError(ValueError):
    """The slice or box lies outside the volume."""


def matrix_to_numpy(matrix) -> np.ndarray:
    """vtkMatrix4x4 (or anything array-like 4x4) -> numpy float64 4x4."""
    if hasattr(matrix, "GetElement"):
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)
    out = np.asarray(matrix, dtype=float)
    if out.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {out.shape}")
    return out


class Grid:
    """A voxel grid: array-index (i, j, k counted from the extent's first voxel) to RAS, and its size."""

    def __init__(self, ijk_to_ras, size_ijk: Sequence[int]):
        self.ijk_to_ras = matrix_to_numpy(ijk_to_ras)
        self.ras_to_ijk = np.linalg.inv(self.ijk_to_ras)
        self.size_ijk = tuple(int(n) for n in size_ijk)

    @property
    def shape_kji(self) -> Tuple[int, int, int]:
        return (self.size_ijk[2], self.size_ijk[1], self.size_ijk[0])

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Millimetres between neighbouring voxels along i, j and k (the matrix's column lengths)."""
        return tuple(float(v) for v in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    def ras_to_index(self, ras) -> np.ndarray:
        """Continuous array indices (i, j, k) of RAS points (N, 3) -> (N, 3)."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        homog = np.c_[ras, np.ones(len(ras))]
        return (self.ras_to_ijk @ homog.T).T[:, :3]

    def index_to_ras(self, ijk) -> np.ndarray:
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        homog = np.c_[ijk, np.ones(len(ijk))]
        return (self.ijk_to_ras @ homog.T).T[:, :3]


def grid_of(source, image_to_world=None) -> Grid:
    """Grid of a vtkOrientedImageData (the editor's source image) or a volume node.

    image_to_world: optional 4x4 that already includes parent transforms (for example from
    vtkSlicerSegmentEditorLogic.ImageToWorldMatrix(image, segmentationNode, m)); it maps the image's
    structured indices (including the extent's offset) to RAS.
    """
    import vtk

    is_volume_node = hasattr(source, "GetIJKToRASMatrix")
    image = source.GetImageData() if is_volume_node else source
    if image_to_world is None:
        image_to_world = vtk.vtkMatrix4x4()
        if is_volume_node:
            source.GetIJKToRASMatrix(image_to_world)
        else:
            image.GetImageToWorldMatrix(image_to_world)
    if image is None:
        raise ValueError("the volume has no image data")
    extent = image.GetExtent()
    offset = np.eye(4)
    offset[:3, 3] = (extent[0], extent[2], extent[4])
    size = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    return Grid(matrix_to_numpy(image_to_world) @ offset, size)


def _as_grid(grid_or_source) -> Grid:
    return grid_or_source if isinstance(grid_or_source, Grid) else grid_of(grid_or_source)


def view_normal(slice_node) -> np.ndarray:
    m = matrix_to_numpy(slice_node.GetSliceToRAS())
    normal = m[:3, 2]
    return normal / np.linalg.norm(normal)


def view_axis(slice_node, grid_or_source) -> str:
    """The IJK axis ('i', 'j' or 'k') the view cuts; raises ObliqueViewError for oblique views."""
    grid = _as_grid(grid_or_source)
    normal = view_normal(slice_node)
    directions = grid.ijk_to_ras[:3, :3]
    cosines = []
    for n in range(3):
        d = directions[:, n]
        cosines.append(abs(float(np.dot(d / np.linalg.norm(d), normal))))
    best = int(np.argmax(cosines))
    if cosines[best] < ALIGNED_COS:
        angle = float(np.degrees(np.arccos(min(1.0, cosines[best]))))
        raise ObliqueViewError(
            f"this view is oblique to the volume ({angle:.1f}° from its nearest voxel axis): MedSAM works on "
            "slices along the volume's axes; reset the view orientation (Axial/Sagittal/Coronal) or "
            "use 'Rotate to volume plane' in the slice view menu"
        )
    return AXES[best]


def view_axis_and_slice(slice_node, grid_or_source) -> Tuple[str, int]:
    """(axis, slice index) that the slice view shows; raises for oblique views and off-volume slices."""
    grid = _as_grid(grid_or_source)
    axis = view_axis(slice_node, grid)
    n = AXES.index(axis)
    center = matrix_to_numpy(slice_node.GetSliceToRAS())[:3, 3]
    position = float(grid.ras_to_index(center)[0, n])
    index = int(np.floor(position + 0.5))
    if not 0 <= index < grid.size_ijk[n]:
        raise OutsideVolumeError(
            f"the view shows a plane outside the volume (slice {index} along {axis}, volume has "
            f"{grid.size_ijk[n]}); scroll into the volume"
        )
    return axis, index


def xy_to_ras(slice_node, xy) -> np.ndarray:
    """Display XY (pixels, origin bottom left, as from interactor.GetEventPosition()) to RAS."""
    m = matrix_to_numpy(slice_node.GetXYToRAS())
    return (m @ np.array([float(xy[0]), float(xy[1]), 0.0, 1.0]))[:3]


def xy_box_to_ijk_box(slice_node, xy0, xy1, grid_or_source, clip: bool = True):
    """A box dragged from display point xy0 to xy1 -> (axis, slice index, box2d [x0, y0, x1, y1]).

    The box contains the voxels whose centres the dragged rectangle's corners round to; corners can
    be dragged in any direction. With ``clip`` the box is clipped to the slice; a box entirely off
    the volume raises OutsideVolumeError.
    """
    grid = _as_grid(grid_or_source)
    axis, index = view_axis_and_slice(slice_node, grid)
    corners = [(xy0[0], xy0[1]), (xy1[0], xy0[1]), (xy0[0], xy1[1]), (xy1[0], xy1[1])]
    ras = np.array([xy_to_ras(slice_node, c) for c in corners])
    ijk = grid.ras_to_index(ras)
    xa, ya = IN_PLANE[axis]
    lo = np.floor(ijk.min(axis=0) + 0.5).astype(int)
    hi = np.floor(ijk.max(axis=0) + 0.5).astype(int)
    box = [int(lo[xa]), int(lo[ya]), int(hi[xa]), int(hi[ya])]
    width, height = grid.size_ijk[xa], grid.size_ijk[ya]
    if box[2] < 0 or box[3] < 0 or box[0] >= width or box[1] >= height:
        raise OutsideVolumeError("the box lies outside the volume")
    if clip:
        box = [max(box[0], 0), max(box[1], 0), min(box[2], width - 1), min(box[3], height - 1)]
    return axis, index, tuple(box)


def box_outline_xy(slice_node, grid_or_source, axis: str, index: int, box2d) -> np.ndarray:
    """Display XY of a voxel box's four corners (voxel edges, so the outline encloses the voxels)."""
    x0, y0, x1, y1 = box2d
    corners = [(x0 - 0.5, y0 - 0.5), (x1 + 0.5, y0 - 0.5), (x1 + 0.5, y1 + 0.5), (x0 - 0.5, y1 + 0.5)]
    return slice_points_to_xy(slice_node, grid_or_source, axis, index, corners)


def ras_box_to_ijk_box3d(grid_or_source, ras_min, ras_max):
    """An axis-aligned RAS box (e.g. a markups ROI's bounds) -> inclusive index corners (lo, hi) clipped
    to the volume, or raises OutsideVolumeError."""
    grid = _as_grid(grid_or_source)
    corners = np.array([[x, y, z] for x in (ras_min[0], ras_max[0]) for y in (ras_min[1], ras_max[1])
                        for z in (ras_min[2], ras_max[2])])
    ijk = grid.ras_to_index(corners)
    lo = np.maximum(np.ceil(ijk.min(axis=0) - 0.5).astype(int), 0)
    hi = np.minimum(np.floor(ijk.max(axis=0) + 0.5).astype(int), np.array(grid.size_ijk) - 1)
    if np.any(lo > hi):
        raise OutsideVolumeError("the ROI does not overlap the volume")
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def roi_ras_bounds(roi_node):
    """World bounds (min, max) of a markups ROI node (works for rotated ROIs: their bounding box)."""
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    return (bounds[0], bounds[2], bounds[4]), (bounds[1], bounds[3], bounds[5])


def image_to_world(image, segmentation_node=None):
    """The editor image's structured-index -> world (RAS) matrix, including the segmentation's
    parent transform when it is linear (what Slicer's editor logic uses for its conversions)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    transform = segmentation_node.GetParentTransformNode() if segmentation_node is not None else None
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise ObliqueViewError("the segmentation is under a non-linear transform: harden or remove it first")
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        combined = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(to_world, m, combined)
        m = combined
    return m


def index_direction_of_view_up(slice_node, grid_or_source, axis: str) -> int:
    """+1 when moving the view's slice forward (its normal) increases the slice index, else -1."""
    grid = _as_grid(grid_or_source)
    n = AXES.index(axis)
    return 1 if float(np.dot(grid.ijk_to_ras[:3, n], view_normal(slice_node))) > 0 else -1


def slice_points_to_xy(slice_node, grid_or_source, axis: str, index: int, points_xy) -> np.ndarray:
    """Points (x, y) in a slice's pixel coordinates (slicing convention) -> display XY of the view."""
    grid = _as_grid(grid_or_source)
    xa, ya = IN_PLANE[axis]
    n = AXES.index(axis)
    pts = np.asarray(points_xy, dtype=float).reshape(-1, 2)
    ijk = np.zeros((len(pts), 3))
    ijk[:, xa], ijk[:, ya], ijk[:, n] = pts[:, 0], pts[:, 1], index
    ras = grid.index_to_ras(ijk)
    ras_to_xy = np.linalg.inv(matrix_to_numpy(slice_node.GetXYToRAS()))
    homog = np.c_[ras, np.ones(len(ras))]
    return (ras_to_xy @ homog.T).T[:, :2]


def mask_outline_segments(mask) -> np.ndarray:
    """Boundary edges of a 2D bool mask as line segments (N, 2, 2) of (x, y) pixel-edge coordinates:
    every edge between a foreground pixel and a background (or outside) pixel."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    segs = []
    # vertical edges: between columns x-1 and x
    diff_x = padded[1:-1, 1:] != padded[1:-1, :-1]
    ys, xs = np.nonzero(diff_x)
    for y, x in zip(ys, xs):
        segs.append(((x - 0.5, y - 0.5), (x - 0.5, y + 0.5)))
    diff_y = padded[1:, 1:-1] != padded[:-1, 1:-1]
    ys, xs = np.nonzero(diff_y)
    for y, x in zip(ys, xs):
        segs.append(((x - 0.5, y - 0.5), (x + 0.5, y - 0.5)))
    return np.array(segs, dtype=float).reshape(-1, 2, 2)


def shows_slice(slice_node, grid_or_source, axis: str, index: int) -> bool:
    """Whether the view shows slice `index` along `axis` now (after a pan, zoom or scroll)."""
    try:
        return view_axis_and_slice(slice_node, grid_or_source) == (axis, int(index))
    except ValueError:  # oblique now, or off the volume
        return False


def overlay_xy(slice_node, grid_or_source, axis: str, index: int, box2d=None, mask=None) -> np.ndarray:
    """Display XY of an outline drawn for a slice, for the view as it is now: the box's corners
    (4, 2) or the mask's boundary edges (N, 2, 2); empty when the view no longer shows that slice.
    Called again on every view change so the outline follows pans, zooms and slice changes."""
    grid = _as_grid(grid_or_source)
    if not shows_slice(slice_node, grid, axis, index):
        return np.zeros((0, 2) if mask is None else (0, 2, 2))
    if mask is None:
        return box_outline_xy(slice_node, grid, axis, index, box2d)
    segments = mask_outline_segments(mask)
    return slice_points_to_xy(slice_node, grid, axis, index, segments.reshape(-1, 2)).reshape(-1, 2, 2)
