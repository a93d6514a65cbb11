"""MedSAMEngine: the model plus the published 2D inference, encode and decode kept apart.

Splitting encode (972 GFLOPs, seconds on a CPU) from decode (milliseconds) lets callers cache
image embeddings and re-prompt a slice with the decoder alone.
"""
from __future__ import annotations

import threading
from typing import Sequence, Tuple

import numpy as np

from .model import load_sam, resolve_device
from .preprocess import boxes_to_model, model_input

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: str) -> str:
    """auto: bf16 on CUDA and on CPUs with native bf16 matrix units, fp16 on MPS, else fp32."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        from .errors import InputError

        raise InputError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16"
    if device == "mps":
        return "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class MedSAMEngine:
    """Runs MedSAM on single slices. Thread-safe: one lock serialises encoder calls and another
    decoder calls (they use disjoint modules), so a re-prompt need not wait for a background encode.

    fast: run the image encoder through `fast_encoder` (SDPA attention, private weights in the
    compute dtype; exact within 1e-6 in fp32). False keeps segment-anything's module as published
    (reduced precisions then run it under autocast). compile: torch.compile the fast encoder (GPU).
    """

    def __init__(self, sam, device: str = "cpu", precision: str = "fp32", model_id: str = "medsam",
                 fast: bool = True, compile: bool = False):
        import torch

        self.device = device
        self.precision = resolve_precision(precision, device)
        self.model_id = f"{model_id}:{self.precision}"
        self.sam = sam.to(device).eval()
        self._dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self._lock = threading.RLock()
        self._decode_lock = threading.RLock()
        # Slices per encoder call: batching pays on GPUs; on a CPU it only multiplies peak memory.
        self.max_batch = 1 if device == "cpu" else 8
        self.fast = bool(fast)
        self._encoder = self.sam.image_encoder
        if self.fast:
            from .fast_encoder import prepare_encoder

            self._encoder = prepare_encoder(self.sam.image_encoder, self._dtype, device, compile=compile)
        elif self.precision != "fp32":
            encoder, dtype = self.sam.image_encoder, self._dtype

            def autocast_encoder(x):
                with torch.autocast(device_type=x.device.type, dtype=dtype):
                    return encoder(x.float())

            self._encoder = autocast_encoder

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", precision: str = "auto") -> "MedSAMEngine":
        import hashlib
        import os

        device = resolve_device(device)
        sam, arch = load_sam(path)
        stat = os.stat(path)
        ident = hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        engine = cls(sam, device, precision, model_id=f"{arch.name}:{ident}")
        engine.architecture = arch
        return engine

    def encode(self, image: np.ndarray):
        """uint8 slice (H, W) or (H, W, 3) -> image embedding (1, 256, 64, 64), float32 on device."""
        return self.encode_batch([image])[0:1]

    def encode_batch(self, images: Sequence[np.ndarray], interrupt=None):
        """Encodes several slices (N, 256, 64, 64), `max_batch` slices per encoder call.

        interrupt: optional callable checked between transformer blocks by the fast encoder; when it
        returns True the call raises `fast_encoder.EncodeInterrupted` and releases the model.
        """
        import torch

        batch = np.concatenate([model_input(img) for img in images], axis=0)  # outside the lock
        outs = []
        for start in range(0, len(batch), self.max_batch):
            part = np.ascontiguousarray(batch[start : start + self.max_batch])
            with self._lock, torch.inference_mode():
                x = torch.from_numpy(part).to(self.device)
                if self.fast:
                    outs.append(self._encoder(x, interrupt=interrupt))
                else:
                    outs.append(self._encoder(x).float())
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def decode(self, embedding, boxes, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
        """Boxes [x0, y0, x1, y1] (N, 4) in slice pixels over one embedding.

        Returns foreground probabilities (N, H, W) float32 and the decoder's IoU estimates (N,).
        """
        import torch
        import torch.nn.functional as F

        height, width = size
        boxes_1024 = boxes_to_model(boxes, height, width)
        with self._decode_lock, torch.inference_mode():
            box_t = torch.as_tensor(boxes_1024, dtype=torch.float, device=self.device)[:, None, :]
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=box_t, masks=None)
            logits, iou = self.sam.mask_decoder(
                image_embeddings=embedding.to(self.device, torch.float32),
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            prob = torch.sigmoid(logits)
            prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False)
            return prob[:, 0].float().cpu().numpy(), iou[:, 0].float().cpu().numpy()

    def segment(self, image: np.ndarray, boxes, embedding=None) -> Tuple[np.ndarray, np.ndarray]:
        """Convenience: probabilities and scores for boxes on one uint8 slice."""
        if embedding is None:
            embedding = self.encode(image)
        return self.decode(embedding, boxes, image.shape[:2])
