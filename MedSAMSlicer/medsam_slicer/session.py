"""LocalSession: one volume and intensity window on a local engine.

This is the interface front ends program against; the remote client's session offers the same
methods, so the Slicer module and the command line switch engines by a setting.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .cache import EmbeddingCache, default_cache
from .predictor import SlicePredictor, volume_key
from .slicing import slice_distance
from .windowing import IntensityWindow


class LocalSession:
    """background: embed slices ahead on a background thread (`prefetch.PrefetchingPredictor`):
    propagation's next slices, and the neighbours of the slice passed to `focus`. Interactive
    front ends (the Slicer effect) want it; a batch command line does not. spacing: the voxel
    spacing (i, j, k mm), which propagation uses to keep its next box as steady per millimetre on
    thin slices as on thick ones (None: unknown, each slice taken as thick)."""

    def __init__(self, engine, volume: np.ndarray, window: IntensityWindow, cache: Optional[EmbeddingCache] = None,
                 background: bool = False, spacing=None):
        self.engine = engine
        self.spacing = spacing
        self.background = background
        self.volume = volume
        self.window = window
        self.cache = cache if cache is not None else default_cache(engine.device)
        self.key = volume_key(volume)
        self._predictors: Dict[str, SlicePredictor] = {}

    def predictor(self, axis: str):
        """One predictor per axis (a SlicePredictor, wrapped for background encoding when asked);
        all share the session's embedding cache."""
        pred = self._predictors.get(axis)
        if pred is None or pred.window != self.window:
            if pred is not None and hasattr(pred, "close"):
                pred.close()
            pred = SlicePredictor(self.engine, self.volume, self.window, axis, self.cache, self.key,
                                  slice_mm=slice_distance(self.spacing, axis))
            if self.background:
                from .prefetch import PrefetchingPredictor

                pred = PrefetchingPredictor(pred)
            self._predictors[axis] = pred
        return pred

    def focus(self, axis: str, index: int, radius: int = 2) -> None:
        """The user is looking at this slice: embed its neighbours in the background."""
        pred = self.predictor(axis)
        if hasattr(pred, "focus"):
            pred.focus(index, radius)

    def set_window(self, window: IntensityWindow) -> None:
        self.window = window  # embeddings of the old window stay cached under their own key

    def segment_slice(self, axis: str, index: int, box):
        """(bool mask (H, W), quality score) for one 2D box [x0, y0, x1, y1] on one slice."""
        from .propagation import check_box

        pred = self.predictor(axis)
        check_box(box, pred.slice_shape)  # the server refuses the same boxes
        return pred(index, box)

    def propagate(self, axis: str, seed_index: int, seed_box=None, seed_mask=None, **options):
        from .propagation import propagate_from_slice

        return propagate_from_slice(self.predictor(axis), seed_index, seed_box=seed_box, seed_mask=seed_mask, **options)

    def segment_box3d(self, axis: str, box2d, first: int, last: int, **options):
        from .propagation import segment_box3d

        return segment_box3d(self.predictor(axis), box2d, first, last, **options)

    def segment_key_slices(self, axis: str, key_boxes, **options):
        from .propagation import segment_key_slices

        return segment_key_slices(self.predictor(axis), key_boxes, **options)

    def repropagate(self, axis: str, masks, corrected_index: int, corrected_mask, seed_index: int, **options):
        from .propagation import repropagate

        return repropagate(self.predictor(axis), masks, corrected_index, corrected_mask, seed_index, **options)

    def close(self) -> None:
        for pred in self._predictors.values():
            if hasattr(pred, "close"):
                pred.close()
        self._predictors.clear()
