"""Test-only re-implementation of the published MedSAM 2D inference, written from the paper's
public description (3-channel resize, min-max, direct encoder call, sigmoid then one bilinear
resize). Deliberately independent of medsam_slicer's own code paths."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import resize


def reference_probabilities(sam, grey_u8: np.ndarray, box_xyxy) -> np.ndarray:
    height, width = grey_u8.shape
    rgb = np.repeat(grey_u8[:, :, None], 3, axis=-1)
    img = resize(rgb, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
    tensor = torch.tensor(img).float().permute(2, 0, 1).unsqueeze(0)
    box = np.array([box_xyxy], dtype=float) / np.array([width, height, width, height]) * 1024
    with torch.no_grad():
        embedding = sam.image_encoder(tensor)
        box_t = torch.as_tensor(box, dtype=torch.float)[:, None, :]
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_t, masks=None)
        logits, _ = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        prob = F.interpolate(torch.sigmoid(logits), size=(height, width), mode="bilinear", align_corners=False)
    return prob.squeeze().numpy()
