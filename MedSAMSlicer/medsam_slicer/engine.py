"""MedSAMEngine: a registered model (see `models/`) with its 2D inference, encode and decode kept apart.

Splitting encode (seconds on a CPU) from decode (milliseconds) lets callers cache image embeddings
and re-prompt a slice with the decoder alone. What differs between models (input size, resize,
padding, box scaling, post-processing, the encoder's fast path) comes from the model's family
module; the prompt encoder and mask decoder are SAM's (models/sam_net.py) for every family.
"""
from __future__ import annotations

import threading
from typing import Optional, Sequence, Tuple

import numpy as np

from .backends import cpu_has_fast_bf16
from .model import load_model, resolve_device

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
BACKEND_ENV = "MEDSAM_SLICER_BACKEND"  # the encoder backend engines loaded by name use (default torch)


def resolve_precision(precision: str, device: str) -> str:
    """auto: bf16 on CUDA and on CPUs with native bf16 matrix units, fp16 on MPS, else fp32. int8 is
    opt-in and runs on an exported CPU backend (see `backends.py`)."""
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


class MedSAMEngine:
    """Runs a MedSAM-family model on single slices. Thread-safe: one lock serialises encoder calls and another
    decoder calls (they use disjoint modules), so a re-prompt need not wait for a background encode.

    fast: run the image encoder through `fast_encoder` (SDPA attention, private weights in the
    compute dtype; exact within 1e-6 in fp32) and the mask decoder through `fast_decoder` (fp32,
    exact to rounding). False keeps the network's own modules as published
    (reduced precisions then run it under autocast). compile: torch.compile the fast encoder (GPU).
    family: the model's family module or registry name (default: ViT-B MedSAM, the `sam` the
    tests build); it is part of `model_id`, hence of every embedding cache key.
    backend: the image encoder's engine on the CPU, "torch" (default), "onnx", "openvino" or "auto"
    (see `backends.py`: exported at first use, checked against torch, cached on disk; auto chooses
    by a cached calibration). A backend other than torch computes in fp32, in int8 with
    precision="int8" (which needs one: its torch path is the fp32 reference it is checked against),
    or in bf16 on OpenVINO where the precision is bf16 and the CPU has bf16 units; it adds itself
    and its precision to `model_id`.

    `from_checkpoint` starts without torch when the request's exports and verdicts are all cached
    (see `fast_start.py`): `sam` is then None and encoder and decoder run on the backend, numpy in
    and out.
    """

    torch_free = False

    def __init__(self, sam, device: str = "cpu", precision: str = "fp32", model_id: str = "medsam",
                 fast: bool = True, compile: bool = False, family="medsam", backend: str = "torch"):
        import torch

        self._init_state(family, device, resolve_precision(precision, device), model_id)
        self.sam = sam.to(device).eval()
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.fast = bool(fast)
        self._encoder = self.sam.image_encoder
        if self.fast:
            self._encoder = self.family.prepare_encoder(self.sam, self._dtype, device, compile=compile)
            from .fast_decoder import FastBoxDecoder

            self._fast_decoder = FastBoxDecoder(self.sam.prompt_encoder, self.sam.mask_decoder)
        elif self.precision != "fp32":
            encoder, dtype = self.sam.image_encoder, self._dtype

            def autocast_encoder(x):
                with torch.autocast(device_type=x.device.type, dtype=dtype):
                    return encoder(x.float())

            self._encoder = autocast_encoder
        from .backends import check_backend

        backend = check_backend(backend)
        if self.precision == "int8" and backend == "torch":
            from .backends import BackendError

            raise BackendError("precision int8 runs on an exported backend: use --backend onnx, openvino or auto")
        if backend != "torch":
            self._use_backend(backend, precision)

    def _init_state(self, family, device: str, precision: str, model_id: str) -> None:
        """What every engine has, whether its networks run on torch or (torch-free) on a backend."""
        from .models import get_family

        self.family = get_family(family) if isinstance(family, str) else family
        if device == "cpu":
            from .heap import keep_large_blocks

            keep_large_blocks()  # the encoders' temporaries reuse the heap, not fresh pages (heap.py)
        self.device = device
        self.precision = precision
        self.model_id = f"{self.family.NAME}/{model_id}:{self.precision}"
        self._lock = threading.RLock()
        self._decode_lock = threading.RLock()
        # Slices per encoder call: batching pays on GPUs; on a CPU it only multiplies peak memory.
        self.max_batch = 1 if device == "cpu" else 8
        self.backend = "torch"
        self._backend_decoder = None  # prompt encoder + mask decoder on the backend (re-prompts), if it passed
        self._fast_decoder = None  # fast_decoder.FastBoxDecoder over the torch network's decoder

    @classmethod
    def on_exports(cls, family, model_id: str, encoder, decoder) -> "MedSAMEngine":
        """A torch-free engine over a checked backend encoder and decoder (see `fast_start.py`)."""
        engine = cls.__new__(cls)
        engine._init_state(family, "cpu", encoder.precision, model_id)
        engine.model_id = f"{engine.model_id}:{encoder.name}"
        engine.sam, engine._dtype, engine.fast, engine.torch_free = None, None, True, True
        engine._encoder, engine._backend_decoder, engine.backend = encoder, decoder, encoder.name
        return engine

    def _use_backend(self, name: str, requested_precision: str) -> None:
        import torch

        from . import backends

        int8 = self.precision == "int8"
        explicit = (requested_precision or "auto").lower() != "auto"
        if self.device != "cpu" or not self.fast:
            if name == "auto" and not int8:
                return
            raise backends.BackendError(f"backend {name} runs the image encoder on the CPU: use --device cpu or --backend torch")
        # What the backend computes in: int8 as asked; bf16 where the torch path is bf16 and the backend
        # can (OpenVINO on a CPU with bf16 units); else fp32, refused if another precision was asked for.
        if int8 or (self.precision == "bf16" and backends.available(name, "bf16")):
            target = self.precision
        elif name == "auto" and self.precision == "bf16":
            target = "bf16"  # choose(): each backend competes in bf16 where it can, else fp32
        elif self.precision == "fp32" or not explicit:
            target = "fp32"
        else:
            raise backends.BackendError(f"backend {name} computes in fp32 or int8 (openvino also bf16 on CPUs with "
                                        "bf16 units): use --precision fp32, int8 or auto")
        reference = self._encoder
        if self.precision not in ("fp32", "int8"):
            reference = self.family.prepare_encoder(self.sam, torch.float32, self.device)
        if name == "auto":
            name, encoder = backends.choose(self.sam, self.family, self._encoder, reference, self.decode,
                                            tag=self.precision, precision=target)
            if name == "torch":  # the encoder stays on torch, and so does the decoder: fast_decoder
                return  # re-prompts as fast as the exported ones (28 vs 27-30 ms, ONNX Runtime, Zen 5)
        else:
            encoder = backends.prepare(name, self.sam, self.family, reference, self.decode, precision=target)
        self._encoder, self.backend, self.precision = encoder, name, encoder.precision
        self._dtype = torch.float32  # a backend takes and returns fp32 arrays
        base = self.model_id.rsplit(":", 1)[0]
        self.model_id = f"{base}:{encoder.precision}:{name}"
        self._backend_decoder = self._backend_decoder_on(name)

    def _free_network_encoder(self) -> None:
        """Frees the network's own image encoder where the fast encoder or a backend runs from a copy
        of its own (ViT-B: 360 MB in float32). Only for a network the engine loaded itself
        (`from_checkpoint`), after every check that reads it: a caller's network stays theirs. Its
        parameters stay, on the meta device (shapes, no memory)."""
        if self.sam is not None and self.fast and self._encoder is not self.sam.image_encoder:
            self.sam.image_encoder.to("meta")

    def _backend_decoder_on(self, name: str):
        """The prompt encoder + mask decoder on backend `name` if it is installed, exports and passes
        its check, else None (the torch decoder stays). A backend encoder needs it for the torch-free
        start (`fast_start.py`); its re-prompts take about what `fast_decoder`'s do."""
        from . import backends

        if not backends.available(name):
            return None
        try:
            return backends.prepare_decoder(name, self.sam, self.family)
        except (backends.BackendError, ImportError, OSError, RuntimeError):
            return None  # an optional part: a broken runtime keeps the torch decoder

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", precision: str = "auto",
                        model: Optional[str] = None, backend: Optional[str] = None,
                        sha256: Optional[str] = None) -> "MedSAMEngine":
        """Loads a weights file; its family is recognised from the tensors unless `model` names it.
        backend None: $MEDSAM_SLICER_BACKEND if set, else torch (auto for precision int8). sha256: the
        file's digest when the caller has just checked it (the fast start's key then does not hash the
        file again); None: hashed here if a fast start could apply."""
        import os

        from . import fast_start

        backend = backend or os.environ.get(BACKEND_ENV, "").strip() or (
            "auto" if str(precision).lower() == "int8" else "torch")
        request = fast_start.Request(path, model, device, precision, backend, sha256)
        engine = fast_start.load(request)  # None unless every export and verdict it needs is cached
        if engine is None:
            net, family, arch = load_model(path, model)
            engine = cls(net, resolve_device(device), precision, model_id=f"{arch}:{checkpoint_ident(path)}",
                         family=family, backend=backend)
            engine.architecture = arch
            fast_start.record(request, engine)
            engine._free_network_encoder()
        engine.checkpoint = path
        return engine

    @classmethod
    def load(cls, model: Optional[str] = None, checkpoint: Optional[str] = None, device: str = "auto",
             precision: str = "auto", download: bool = True, progress: bool = False,
             progress_callback=None, backend: Optional[str] = None) -> "MedSAMEngine":
        """The engine for a registered model: `checkpoint` if given (its family recognised when
        `model` is None), else that model's own weights (DEFAULT_MODEL when both are None), found
        or downloaded and verified by its family."""
        from .models import get_family

        sha256 = None
        if checkpoint is None or not str(checkpoint).strip():
            family = get_family(model)
            checkpoint = family.ensure_weights(None, download=download, progress=progress,
                                               progress_callback=progress_callback)
            model = family.NAME
            sha256 = verified_sha256(family, checkpoint)
        else:
            from .weights import ensure_weights

            checkpoint = ensure_weights(checkpoint)  # a one-line error for a missing file
        return cls.from_checkpoint(checkpoint, device=device, precision=precision, model=model, backend=backend,
                                   sha256=sha256)

    @property
    def input_size(self) -> int:
        return int(self.family.INPUT_SIZE)

    def default_margin(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """The family's default propagation margin in pixels of a slice of this size, (x, y)."""
        return self.family.margin_pixels(self.family.DEFAULT_MARGIN, size)

    def encode(self, image: np.ndarray):
        """uint8 slice (H, W) or (H, W, 3) -> image embedding (1, 256, 64, 64), float32 on device."""
        return self.encode_batch([image])[0:1]

    def encode_batch(self, images: Sequence[np.ndarray], interrupt=None):
        """Encodes several slices (N, 256, 64, 64), `max_batch` slices per encoder call.

        interrupt: optional callable checked between transformer blocks by the fast encoder; when it
        returns True the call raises `fast_encoder.EncodeInterrupted` and releases the model.
        """
        batch = np.concatenate([self.family.model_input(img) for img in images], axis=0)  # outside the lock
        if self.torch_free:  # the backend encoder: numpy in and out, the interrupt checked per slice
            with self._lock:
                return self._encoder(batch, interrupt=interrupt)
        import torch

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
        The embedding may be a torch tensor or (torch-free engines, the disk cache) a numpy array.
        """
        height, width = size
        boxes_model = self.family.boxes_to_model(boxes, height, width)
        with self._decode_lock:
            if self._backend_decoder is not None:
                logits, iou = self._backend_decoder(embedding, boxes_model)
            else:
                logits, iou = self._torch_decode(embedding, boxes_model)
        prob = self.family.postprocess(logits, (height, width))
        return prob, np.asarray(iou[:, 0], dtype=np.float32)

    def _torch_decode(self, embedding, boxes_model):
        """SAM's prompt encoder and mask decoder on torch: low-res logits (N, 1, h, w) and IoU (N, 1), numpy.
        With `fast`, through `fast_decoder` (the same maths, about 1.6 times as fast on a CPU)."""
        if self._fast_decoder is not None:
            return self._fast_decoder(embedding, boxes_model)
        import torch

        with torch.inference_mode():
            box_t = torch.as_tensor(boxes_model, dtype=torch.float, device=self.device)[:, None, :]
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=box_t, masks=None)
            logits, iou = self.sam.mask_decoder(
                image_embeddings=torch.as_tensor(embedding).to(self.device, torch.float32),
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            return logits.float().cpu().numpy(), iou.float().cpu().numpy()

    def segment(self, image: np.ndarray, boxes, embedding=None) -> Tuple[np.ndarray, np.ndarray]:
        """Convenience: probabilities and scores for boxes on one uint8 slice."""
        if embedding is None:
            embedding = self.encode(image)
        return self.decode(embedding, boxes, image.shape[:2])


def verified_sha256(family, path: str) -> Optional[str]:
    """The SHA-256 a model's own weights file was just checked against by `family.ensure_weights(None)`
    (every family verifies what it returns: the family's pin, else the pin for the file's name, else the
    digest recorded at its download, as weights.verify; a mismatch raised there). Equal to the file's
    digest, so the fast start's key reuses it instead of hashing the file a second time (~30 ms for
    LiteMedSAM). None when no digest is known (then the key hashes the file)."""
    from . import weights

    try:
        return (getattr(family, "SHA256", None) or weights.pinned_sha256(path)
                or weights.recorded_sha256(path))
    except Exception:  # noqa: BLE001 - an unreadable record: the key hashes the file itself
        return None


def checkpoint_ident(path: str) -> str:
    """A short id of a weights file (path, size, modification time) for `model_id`, hence cache keys."""
    import hashlib
    import os

    stat = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
