"""Keeps the CPU encoders' large temporaries in the heap instead of fresh pages from the kernel.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it when freed; smaller blocks come from the heap, whose free top is handed back once it
passes the trim threshold. A ViT-B slice on the CPU makes tens of such temporaries (the qkv
product 38 MB, the MLP's hidden layer 50 MB, per block), so every slice faulted its memory in
anew: ~400,000 minor page faults (1.6 GB zeroed by the kernel) per encoder call, ~10% of it.
Raising both thresholds lets freed blocks be reused. `medsam-slicer segment` on 3 slices of
random ViT-B under the AVX2 cap (2-core AMD EPYC Zen 5): 1.6-2.0 million faults -> 0.54 million,
8-13% less time in each of three benchmark runs, peak memory unchanged (docs/speed.md, "Heap reuse").

Process-wide and only on glibc (Linux); set once, when the first CPU engine starts. A process
that frees a large model keeps up to TRIM_THRESHOLD of free heap mapped (reused by the next
allocations). MEDSAM_SLICER_HEAP=default leaves glibc's own settings (benchmarks compare both).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

# Blocks under this come from the heap (the encoders' largest temporaries are 50-64 MB).
MMAP_THRESHOLD = 256 << 20
# Free memory at the top of the heap kept mapped (a slice's temporaries fit in it).
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)

_lock = threading.Lock()
_done = None


def keep_large_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True where they are raised."""
    global _done
    with _lock:
        if _done is None:
            _done = _raise_thresholds()
        return _done


def _raise_thresholds() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("MEDSAM_SLICER_HEAP", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: the parameter numbers below are glibc's
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
