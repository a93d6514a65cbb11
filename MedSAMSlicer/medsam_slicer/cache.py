"""A thread-safe LRU cache of image embeddings, bounded by bytes."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Optional

DEFAULT_BUDGET_MB = {"cpu": 1024, "mps": 1024, "cuda": 4096}


def default_budget_bytes(device: str) -> int:
    return DEFAULT_BUDGET_MB.get(device.split(":")[0], 1024) * 1024 * 1024


def _nbytes(value) -> int:
    size = getattr(value, "nbytes", None)
    if size is None:  # torch tensor
        size = value.element_size() * value.nelement()
    return int(size)


class EmbeddingCache:
    """Keys are tuples such as (volume key, axis, slice, window key, model id)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._items: "OrderedDict[Hashable, object]" = OrderedDict()
        self._sizes = {}
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[object]:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value) -> None:
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
