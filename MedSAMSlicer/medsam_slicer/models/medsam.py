"""MedSAM ViT-B, the paper's model: SAM (segment-anything's architecture and weight names, our own
`sam_net` modules) with MedSAM's published 2D pipeline.

Input: the slice resized to 1024 x 1024 with a bicubic spline (aspect ratio NOT kept, no padding),
truncated to uint8, min-max to [0, 1], no ImageNet mean/std. Boxes are scaled by 1024 / (W, H, W,
H). Output: sigmoid of the low-res logits, then ONE bilinear resize to the slice. Weights: SAM or
transformers layout; the architecture (ViT-B/L/H, or the tests' tiny ones) is read from the tensors'
shapes, never from the file name.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from ..errors import CheckpointError, WeightsError

NAME = "medsam"
TITLE = "MedSAM ViT-B"
INPUT_SIZE = 1024
# MedSAM was trained with every box side moved outward by a random 0-20 px at 1024 scale: 10 px is
# the middle of that range (the paper's sparse-marker workflow used 5 px, the LiteMedSAM baseline
# 3 px at 256 = 12 px at 1024). Sweep with oracles in propagation.py's notes.
ENCODER_GFLOPS = 972.0  # 486 GMAC per 1024 x 1024 slice (ViT-B), for benchmarks' fraction of peak
DEFAULT_MARGIN = 10.0
# Its IoU head has not been measured against true Dice on real weights: the automatic CT window
# stays MedSAM's training window (window_choice.py) and the score-ratio stop rule is off.
SCORE_RANKS_QUALITY = False

# (embed dim, depth, heads, global-attention blocks) of segment-anything's named builders.
NAMED_ARCHITECTURES = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
_PATCH = "image_encoder.patch_embed.proj.weight"
_GLOBAL_REL_POS = 2 * (INPUT_SIZE // 16) - 1  # a global block's relative-position table at 1024 input


@dataclass(frozen=True)
class Architecture:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]

    @property
    def name(self) -> str:
        for name, spec in NAMED_ARCHITECTURES.items():
            if spec == (self.embed_dim, self.depth, self.num_heads, self.global_attn_indexes):
                return name
        return f"custom(dim={self.embed_dim},depth={self.depth},heads={self.num_heads})"


# ------------------------------------------------------------------------------------------ weights


def _strip(state: Dict[str, object]) -> Dict[str, object]:
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in state.items()}


def matches(state: Dict[str, object]) -> bool:
    from ..hf_weights import looks_like_hf

    return _PATCH in _strip(state) or looks_like_hf(_strip(state))


def to_sam_layout(state: Dict[str, object], label: str) -> Dict[str, object]:
    """Accepts SAM-format keys as they are and maps transformers `SamModel` keys to them."""
    state = _strip(state)
    if _PATCH in state:
        return state
    from ..hf_weights import convert_hf_to_sam, looks_like_hf

    if looks_like_hf(state):
        return convert_hf_to_sam(state, label)
    raise CheckpointError(f"checkpoint {label} is not a SAM/MedSAM state dict (no {_PATCH})")


def detect_architecture(state: Dict[str, object], label: str = "checkpoint") -> Architecture:
    try:
        embed_dim = int(state[_PATCH].shape[0])
        blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
        head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
        global_blocks = tuple(
            b for b in blocks if int(state[f"image_encoder.blocks.{b}.attn.rel_pos_h"].shape[0]) == _GLOBAL_REL_POS
        )
    except (KeyError, AttributeError, IndexError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {label} lacks image-encoder tensors ({exc})") from None
    if not blocks or blocks != list(range(len(blocks))) or head_dim <= 0 or embed_dim % head_dim:
        raise CheckpointError(f"checkpoint {label} has an image encoder of an unknown shape")
    return Architecture(embed_dim, len(blocks), embed_dim // head_dim, global_blocks)


def build_sam(arch: Architecture):
    """SAM with this ViT (random weights, eval mode): our `sam_net` networks, which take
    segment-anything's checkpoints as they are (the package itself is not imported: start-up)."""
    from .sam_net import build_sam_vit

    return build_sam_vit(arch.embed_dim, arch.depth, arch.num_heads, arch.global_attn_indexes, INPUT_SIZE)


def random_sam(arch: Architecture, seed: int = 0, decoder_scale: float = 40.0):
    """A seeded random-weight SAM for benchmarks and the Slicer self-test: random logits hover
    around 0, so the last layer of the mask decoder's output hypernetworks is scaled by
    `decoder_scale` and masks follow the embedding, not noise (a guard can then judge them)."""
    import torch

    torch.manual_seed(seed)  # sam_net draws in segment-anything's order: the same weights as its builder's
    sam = build_sam(arch)
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(decoder_scale)
            mlp.layers[-1].bias.mul_(decoder_scale)
    return sam.eval()


# torch.nn.init's random fills, which every nn.Linear / Conv / LayerNorm runs when it is built.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
_INIT_LOCK = threading.RLock()


