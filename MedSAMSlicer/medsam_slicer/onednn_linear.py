"""The CPU encoders' float32 linear layers on oneDNN instead of MKL.

torch runs a float32 ``F.linear`` on MKL, and MKL takes its AVX2 kernels on AMD CPUs whatever they
have. oneDNN (torch's own library, behind its bf16 products and convolutions) picks kernels by
instruction set. Measured, (4096 x 768) @ (768 x 3072), one thread, on a 2-core AMD EPYC Zen 5
(family 26, 512-bit FMA units): MKL 86 GFLOP/s, oneDNN 172; with the libraries capped to AVX2 (as
on an AVX2-only CPU), 85 and 99. The results differ from MKL's by ~1e-6 relative (summation order).

`pack` turns a weight into oneDNN's blocked layout once, when an encoder is prepared; `linear` runs
a packed weight on oneDNN and any other on ``F.linear``, so the encoders call one function whatever
they hold. Only on AMD x86 CPUs, where it was measured: Intel's MKL is Intel's own library, and ARM
builds of oneDNN are another code base. Elsewhere, where torch has no oneDNN, or where the op
misbehaves on a first check, weights stay as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .backends import is_amd_x86

_WORKS: Optional[bool] = None


def _op_works() -> bool:
    """On an AMD x86 CPU, is oneDNN's packed linear here, and does it give F.linear's result on a
    small product?"""
    global _WORKS
    if _WORKS is None and not is_amd_x86():
        _WORKS = False
    if _WORKS is None:
        try:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(3, 5, 64, generator=generator)
            w = torch.randn(48, 64, generator=generator)
            b = torch.randn(48, generator=generator)
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
            _WORKS = bool(torch.backends.mkldnn.is_available()) and torch.allclose(got, F.linear(x, w, b),
                                                                                   rtol=1e-5, atol=1e-4)
        except (AttributeError, RuntimeError):  # no such op in this torch build
            _WORKS = False
    return _WORKS


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A float32 CPU (out, in) weight in oneDNN's layout for `linear`; any other weight unchanged."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu" or not _op_works():
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN when `weight` was packed by `pack`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
