"""Hugging Face transformers `SamModel` weights -> segment-anything `Sam` weights.

`wanglab/medsam-vit-base` publishes MedSAM in the transformers layout (`model.safetensors`,
`pytorch_model.bin`). The tensors are the same as in `medsam_vit_b.pth`; only their names differ,
so the conversion is pure re-keying (no tensor is reshaped, transposed or copied):

| transformers `SamModel`                                   | segment-anything `Sam`                                   |
|-----------------------------------------------------------|----------------------------------------------------------|
| vision_encoder.patch_embed.projection                     | image_encoder.patch_embed.proj                           |
| vision_encoder.layers.N.layer_norm1/2                     | image_encoder.blocks.N.norm1/2                           |
| vision_encoder.layers.N.attn.{qkv,proj,rel_pos_h/w}       | image_encoder.blocks.N.attn.* (same fused q,k,v order)   |
| vision_encoder.neck.{conv1,layer_norm1,conv2,layer_norm2} | image_encoder.neck.{0,1,2,3}                             |
| shared_image_embedding.positional_embedding (tied to      | prompt_encoder.pe_layer.positional_encoding_gaussian_    |
|   prompt_encoder.shared_embedding.positional_embedding)   |   matrix                                                 |
| prompt_encoder.point_embed.K                              | prompt_encoder.point_embeddings.K                        |
| prompt_encoder.mask_embed.{conv1,layer_norm1,conv2,       | prompt_encoder.mask_downscaling.{0,1,3,4,6}              |
|   layer_norm2,conv3}                                      |                                                          |
| mask_decoder.transformer.layers.N.layer_norm1..4          | mask_decoder.transformer.layers.N.norm1..4               |
| mask_decoder.transformer.layer_norm_final_attn            | mask_decoder.transformer.norm_final_attn                 |
| mask_decoder.{upscale_conv1,upscale_layer_norm,           | mask_decoder.output_upscaling.{0,1,3}                    |
|   upscale_conv2}                                          |                                                          |
| <mlp>.proj_in / <mlp>.layers.J / <mlp>.proj_out           | <mlp>.layers.0 / <mlp>.layers.J+1 / <mlp>.layers.last    |
|   (output_hypernetworks_mlps.K, iou_prediction_head)      |                                                          |

Attention projections, MLP `lin1/lin2`, `iou_token`, `mask_tokens`, `not_a_point_embed` and
`no_mask_embed` keep their names. The layout above is the one of transformers 5.x (checked against
5.24) and of the 4.x releases that the published files were written with; the only difference is that
a file may hold the tied positional embedding under either or both of its two names. `SamModel` has
no buffers in its state dict, so nothing else is dropped.

This module never imports transformers (a test-only dependency) nor torch.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

from .errors import CheckpointError

_POS_NAMES = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_SAM_POS = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# Key prefixes that only transformers' SamModel uses (segment-anything never does).
_HF_MARKERS = re.compile(
    r"^(vision_encoder\.|shared_image_embedding\.|prompt_encoder\.(shared_embedding|point_embed|mask_embed)\.|"
    r"mask_decoder\.(upscale_conv[12]|upscale_layer_norm|transformer\.layer_norm_final_attn)\.)"
)

_WB = r"(weight|bias)"
_NECK = {"conv1": "0", "layer_norm1": "1", "conv2": "2", "layer_norm2": "3"}
_MASK_EMBED = {"conv1": "0", "layer_norm1": "1", "conv2": "3", "layer_norm2": "4", "conv3": "6"}
_UPSCALE = {"upscale_conv1": "0", "upscale_layer_norm": "1", "upscale_conv2": "3"}

# (pattern over the whole HF key, function of the match giving the SAM key). MLP heads and the
# positional embedding are handled separately (their SAM names depend on other keys).
_Rule = Tuple["re.Pattern[str]", Callable[["re.Match[str]"], str]]
_RULES: List[_Rule] = [
    (re.compile(r"vision_encoder\.pos_embed"), lambda m: "image_encoder.pos_embed"),
    (re.compile(rf"vision_encoder\.patch_embed\.projection\.{_WB}"), lambda m: f"image_encoder.patch_embed.proj.{m[1]}"),
    (
        re.compile(rf"vision_encoder\.layers\.(\d+)\.layer_norm([12])\.{_WB}"),
        lambda m: f"image_encoder.blocks.{m[1]}.norm{m[2]}.{m[3]}",
    ),
    (
        re.compile(r"vision_encoder\.layers\.(\d+)\.attn\.(rel_pos_h|rel_pos_w)"),
        lambda m: f"image_encoder.blocks.{m[1]}.attn.{m[2]}",
    ),
    (
        re.compile(rf"vision_encoder\.layers\.(\d+)\.attn\.(qkv|proj)\.{_WB}"),
        lambda m: f"image_encoder.blocks.{m[1]}.attn.{m[2]}.{m[3]}",
    ),
    (
        re.compile(rf"vision_encoder\.layers\.(\d+)\.mlp\.(lin1|lin2)\.{_WB}"),
        lambda m: f"image_encoder.blocks.{m[1]}.mlp.{m[2]}.{m[3]}",
    ),
    (re.compile(r"vision_encoder\.neck\.(conv1|conv2)\.weight"), lambda m: f"image_encoder.neck.{_NECK[m[1]]}.weight"),
    (
        re.compile(rf"vision_encoder\.neck\.(layer_norm1|layer_norm2)\.{_WB}"),
        lambda m: f"image_encoder.neck.{_NECK[m[1]]}.{m[2]}",
    ),
    (re.compile(r"prompt_encoder\.point_embed\.(\d+)\.weight"), lambda m: f"prompt_encoder.point_embeddings.{m[1]}.weight"),
    (re.compile(r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight"), lambda m: m[0]),
    (
        re.compile(rf"prompt_encoder\.mask_embed\.(conv[123]|layer_norm[12])\.{_WB}"),
        lambda m: f"prompt_encoder.mask_downscaling.{_MASK_EMBED[m[1]]}.{m[2]}",
    ),
    (re.compile(r"mask_decoder\.(iou_token|mask_tokens)\.weight"), lambda m: m[0]),
    (
        re.compile(
            rf"mask_decoder\.transformer\.(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
            rf"|final_attn_token_to_image)\.(q_proj|k_proj|v_proj|out_proj)\.{_WB}"
        ),
        lambda m: m[0],
    ),
    (
        re.compile(rf"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm([1-4])\.{_WB}"),
        lambda m: f"mask_decoder.transformer.layers.{m[1]}.norm{m[2]}.{m[3]}",
    ),
    (re.compile(rf"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin1|lin2)\.{_WB}"), lambda m: m[0]),
    (
        re.compile(rf"mask_decoder\.transformer\.layer_norm_final_attn\.{_WB}"),
        lambda m: f"mask_decoder.transformer.norm_final_attn.{m[1]}",
    ),
    (
        re.compile(rf"mask_decoder\.(upscale_conv1|upscale_layer_norm|upscale_conv2)\.{_WB}"),
        lambda m: f"mask_decoder.output_upscaling.{_UPSCALE[m[1]]}.{m[2]}",
    ),
]
_MLP = re.compile(rf"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|proj_out|layers\.(\d+))\.{_WB}")

_VISION_LAYER = ("layer_norm1.weight", "layer_norm1.bias", "attn.rel_pos_h", "attn.rel_pos_w", "attn.qkv.weight",
                 "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "layer_norm2.weight", "layer_norm2.bias",
                 "mlp.lin1.weight", "mlp.lin1.bias", "mlp.lin2.weight", "mlp.lin2.bias")
_ATTN = tuple(f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias"))
_DECODER_LAYER = tuple(
    [f"{a}.{t}" for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token") for t in _ATTN]
    + [f"layer_norm{i}.{w}" for i in range(1, 5) for w in ("weight", "bias")]
    + [f"mlp.{lin}.{w}" for lin in ("lin1", "lin2") for w in ("weight", "bias")]
)
_SINGLETONS = (
    ["vision_encoder.pos_embed", "vision_encoder.patch_embed.projection.weight",
     "vision_encoder.patch_embed.projection.bias", "vision_encoder.neck.conv1.weight",
     "vision_encoder.neck.conv2.weight"]
    + [f"vision_encoder.neck.layer_norm{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    + [f"prompt_encoder.point_embed.{i}.weight" for i in range(4)]
    + ["prompt_encoder.not_a_point_embed.weight", "prompt_encoder.no_mask_embed.weight"]
    + [f"prompt_encoder.mask_embed.{m}.{w}" for m in _MASK_EMBED for w in ("weight", "bias")]
    + ["mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"]
    + [f"mask_decoder.transformer.final_attn_token_to_image.{t}" for t in _ATTN]
    + [f"mask_decoder.transformer.layer_norm_final_attn.{w}" for w in ("weight", "bias")]
    + [f"mask_decoder.{u}.{w}" for u in _UPSCALE for w in ("weight", "bias")]
    + [f"mask_decoder.iou_prediction_head.{p}.{w}" for p in ("proj_in", "proj_out") for w in ("weight", "bias")]
)


def looks_like_hf(state: Dict[str, object]) -> bool:
    """True when the state dict uses transformers' `SamModel` names (even if some tensors are missing)."""
    return any(isinstance(k, str) and _HF_MARKERS.match(k) for k in state)


