"""Random-weight MedSAM-shaped checkpoints, built at test time with segment-anything's builder.

Random SAM logits hover around 0, so masks would be decided by noise; scaling the last layer of
the mask decoder's output hypernetworks makes the logits large and the masks stable.
"""
from __future__ import annotations

import torch
from segment_anything.build_sam import _build_sam

TINY = dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
VIT_B = dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=[2, 5, 8, 11])
HYPERNET_SCALE = 40.0


def build_random_sam(config=None, seed: int = 0):
    torch.manual_seed(seed)
    sam = _build_sam(checkpoint=None, **(config or TINY))
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(HYPERNET_SCALE)
            mlp.layers[-1].bias.mul_(HYPERNET_SCALE)
    return sam.eval()


def save_checkpoint(path, config=None, seed: int = 0) -> str:
    torch.save(build_random_sam(config, seed).state_dict(), str(path))
    return str(path)
