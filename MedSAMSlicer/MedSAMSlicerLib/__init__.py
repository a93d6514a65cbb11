"""Slicer-side adapters for MedSAMSlicer.

Plain functions that take MRML/VTK objects (testable with the Qt-free ``slicer-core`` wheel) plus
the engine factory and the inference worker. Nothing here imports torch or Qt at import time.
"""
from __future__ import annotations