@contextlib.contextmanager
def without_random_init():
    """Builds networks that a checkpoint fills whole (`load_into` is strict) without torch's random
    initialisation, which is thrown away: ~0.45 s of every ViT-B load on a 2-core CPU (LiteMedSAM
    ~0.05 s). torch.nn.init's fills are no-ops inside the block. Building on the meta device instead
    imported torch._dynamo (1.4-1.6 s) the first time. The lock keeps two loads in different threads
    from restoring each other's no-ops; other code building modules in that moment is not covered."""
    import torch

    with _INIT_LOCK:
        saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
        try:
            for name in _INIT_FUNCTIONS:
                setattr(torch.nn.init, name, _keep)
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)


def _keep(tensor, *args, **kwargs):
    return tensor


def load_into(module, state: Dict[str, object], label: str, what: str) -> None:
    """load_state_dict(strict) with a one-line error naming what is missing, extra or misshapen."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems: List[str] = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"wrong shape for {k}: {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {label} does not fit {what}: " + "; ".join(problems))
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    module.eval()


def _load(state: Dict[str, object], label: str):
    state = to_sam_layout(state, label)
    arch = detect_architecture(state, label)
    with without_random_init():
        sam = build_sam(arch)
    load_into(sam, state, label, f"SAM {arch.name}")
    return sam, arch


def build(state: Dict[str, object], label: str = "checkpoint"):
    """(SAM network (`sam_net.SamNet`) on the CPU with these weights, architecture name)."""
    sam, arch = _load(state, label)
    return sam, arch.name


def load_sam(path: str):
    """(SamNet, Architecture) from a checkpoint file."""
    from ..model import read_state_dict

    return _load(read_state_dict(path), os.path.basename(path))


def prepare_encoder(module, dtype, device, compile: bool = False):
    from ..fast_encoder import prepare_encoder as prepare

    return prepare(module.image_encoder, dtype, device, compile=compile)


def weights_help() -> str:
    from ..weights import manual_instructions

    return manual_instructions()


def ensure_weights(checkpoint=None, download: bool = True, progress: bool = False, progress_callback=None,
                   cache=None) -> str:
    """A checkpoint given, else the cached weights (verified), else a download from Hugging Face:
    model.safetensors, then pytorch_model.bin if the first is not found there. Offline, one line
    with the manual route (a failure to connect is not retried under another name)."""
    from .. import weights

    if checkpoint is not None and str(checkpoint).strip():
        return weights.ensure_weights(checkpoint)
    if weights.cached_weights(cache) is not None:
        return weights.ensure_weights(None, download_if_missing=False, cache=cache)
    if not download:
        raise WeightsError(f"no MedSAM ViT-B weights in {weights.cache_dir(cache)}; {weights.manual_instructions()}")
    folder = weights.cache_dir(cache)
    error = None
    for url, name in ((weights.DEFAULT_URL, weights.DEFAULT_FILENAME), (weights.BIN_URL, weights.BIN_FILENAME)):
        try:
            return weights.download(url, dest=os.path.join(folder, name), progress=progress,
                                    progress_callback=progress_callback)
        except WeightsError as exc:
            error = exc
            if "HTTP 404" not in str(exc):  # offline or refused: another name on that host will not help
                break
    raise error


# ----------------------------------------------------------------------------------- input / output


def resize_to_model(image: np.ndarray) -> np.ndarray:
    """Bicubic spline resize to 1024x1024 (aspect not kept), truncated to uint8.

    A grey slice is resized once and not three times: with identical channels the result is
    bit-identical to resizing the (H, W, 3) image, at a third of the cost (tested).
    """
    from skimage.transform import resize

    shape = (INPUT_SIZE, INPUT_SIZE) + image.shape[2:]
    return resize(image, shape, order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)


def normalize(resized: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] as float32 (1, 3, S, S); no ImageNet mean/std."""
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


def boxes_to_model(boxes, height: int, width: int) -> np.ndarray:
    """[x0, y0, x1, y1] pixel boxes (N, 4) scaled to the 1024 frame, as the published code does."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes / np.array([width, height, width, height], dtype=np.float64) * INPUT_SIZE


def postprocess(logits: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Sigmoid of the low-res logits (N, 1, h, w), then one bilinear resize (as torch's
    F.interpolate, align_corners False) to the slice: probabilities (N, H, W) float32."""
    from ..upsample import bilinear, sigmoid

    return bilinear(sigmoid(np.asarray(logits, dtype=np.float32)[:, 0]), size)


def margin_pixels(margin: float, size: Tuple[int, int]) -> Tuple[int, int]:
    """A margin at 1024 scale in slice pixels (x, y): each axis has its own scale (aspect is not
    kept), rounded up and at least 1 px (a box that cuts the structure loses it for good)."""
    h, w = int(size[0]), int(size[1])
    mx = max(1, int(math.ceil(float(margin) * w / INPUT_SIZE - 1e-9)))
    my = max(1, int(math.ceil(float(margin) * h / INPUT_SIZE - 1e-9)))
    return mx, my


def propagation_box(mask: np.ndarray, margin: float):
    """The box a propagated slice is prompted with, from the previous slice's mask: its bounding box
    in slice pixels grown by `margin` (1024 scale, see margin_pixels), clipped to the slice; None
    for an empty mask. (MedSAM's box scaling is continuous, so slice pixels lose nothing here.)"""
    from ..slicing import grow_box, mask_bbox

    box = mask_bbox(mask)
    return None if box is None else grow_box(box, *margin_pixels(margin, mask.shape), mask.shape)
