"""Choosing a device and loading any registered model's weights from a file.

`read_state_dict` reads tensors safely (weights_only, on the CPU, so a GPU-saved file loads on a
CPU-only machine); `load_model` hands them to the family that recognises them (or the one named),
which builds its network (see `models/`).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

from .errors import CheckpointError, InputError

# What every front end offers for --device (resolved by resolve_device); precisions: engine.PRECISIONS.
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> str:
    """auto: CUDA, then Apple MPS, then CPU. An explicit device that is absent is an error."""
    import torch

    name = (name or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not cuda:
            raise InputError("CUDA was requested but this PyTorch sees no CUDA GPU (use --device cpu or auto)")
        return name
    if name == "mps":
        if not mps:
            raise InputError("MPS was requested but Apple's Metal backend is not available here")
        return "mps"
    raise InputError(f"unknown device '{name}': use auto, cpu, cuda or mps")


def read_state_dict(path: str) -> Dict[str, "object"]:
    """Reads tensors on the CPU, safely (weights_only), from .pth/.pt/.bin or .safetensors."""
    import torch

    label = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, not a checkpoint at all
        raise CheckpointError(_unreadable(path, exc)) from None
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"checkpoint {label} is not a state dict")
    return state


def _unreadable(path: str, exc: Exception) -> str:
    """One line on why a checkpoint could not be read. torch's safe load explains itself over many
    lines; the one case a user can fix is a file that also pickles Python objects (a training run's
    argparse.Namespace, a whole nn.Module): say which, and how to keep only the tensors."""
    label, text = os.path.basename(path), str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"checkpoint {label} holds a Python object ({found.group(1)}) besides its tensors, which a safe load "
                "refuses (unpickling it could run code from the file); if you trust the file, load it with "
                "torch.load(path, weights_only=False) and torch.save only its state dict")
    try:  # neither torch's zip nor its pickle?
        with open(path, "rb") as f:
            foreign = not path.endswith(".safetensors") and f.read(2) not in (b"PK", b"\x80\x02")
    except OSError:  # unreadable (permissions): torch's own reason, below, says so
        foreign = False
    if foreign:
        return f"checkpoint {label} is not a PyTorch or safetensors file"
    reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"checkpoint {label} cannot be read (truncated or not a PyTorch/safetensors file): {reason[:160]}"


def load_model(path: str, model: Optional[str] = None):
    """(network on the CPU, family module, architecture name) from a checkpoint file. Without
    `model` the family is recognised from the tensors; with it, a file of another family is an error."""
    from .models import family_of_state, get_family

    label = os.path.basename(path)
    state = read_state_dict(path)
    found = family_of_state(state, label)
    if model is not None:
        wanted = get_family(model)
        if wanted is not found:
            raise CheckpointError(f"checkpoint {label} holds {found.TITLE} weights, not {wanted.TITLE} (use --model {found.NAME})")
    net, arch = found.build(state, label)
    return net, found, arch
