"""Start-up without torch: an engine over cached, checked exports (importing torch costs ~1.6 s of
a ~3.5 s LiteMedSAM run; OpenVINO imports in 0.4 s, ONNX Runtime in 0.2 s, on a 2-core Zen 4).

When the torch path has loaded a model with its image encoder AND its prompt encoder + mask decoder
on an exported backend (each export passed its check against torch, see `backends.py`), `record`
writes a manifest: which exports, verdicts and thread count it ran with. A later load with the same
request finds it (`plan`, the one place that decides) under a key made without loading the weights:
the weights file's SHA-256, this package's source, Python, the CPU, the versions of torch, the
runtimes and the exporter, the thread and instruction-set settings in the environment, and the
requested model, device, precision and backend. `plan` then re-reads every verdict: each must still
say passed and be no older than the export it judged, each export must be the file recorded (size,
modification time), and an `auto` choice must still name this backend. Anything missing, changed
or unreadable: no manifest, and the torch path runs (it re-checks what it must and records again).
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional

from .backends import ISA_CAP_ENV, source_digest  # torch-free: backends imports torch only where it runs it

FORMAT = "1"
_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS") + ISA_CAP_ENV + ("CUDA_VISIBLE_DEVICES", "MEDSAM_SLICER_BACKEND_CACHE")
_LIBRARIES = ("torch", "onnxruntime", "openvino", "onnx", "onnxscript")


@dataclass
class Request:
    """What `MedSAMEngine.from_checkpoint` was asked for. sha256: the weights file's digest when the
    caller has already computed it (checking the file against its pin), else None (hashed for the key)."""

    checkpoint: str
    model: Optional[str]
    device: str
    precision: str
    backend: str
    sha256: Optional[str] = None

    def possible(self) -> bool:
        """Only an exported backend on the CPU can run without torch ("auto" may resolve to one)."""
        device = (self.device or "auto").lower()
        return ((self.backend or "").lower() in ("auto", "onnx", "openvino") and device in ("auto", "cpu")
                and not (device == "auto" and _gpu_visible()))


def _gpu_visible() -> bool:
    """Could torch's device "auto" pick a GPU? (NVIDIA or ROCm device files, or a Mac's MPS.)"""
    return sys.platform == "darwin" or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")


def manifest_path(request: Request) -> str:
    """Where the manifest for this request lives; its key is everything the exports' keys hold."""
    from .backends import cache_root, cpu_key
    from .engine import resolve_precision
    from .weights import sha256_file

    precision = (request.precision or "auto").lower()
    parts = [FORMAT, request.sha256 or sha256_file(request.checkpoint), source_digest(), sys.version.split()[0], cpu_key(),
             str(os.cpu_count()), str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "")]
    parts += [f"{lib}={_version(lib)}" for lib in _LIBRARIES] + [f"{k}={os.environ.get(k, '')}" for k in _ENV]
    parts += [str(request.model or "").lower(), (request.device or "auto").lower(), precision,
              resolve_precision(precision, "cpu"), request.backend.lower()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]
    return os.path.join(cache_root(), f"fast-start-{key}.json")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _stamp(path: str):
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _verdict(part: Dict) -> Optional[Dict]:
    """The verdict of an export that is the file recorded, if it passed and is no older than it."""
    from .backends import _no_older, _read_json

    try:
        if _stamp(part["model"]) != part["stamp"] or not _no_older(part["verdict"], part["model"]):
            return None
    except (OSError, KeyError, TypeError):
        return None
    verdict = _read_json(part["verdict"])
    if not isinstance(verdict, dict) or verdict.get("passed") is not True:
        return None
    return verdict if verdict.get("bytes", part["stamp"][0]) == part["stamp"][0] else None


def plan(request: Request) -> Optional[Dict]:
    """The manifest of a torch-free start for this request (each part with its verdict as "report"),
    or None when anything it needs is not cached and checked."""
    from .backends import _read_json

    if not request.possible():
        return None
    try:
        manifest = _read_json(manifest_path(request))
    except Exception:  # an unreadable weights file, a missing cache folder: the torch path says what is wrong
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    try:
        for part in (manifest["encoder"], manifest["decoder"]):
            part["report"] = _verdict(part)
            if part["report"] is None:
                return None
        if manifest.get("auto"):
            choice = _read_json(manifest["auto"])
            if not isinstance(choice, dict) or (choice.get("choice"), choice.get("precision")) != (
                    manifest["backend"], manifest["precision"]):
                return None
    except (KeyError, TypeError):
        return None
    return manifest


def load(request: Request):
    """A torch-free MedSAMEngine for the request, or None (then the caller loads with torch)."""
    manifest = plan(request)
    if manifest is None:
        return None
    from . import backends
    from .engine import MedSAMEngine, checkpoint_ident
    from .models import get_family

    name, threads, enc, dec = manifest["backend"], int(manifest["threads"]), manifest["encoder"], manifest["decoder"]
    try:
        run = backends.encoder_runner(name, enc["model"], threads, manifest["precision"])
        session = backends.decoder_session(name, dec["model"], threads)
    except Exception:  # noqa: BLE001 - a runtime that fails to load here: the torch path reports it properly
        return None
    encoder = backends.BackendEncoder(name, run, os.path.dirname(enc["model"]), enc["report"], manifest["precision"],
                                      enc["model"], enc["verdict"])
    decoder = backends.BackendDecoder(name, session, os.path.dirname(dec["model"]), dec["report"], dec["model"],
                                      dec["verdict"])
    engine = MedSAMEngine.on_exports(get_family(manifest["family"]), f"{manifest['architecture']}:"
                                     f"{checkpoint_ident(request.checkpoint)}", encoder, decoder)
    engine.architecture = manifest["architecture"]
    return engine


def record(request: Request, engine) -> None:
    """After a torch load: the manifest that lets the next load of this request skip torch, when its
    encoder and decoder both run on the same exported backend on the CPU. Best effort."""
    from .backends import _write_json

    encoder, decoder = engine._encoder, engine._backend_decoder
    auto = getattr(encoder, "auto_verdict_path", None) if request.backend.lower() == "auto" else None
    if (not request.possible() or engine.device != "cpu" or engine.backend == "torch" or decoder is None
            or getattr(decoder, "name", None) != engine.backend
            or (request.backend.lower() == "auto" and not auto)):
        return
    import torch

    try:
        manifest = {
            "format": FORMAT, "family": engine.family.NAME, "architecture": engine.architecture,
            "backend": engine.backend, "precision": encoder.precision, "threads": torch.get_num_threads(),
            "encoder": {"model": encoder.model_path, "verdict": encoder.verdict_path,
                        "stamp": _stamp(encoder.model_path)},
            "decoder": {"model": decoder.model_path, "verdict": decoder.verdict_path,
                        "stamp": _stamp(decoder.model_path)},
            "auto": auto,
        }
        _write_json(manifest_path(request), manifest)
    except OSError:
        pass  # a read-only cache only costs the next start its torch import
