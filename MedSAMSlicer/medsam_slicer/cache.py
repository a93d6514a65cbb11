"""A thread-safe LRU cache of image embeddings, bounded by bytes, with an optional disk layer.

The disk layer keeps embeddings across runs and Slicer sessions: keys hold the volume's content
hash, axis, slice, window and model, so a file can never be served for other data. It is off
unless a folder is given (`disk_dir`, or the MEDSAM_SLICER_DISK_CACHE environment variable).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Hashable, Optional

DISK_ENV = "MEDSAM_SLICER_DISK_CACHE"
DEFAULT_DISK_BUDGET_MB = 8192

DEFAULT_BUDGET_MB = {"cpu": 1024, "mps": 1024, "cuda": 4096}


def default_budget_bytes(device: str) -> int:
    return DEFAULT_BUDGET_MB.get(device.split(":")[0], 1024) * 1024 * 1024


def own_copy(batch, n: int):
    """Embedding n of a batch as its own array (numpy from torch-free engines, else a torch tensor),
    so a cached slice does not keep the whole batch alive."""
    part = batch[n : n + 1]
    return part.copy() if hasattr(part, "__array_interface__") else part.clone()


def _nbytes(value) -> int:
    size = getattr(value, "nbytes", None)
    if size is None:  # torch tensor
        size = value.element_size() * value.nelement()
    return int(size)


class EmbeddingCache:
    """Keys are tuples such as (volume key, axis, slice, window key, model id)."""

    def __init__(self, budget_bytes: int, disk_dir: Optional[str] = None,
                 disk_budget_bytes: int = DEFAULT_DISK_BUDGET_MB * 1024 * 1024):
        self.budget_bytes = int(budget_bytes)
        self.disk = DiskLayer(disk_dir, disk_budget_bytes) if disk_dir else None
        self._items: "OrderedDict[Hashable, object]" = OrderedDict()
        self._sizes = {}
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[object]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return value
        value = self.disk.load(key) if self.disk is not None else None
        with self._lock:
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
        self._remember(key, value)
        return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            if key in self._items:
                return True
        return self.disk is not None and self.disk.has(key)

    def put(self, key: Hashable, value) -> None:
        self._remember(key, value)
        if self.disk is not None:
            self.disk.save(key, value)

    def _remember(self, key: Hashable, value) -> None:
        size = _nbytes(value)
        with self._lock:
            if key in self._items:
                self.used_bytes -= self._sizes.pop(key)
                del self._items[key]
            if size > self.budget_bytes:
                return
            self._items[key] = value
            self._sizes[key] = size
            self.used_bytes += size
            while self.used_bytes > self.budget_bytes:
                old, _ = self._items.popitem(last=False)
                self.used_bytes -= self._sizes.pop(old)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.used_bytes = 0


def default_cache(device: str, disk_dir: Optional[str] = None) -> EmbeddingCache:
    """The cache front ends use: the device's memory budget, plus the disk layer when a folder is
    given here or in MEDSAM_SLICER_DISK_CACHE."""
    return EmbeddingCache(default_budget_bytes(device), disk_dir=disk_dir or os.environ.get(DISK_ENV) or None)


class DiskLayer:
    """One float32 .npy file per embedding; the oldest files go when the folder exceeds its budget."""

    def __init__(self, folder: str, budget_bytes: int):
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.budget_bytes = int(budget_bytes)
        os.makedirs(self.folder, exist_ok=True)

    def path(self, key: Hashable) -> str:
        return os.path.join(self.folder, hashlib.sha1(repr(key).encode()).hexdigest() + ".npy")

    def has(self, key: Hashable) -> bool:
        return os.path.isfile(self.path(key))

    def load(self, key: Hashable):
        """The stored embedding as float32 numpy (the engine decodes numpy or torch), or None."""
        import numpy as np

        path = self.path(key)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # absent, or a file cut short by a crash: recompute it
            return None
        os.utime(path)  # recently used files are evicted last
        return array

    def save(self, key: Hashable, value) -> None:
        import numpy as np

        path = self.path(key)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                array = value if isinstance(value, np.ndarray) else value.detach().float().cpu().numpy()
                np.save(f, np.asarray(array, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)  # readers never see a half-written file
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
            return  # a full or read-only disk only costs recomputation
        self._evict()

    def _evict(self) -> None:
        entries = []
        for name in os.listdir(self.folder):
            if name.endswith(".npy"):
                full = os.path.join(self.folder, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, full))
        total = sum(size for _, size, _ in entries)
        for _, size, full in sorted(entries):
            if total <= self.budget_bytes:
                break
            try:
                os.remove(full)
                total -= size
            except OSError:
                pass
