"""The published MedSAM input pipeline for one uint8 slice (see docs/pipeline in README)."""
from __future__ import annotations

import numpy as np

MODEL_SIZE = 1024


def resize_to_model(image: np.ndarray) -> np.ndarray:
    """Bicubic spline resize to 1024x1024 (aspect not kept), truncated to uint8.

    A grey slice is resized once and not three times: with identical channels the result is
    bit-identical to resizing the (H, W, 3) image, at a third of the cost (tested).
    """
    from skimage.transform import resize

    shape = (MODEL_SIZE, MODEL_SIZE) + image.shape[2:]
    return resize(image, shape, order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)


def normalize(resized: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] as float32 (1, 3, 1024, 1024); no ImageNet mean/std."""
    lo, hi = resized.min(), resized.max()
    scaled = ((resized - lo) / np.clip(float(hi) - float(lo), 1e-8, None)).astype(np.float32)
    if scaled.ndim == 2:
        return np.broadcast_to(scaled, (1, 3) + scaled.shape)
    return scaled.transpose(2, 0, 1)[None]


def model_input(image: np.ndarray) -> np.ndarray:
    """uint8 slice (H, W) or (H, W, 3) -> float32 (1, 3, 1024, 1024)."""
    if image.dtype != np.uint8:
        raise TypeError(f"MedSAM takes uint8 slices after windowing, got {image.dtype}")
    return normalize(resize_to_model(image))


def boxes_to_model(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """[x0, y0, x1, y1] pixel boxes (N, 4) scaled to the 1024 frame, as the published code does."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes / np.array([width, height, width, height], dtype=np.float64) * MODEL_SIZE
