"""Mask post-processing for propagated stacks: per-slice hole filling, anchored 3D components.

SimpleITK, which reads the volumes anyway, does both (imported inside the functions so importing the
package stays cheap): scipy.ndimage gave the same labels but its import took ~0.17 s of a 4 s
command-line run (AMD EPYC, 2 cores).
"""
from __future__ import annotations

from typing import Dict, Iterable

import numpy as np


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fills holes (background not connected to the slice border) in one 2D mask."""
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    # the background is 4-connected: a pocket that meets the outside only at a corner is filled
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)).astype(bool)


def keep_anchored_components(masks: Dict[int, np.ndarray], anchors: Iterable[int]) -> Dict[int, np.ndarray]:
    """Keeps the largest 3D connected component of a stack of slice masks, plus every component
    that touches the mask of an anchor slice (the seed, key slices, corrected slices: slices the
    user prompted, whose pieces must never be removed).

    `masks` maps slice index -> bool (H, W); missing indices between the first and last count as
    empty slices (they separate components). Connectivity is 26 (8 in-plane plus diagonals across
    slices), the most permissive choice, so only truly detached pieces are removed. Returns a new
    dict with the same keys.
    """
    import SimpleITK as sitk

    if not masks:
        return {}
    indices = sorted(masks)
    lo, hi = indices[0], indices[-1]
    shape = np.shape(masks[lo])
    stack = np.zeros((hi - lo + 1,) + tuple(shape), dtype=bool)
    for index in indices:
        stack[index - lo] = masks[index]
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(stack.astype(np.uint8)), True))
    count = int(labels.max())
    if count <= 1:
        return {index: np.asarray(masks[index], dtype=bool) for index in indices}
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = np.zeros(count + 1, dtype=bool)
    keep[int(np.argmax(sizes))] = True
    for anchor in anchors:
        if lo <= anchor <= hi:
            keep[np.unique(labels[anchor - lo])] = True
    keep[0] = False
    kept = keep[labels]
    return {index: kept[index - lo].copy() for index in indices}
