"""heap.py: after `keep_large_blocks`, a freed encoder-sized temporary is reused, not faulted in again.

Each check runs in a fresh interpreter: the thresholds are process-wide, and the test process has
already started engines.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(HERE, "..", "MedSAMSlicer")

# Allocates a 48 MB block (about ViT-B's MLP hidden layer), writes it, frees it, and counts the minor
# page faults of doing so again: a block served by a fresh mapping faults in every page.
PROBE = r"""
import ctypes, resource, sys
sys.path[:0] = sys.argv[1:3]
from medsam_slicer.heap import keep_large_blocks

if sys.argv[3] == "engine":  # a CPU engine starting raises them (a tiny random SAM)
    def keep_large_blocks():
        from medsam_slicer import heap
        from medsam_slicer.engine import MedSAMEngine
        from model_factory import build_random_sam

        MedSAMEngine(build_random_sam(), device="cpu")
        return heap._done

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 48 << 20

def faults_of_one_block():  # malloc, as torch's CPU allocator (numpy would ask for huge pages)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_one_block()
default = faults_of_one_block()
raised = keep_large_blocks()
faults_of_one_block()  # the first block after the change may still grow the heap
print(raised, default, faults_of_one_block())
"""


def probe(env_extra=None, how="call"):
    env = {k: v for k, v in os.environ.items() if k != "MEDSAM_SLICER_HEAP"}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE, PACKAGE, HERE, how], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's thresholds: Linux only")
@pytest.mark.parametrize("how", ["call", "engine"])
def test_a_freed_large_block_is_reused_without_page_faults(how):
    if not probe()[0]:
        pytest.skip("this C library has no mallopt (not glibc)")
    raised, default, after = probe(how=how)
    assert raised
    pages = (48 << 20) // 4096
    assert default > pages // 2  # glibc's own thresholds: a fresh mapping, every page faulted in
    assert after < pages // 20  # heap reuse: (almost) none


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's thresholds: Linux only")
def test_the_environment_keeps_glibcs_own_thresholds():
    raised, default, after = probe({"MEDSAM_SLICER_HEAP": "default"})
    assert not raised
    assert after > (48 << 20) // 4096 // 2
