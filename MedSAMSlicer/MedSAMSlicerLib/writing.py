"""Writing slice results into a segment through the Segment Editor's own modify path.

The Segment Editor applies the editable area (mask mode), the editable intensity range and the
overwrite-other-segments setting when a labelmap goes through ``modifySelectedSegmentByLabelmap``
(the effect) or ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`` (the logic it delegates to
since Slicer 5.9). ``ModificationModeSet`` would replace the WHOLE segment, so slice-wise results
are written as "add the new masks" then "remove what is outside them on those slices", both over the
slab of slices touched. This order gives, slice by slice, what a Set of the new slice would give:
the editable area of the "inside ... segments" modes includes the edited segment itself, so adding
first keeps the new mask where the old slice content was. Nothing here touches the source voxels.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .geometry import AXES

# vtkSlicerSegmentEditorLogic / qSlicerSegmentEditorAbstractEffect ModificationMode values
MODE_SET, MODE_ADD, MODE_REMOVE, MODE_REMOVE_ALL = 0, 1, 2, 3


def image_to_array(image) -> np.ndarray:
    """A copy of a vtkImageData's first scalar component as a [k, j, i] numpy array."""
    from vtk.util import numpy_support

    dims = shape_kji(image)
    scalars = image.GetPointData().GetScalars()
    values = numpy_support.vtk_to_numpy(scalars)
    ncomp = scalars.GetNumberOfComponents()
    values = values.reshape(dims + (ncomp,))[..., 0] if ncomp > 1 else values.reshape(dims)
    return np.array(values, copy=True)


def shape_kji(image) -> Tuple[int, int, int]:
    """Array shape [k, j, i] of a vtkImageData's extent."""
    e = image.GetExtent()
    return (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)


def slab_extent(reference_image, axis: str, first: int, last: int) -> Tuple[int, int, int, int, int, int]:
    """The reference image's extent restricted to array slices first..last along axis."""
    extent = list(reference_image.GetExtent())
    n = AXES.index(axis)
    start = extent[2 * n]
    extent[2 * n], extent[2 * n + 1] = start + int(first), start + int(last)
    return tuple(extent)


def make_labelmap(reference_image, extent, values_kji: np.ndarray):
    """A vtkOrientedImageData (uint8) with the reference image's geometry over `extent`."""
    import vtk
    from vtk.util import numpy_support

    import slicer

    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetSpacing(reference_image.GetSpacing())
    labelmap.SetOrigin(reference_image.GetOrigin())
    directions = vtk.vtkMatrix4x4()
    reference_image.GetDirectionMatrix(directions)
    labelmap.SetDirectionMatrix(directions)
    labelmap.SetExtent(extent)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    flat = np.ascontiguousarray(values_kji, dtype=np.uint8).ravel()
    target = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    target[:] = flat
    return labelmap


def slice_modifiers(reference_image, masks: Dict[int, np.ndarray], axis: str,
                    regions: Optional[Dict[int, np.ndarray]] = None):
    """(extent, remove labelmap, add labelmap) for replacing slices `masks` ({index: bool (H, W)}).

    add is the masks; remove is the rest of those slices (never the slab's other slices), or only
    the part of `regions[index]` outside the mask for the slices that have a region."""
    from medsam_slicer import slicing

    if not masks:
        raise ValueError("no slices to write")
    regions = regions or {}
    slab_shape = list(shape_kji(reference_image))
    dim = slicing.array_dim(axis)
    first, last = min(masks), max(masks)
    if first < 0 or last >= slab_shape[dim]:
        raise ValueError(f"slice index out of range 0..{slab_shape[dim] - 1} along {axis}")
    slab_shape[dim] = last - first + 1
    remove = np.zeros(slab_shape, dtype=np.uint8)
    add = np.zeros(slab_shape, dtype=np.uint8)
    for index, mask in masks.items():
        sel = slicing.slice_index(axis, index - first)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != remove[sel].shape:
            raise ValueError(f"slice {index}: mask shape {mask.shape} does not match the slice {remove[sel].shape}")
        region = regions.get(index)
        if region is None:
            remove[sel] = ~mask
        else:
            region = np.asarray(region, dtype=bool)
            if region.shape != mask.shape:
                raise ValueError(f"slice {index}: region shape {region.shape} does not match the slice {mask.shape}")
            remove[sel] = region & ~mask
        add[sel] = mask
    extent = slab_extent(reference_image, axis, first, last)
    return extent, make_labelmap(reference_image, extent, remove), make_labelmap(reference_image, extent, add)