def _indices(state: Dict[str, object], pattern: str) -> List[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def _missing(state: Dict[str, object]) -> List[str]:
    """HF names that a complete SamModel state dict must have but this one lacks."""
    required = list(_SINGLETONS)
    vision = _indices(state, r"vision_encoder\.layers\.(\d+)\.")
    required += [f"vision_encoder.layers.{i}.{s}" for i in range(max(vision, default=-1) + 1) for s in _VISION_LAYER]
    if not vision:
        required.append(f"vision_encoder.layers.0.{_VISION_LAYER[0]}")
    decoder = _indices(state, r"mask_decoder\.transformer\.layers\.(\d+)\.")
    required += [
        f"mask_decoder.transformer.layers.{i}.{s}" for i in range(max(decoder, default=-1) + 1) for s in _DECODER_LAYER
    ]
    if not decoder:
        required.append(f"mask_decoder.transformer.layers.0.{_DECODER_LAYER[0]}")
    tokens = state.get("mask_decoder.mask_tokens.weight")
    n_masks = int(tokens.shape[0]) if hasattr(tokens, "shape") else 4
    hypernets = _indices(state, r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.")
    for i in range(max([n_masks - 1] + hypernets) + 1):
        required += [f"mask_decoder.output_hypernetworks_mlps.{i}.{p}.{w}" for p in ("proj_in", "proj_out")
                     for w in ("weight", "bias")]
    for head in ["mask_decoder.iou_prediction_head"] + [f"mask_decoder.output_hypernetworks_mlps.{i}" for i in hypernets]:
        hidden = _indices(state, re.escape(head) + r"\.layers\.(\d+)\.")
        required += [f"{head}.layers.{j}.{w}" for j in range(max(hidden, default=-1) + 1) for w in ("weight", "bias")]
    missing = [k for k in required if k not in state]
    if not any(name in state for name in _POS_NAMES):
        missing.append(_POS_NAMES[0])
    return missing


def convert_hf_to_sam(state: Dict[str, object], label: Optional[str] = None) -> Dict[str, object]:
    """Re-keys a transformers `SamModel` state dict to segment-anything's `Sam` names.

    The tensors themselves are passed through unchanged; `label` (the file's name) goes into error
    messages. Raises CheckpointError (one line) when a key is not part of the SamModel layout, a tensor
    is missing, or the two copies of the tied positional embedding disagree.
    """
    where = f"checkpoint {label} (Hugging Face SamModel layout)" if label else "Hugging Face SamModel checkpoint"
    unknown: List[str] = []
    out: Dict[str, object] = {}
    mlp_keys: Dict[str, List[Tuple[str, "re.Match[str]"]]] = {}
    for key, tensor in state.items():
        if key in _POS_NAMES:
            continue
        mlp = _MLP.fullmatch(key)
        if mlp:
            mlp_keys.setdefault(mlp[1], []).append((key, mlp))
            continue
        for rx, to_sam in _RULES:
            m = rx.fullmatch(key)
            if m:
                out[to_sam(m)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{where} has {len(unknown)} tensor(s) that SAM does not have (e.g. {unknown[0]}); it is not a SAM/MedSAM model"
        )
    missing = _missing(state)
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) (e.g. {missing[0]}): the file is incomplete")

    # An MLP of depth d: proj_in -> layers.0, hidden layers.j -> layers.j+1, proj_out -> layers.d-1.
    for head, items in mlp_keys.items():
        hidden = {int(m[3]) for _, m in items if m[3] is not None}
        last = len(hidden) + 1
        for key, m in items:
            index = 0 if m[2] == "proj_in" else last if m[2] == "proj_out" else int(m[3]) + 1
            out[f"{head}.layers.{index}.{m[4]}"] = state[key]

    present = [state[name] for name in _POS_NAMES if name in state]
    if len(present) == 2 and not _same_tensor(present[0], present[1]):
        raise CheckpointError(
            f"{where}: {_POS_NAMES[0]} and {_POS_NAMES[1]} differ, but SAM shares one positional embedding"
        )
    out[_SAM_POS] = present[0]
    return out


def _same_tensor(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return tuple(a.shape) == tuple(b.shape) and bool((a == b).all())  # type: ignore[attr-defined]
    except Exception:
        return False
