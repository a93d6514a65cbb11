"""MedSAM engine: faithful MedSAM ViT-B inference, windowing, volume I/O and propagation.

Pure Python: nothing here imports Slicer, Qt, MRML or VTK, and torch is imported lazily
so that importing the package (as Slicer does at start-up) stays cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CheckpointError, InputError, MedSAMError, WeightsError

__all__ = ["__version__", "MedSAMError", "InputError", "CheckpointError", "WeightsError"]
