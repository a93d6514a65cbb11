"""Loading MedSAM (SAM-format or Hugging Face transformers-format weights) and choosing a device.

The architecture is read from the state dict's tensor shapes, never from the file name, so
MedSAM ViT-B, SAM ViT-L/H and the small random models the tests build all load the same way.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

from .errors import CheckpointError, InputError

# (embed dim, depth, heads, global-attention blocks) of segment-anything's named builders.
NAMED_ARCHITECTURES = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
_PATCH = "image_encoder.patch_embed.proj.weight"
_GLOBAL_REL_POS = 2 * (1024 // 16) - 1  # a global block's relative-position table at 1024 input


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


def resolve_device(name: str = "auto") -> str:
    """auto: CUDA, then Apple MPS, then CPU. An explicit device that is absent is an error."""
    import torch

    name = (name or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not cuda:
            raise InputError("CUDA was requested but this PyTorch sees no CUDA GPU (use --device cpu or auto)")
        return name
    if name == "mps":
        if not mps:
            raise InputError("MPS was requested but Apple's Metal backend is not available here")
        return "mps"
    raise InputError(f"unknown device '{name}': use auto, cpu, cuda or mps")


def read_state_dict(path: str) -> Dict[str, "object"]:
    """Reads tensors on the CPU, safely (weights_only), from .pth/.pt/.bin or .safetensors."""
    import torch

    label = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, not a checkpoint at all
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {label} cannot be read (truncated or not a PyTorch/safetensors file): {reason[:160]}") from None
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"checkpoint {label} is not a state dict")
    return state


def to_sam_layout(state: Dict[str, "object"], label: str) -> Dict[str, "object"]:
    """Accepts SAM-format keys as they are and maps transformers `SamModel` keys to them."""
    state = {re.sub(r"^(module\.|model\.)", "", k): v for k, v in state.items()}
    if _PATCH in state:
        return state
    from .hf_weights import convert_hf_to_sam, looks_like_hf

    if looks_like_hf(state):
        return convert_hf_to_sam(state, label)
    raise CheckpointError(f"checkpoint {label} is not a SAM/MedSAM state dict (no {_PATCH})")


def detect_architecture(state: Dict[str, "object"], label: str = "checkpoint") -> Architecture:
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
    from segment_anything.build_sam import _build_sam

    return _build_sam(
        encoder_embed_dim=arch.embed_dim,
        encoder_depth=arch.depth,
        encoder_num_heads=arch.num_heads,
        encoder_global_attn_indexes=list(arch.global_attn_indexes),
        checkpoint=None,
    )


def load_sam(path: str):
    """Builds segment-anything's Sam from a checkpoint file; returns (sam on CPU, Architecture)."""
    label = os.path.basename(path)
    state = to_sam_layout(read_state_dict(path), label)
    arch = detect_architecture(state, label)
    sam = build_sam(arch)
    expected = sam.state_dict()
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
        raise CheckpointError(f"checkpoint {label} does not fit SAM {arch.name}: " + "; ".join(problems))
    sam.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    sam.eval()
    return sam, arch
