"""Reduced-precision image encoder (to be replaced by the optimised encoder of the speed work)."""
from __future__ import annotations


def prepare_encoder(encoder, dtype):
    """Returns a callable x -> embedding that runs `encoder` under autocast to `dtype`."""
    import torch

    def run(x):
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return encoder(x.float())

    return run
