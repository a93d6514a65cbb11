"""SlicePredictor: an engine bound to one volume, intensity window and slicing axis.

It is the `(slice index, 2D box) -> (mask, score)` callable that propagation, the command
line, the Slicer effect and the server all use; embeddings are cached per slice so a slice is
never encoded twice for the same volume, window, axis and model.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Tuple

import numpy as np

from .cache import EmbeddingCache, default_cache
from .errors import InputError
from .slicing import check_axis, get_slice, slice_count, slice_shape
from .windowing import IntensityWindow


def volume_key(volume: np.ndarray) -> str:
    """Content hash of the voxels (plus shape and dtype): the same data gives the same key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{volume.shape}{volume.dtype}".encode())
    digest.update(memoryview(np.ascontiguousarray(volume)).cast("B"))
    return digest.hexdigest()


class SlicePredictor:
    def __init__(
        self,
        engine,
        volume: np.ndarray,
        window: IntensityWindow,
        axis: str = "k",
        cache: Optional[EmbeddingCache] = None,
        key: Optional[str] = None,
        slice_mm: Optional[float] = None,
    ):
        self.engine = engine
        self.slice_mm = slice_mm  # millimetres between slices along axis (None: unknown), for propagation
        self.volume = volume
        self.window = window
        self.axis = check_axis(axis)
        if volume.ndim == 4 and self.axis != "k":
            raise InputError("colour images can only be cut along k")
        self.cache = cache if cache is not None else default_cache(engine.device)
        self.key = key or volume_key(volume)
        self.encoded = 0  # encoder calls made by this predictor, for tests and reports
        self.keep_probabilities = False  # when set, __call__ keeps every call's probabilities in .kept[slice]
        self.kept = {}

    @property
    def n_slices(self) -> int:
        return slice_count(self.volume.shape, self.axis)

    @property
    def slice_shape(self) -> Tuple[int, int]:
        return slice_shape(self.volume.shape, self.axis)

    @property
    def default_margin(self) -> Tuple[int, int]:
        """The model's default propagation margin in this axis's slice pixels, (x, y)."""
        return self.engine.default_margin(self.slice_shape)

    def box_around(self, mask: np.ndarray):
        """The box propagation prompts the next slice with, from the previous slice's mask, made in
        the model's own input frame with its default margin (the family's `propagation_box`)."""
        family = self.engine.family
        return family.propagation_box(mask, family.DEFAULT_MARGIN)

    @property
    def score_ranks_quality(self) -> bool:
        """Was the model's quality score measured to rank masks (its family's SCORE_RANKS_QUALITY)?"""
        return bool(getattr(getattr(self.engine, "family", None), "SCORE_RANKS_QUALITY", False))

    def image(self, index: int) -> np.ndarray:
        if not 0 <= index < self.n_slices:
            raise InputError(f"slice {index} is outside the volume (0..{self.n_slices - 1} along {self.axis})")
        return self.window.apply(get_slice(self.volume, self.axis, index))

    def cache_key(self, index: int) -> tuple:
        return (self.key, self.axis, int(index), self.window.key(), self.engine.model_id)

    def is_cached(self, index: int) -> bool:
        return self.cache_key(index) in self.cache

    def embedding(self, index: int):
        key = self.cache_key(index)
        emb = self.cache.get(key)
        if emb is None:
            emb = self.engine.encode(self.image(index))
            self.encoded += 1
            self.cache.put(key, emb)
        return emb

    def prefetch(self, indices: Sequence[int]) -> None:
        """Batch-encodes the uncached slices among `indices` where batching pays (GPU: up to
        engine.max_batch per call). On a CPU (max_batch 1) it does nothing: slices are encoded
        when asked for, so growth that stops never pays for slices beyond the structure's end."""
        batch = getattr(self.engine, "max_batch", 1)
        if batch <= 1:
            return
        todo = [i for i in dict.fromkeys(indices) if 0 <= i < self.n_slices and not self.is_cached(i)][:batch]
        if not todo:
            return
        embs = self.engine.encode_batch([self.image(i) for i in todo])
        self.encoded += len(todo)
        for n, index in enumerate(todo):
            self.cache.put(self.cache_key(index), embs[n : n + 1].clone())

    def probabilities(self, index: int, boxes) -> Tuple[np.ndarray, np.ndarray]:
        """(N, H, W) foreground probabilities and (N,) quality scores for boxes on one slice."""
        return self.engine.decode(self.embedding(index), np.asarray(boxes, dtype=np.float64), self.slice_shape)

    def __call__(self, index: int, box) -> Tuple[np.ndarray, float]:
        prob, score = self.probabilities(index, [box])
        if self.keep_probabilities:
            self.kept.setdefault(index, []).append(prob[0])  # a slice may be prompted more than once
        return prob[0] > 0.5, float(score[0])
