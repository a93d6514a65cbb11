"""User-facing errors: each carries a one-line message a user can act on."""
from __future__ import annotations


class MedSAMError(Exception):
    """A problem the user can fix. Front ends print the message alone, without a traceback."""


class InputError(MedSAMError):
    """Bad arguments or input data (boxes, slices, files)."""


class CheckpointError(MedSAMError):
    """A checkpoint that is missing, unreadable, or not a SAM/MedSAM state dict."""


class WeightsError(MedSAMError):
    """Downloading or verifying the published weights failed."""