def write_slices(
    modify: Callable,
    reference_image,
    masks: Dict[int, np.ndarray],
    axis: str,
    replace: bool = True,
    regions: Optional[Dict[int, np.ndarray]] = None,
) -> Tuple[int, ...]:
    """Writes {slice index: bool mask (H, W)} along `axis` into the selected segment.

    modify(labelmap, mode, extent, bypass_masking): the editor's modify call, e.g. ``effect_modifier(scriptedEffect)``
    or ``logic_modifier(logic, segmentationNode, segmentId)``. The caller saves the undo state once
    before. replace: clear the slices' old content outside the new masks (redrawing a slice replaces
    it); without it the masks are added to the segment. regions: {index: bool (H, W)}, for the slices
    where only part of the old content is replaced (see ``redraw_region``); the rest stays.
    The editor's rules apply unchanged: in "inside a single segment" mode, what is erased from the
    edited segment goes back to the mask segment (Slicer's split-a-segment behaviour).
    Returns the extent written.
    """
    extent, remove, add = slice_modifiers(reference_image, masks, axis, regions)
    if any(np.any(m) for m in masks.values()):
        modify(add, MODE_ADD, extent, False)
    if replace:
        modify(remove, MODE_REMOVE, extent, False)
    return extent


def redraw_region(old: np.ndarray, box, mask: np.ndarray) -> np.ndarray:
    """What a box drawn again on a slice replaces: the box itself and every piece of the slice's old
    content (8-connected) that touches the box or the new mask. Pieces elsewhere on the slice (the
    other lung of a "lungs" segment) stay.

    old, mask: bool (H, W); box: [x0, y0, x1, y1] inclusive, x along the slice's columns."""
    from scipy import ndimage

    old = np.asarray(old, dtype=bool)
    region = np.zeros(old.shape, dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    region[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    touched = region | np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(old, structure=np.ones((3, 3), dtype=bool))
    if count:
        hit = np.unique(labels[touched & old])
        region |= np.isin(labels, hit[hit > 0])
    return region


def effect_modifier(scripted_effect) -> Callable:
    """modify() for write_slices inside a Segment Editor effect (masking and overwrite applied)."""
    import slicer

    modes = {
        MODE_SET: slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
        MODE_ADD: slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
        MODE_REMOVE: slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove,
    }

    def modify(labelmap, mode, extent, bypass_masking=False):
        scripted_effect.modifySelectedSegmentByLabelmap(labelmap, modes[mode], list(extent), bool(bypass_masking))

    return modify


def logic_modifier(logic, segmentation_node, segment_id: str, per_segment: bool = True) -> Callable:
    """modify() through vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap (the code the effect's
    modifySelectedSegmentByLabelmap delegates to in Slicer >= 5.9)."""

    import slicer

    cls = slicer.vtkSlicerSegmentEditorLogic
    modes = {MODE_SET: cls.ModificationModeSet, MODE_ADD: cls.ModificationModeAdd,
             MODE_REMOVE: cls.ModificationModeRemove, MODE_REMOVE_ALL: cls.ModificationModeRemoveAll}

    def modify(labelmap, mode, extent, bypass_masking=False):
        logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, modes[mode], list(extent), per_segment,
                                      bool(bypass_masking))

    return modify


def segment_array(segmentation_node, segment_id: str, reference_image) -> np.ndarray:
    """The segment as a bool [k, j, i] array on the reference image's grid (for reading back)."""
    import vtk

    import slicer

    labelmap = slicer.vtkOrientedImageData()
    ok = segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    if not ok:
        raise ValueError(f"segment {segment_id} has no binary labelmap")
    extent = labelmap.GetExtent()
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return np.zeros(shape_kji(reference_image), dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    # Nearest-neighbour resampling onto the reference grid (0 outside the segment's own extent).
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference_image, resampled, False, False
    ):
        raise ValueError("could not resample the segment to the source image's grid")
    return image_to_array(resampled) > 0


def segment_slices(segmentation_node, segment_id: str, reference_image, axis: str,
                   indices=None) -> Dict[int, np.ndarray]:
    """Slices of a segment as {index: bool (H, W)}, for propagation seeds and re-propagation.

    indices: the slices wanted; None: every slice where the segment is not empty."""
    from medsam_slicer import slicing

    volume = segment_array(segmentation_node, segment_id, reference_image)
    if indices is None:
        other_dims = tuple(d for d in range(3) if d != slicing.array_dim(axis))
        indices = np.flatnonzero(volume.any(axis=other_dims))
    return {int(i): slicing.get_slice(volume, axis, int(i)).copy() for i in indices}


def protected_area(editor_node, reference_image) -> Optional[np.ndarray]:
    """Where the editor's editable area (mask mode) lets nothing be written into the selected segment,
    as a bool [k, j, i] array on the reference image's grid; None where that is nowhere (the default
    "Everywhere"). Growth stops where it runs into it (medsam_slicer.propagation.ProtectedStop).
    Only the segments decide it: the editable intensity range trims a structure's own darker or
    brighter voxels, which says nothing about where the structure ends."""
    import slicer

    segmentation_node = editor_node.GetSegmentationNode() if editor_node is not None else None
    if segmentation_node is None or editor_node.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
        return None
    mask = slicer.vtkOrientedImageData()
    if not segmentation_node.GenerateEditMask(mask, editor_node.GetMaskMode(), reference_image,
                                              editor_node.GetSelectedSegmentID() or "",
                                              editor_node.GetMaskSegmentID() or ""):
        raise ValueError("the Segment Editor's editable area could not be computed")
    protected = image_to_array(mask) > 0
    return protected if protected.any() else None
