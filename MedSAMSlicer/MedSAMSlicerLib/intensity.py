"""The intensity window MedSAM sees: automatic by default, or the volume's display window/level, or a preset.

"auto" (AUTO, the default) is the command line's choice: on CT, with a model whose score was measured
to rank windows (LiteMedSAM), the model picks the window per structure on its seed slice
(medsam_slicer.window_choice; done by the jobs, which have the session); otherwise, and as the
window a session opens with, choose_window's automatic window (CT abdomen, MR percentiles).
"""
from __future__ import annotations

from typing import Optional, Sequence

DISPLAY = "display"
AUTO = "auto"
DEFAULT = AUTO
# (value, label) pairs for the effect's combo box, the default first.
CHOICES = (
    (AUTO, "Automatic (CT: picked by the model per structure; MR: percentiles)"),
    (DISPLAY, "Display window/level"),
    ("ct-abdomen", "CT abdomen (W 400, L 40)"),
    ("ct-lung", "CT lung (W 1500, L -600)"),
    ("ct-brain", "CT brain (W 80, L 40)"),
    ("ct-bone", "CT bone (W 1800, L 400)"),
    ("ct-mediastinum", "CT mediastinum (W 350, L 50)"),
    ("mr", "MR (0.5-99.5th percentile)"),
    ("custom", "Custom width/level"),
)


def choice_of(value) -> str:
    """A saved choice as one of CHOICES' values; empty or unknown (an older or mistyped parameter): DEFAULT."""
    value = str(value or "").strip().lower()
    return value if value in {v for v, _ in CHOICES} else DEFAULT


def display_width_level(volume_node):
    """(width, level) of the volume's current display, or None if it has no scalar display node."""
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not hasattr(display, "GetWindow"):
        return None
    width, level = float(display.GetWindow()), float(display.GetLevel())
    if not width > 0:
        return None
    return width, level


def window_for(choice: str, volume_array, display_wl: Optional[Sequence[float]] = None,
               custom: Optional[Sequence[float]] = None):
    """The medsam_slicer.windowing.IntensityWindow for a choice from CHOICES (for AUTO: the window
    before the model picks one, see jobs.SessionHolder).

    display_wl: (width, level) of the volume's display (see display_width_level), read on the main
    thread; this function may run on the worker (MR percentiles scan the volume)."""
    from medsam_slicer import windowing

    choice = (choice or DEFAULT).lower()
    if choice == DISPLAY:
        wl = display_wl
        if wl is None:
            return windowing.choose_window(volume_array, preset="auto")
        return windowing.from_width_level(wl[0], wl[1], DISPLAY)
    if choice == "custom":
        if custom is None:
            raise ValueError("custom window needs a width and a level")
        return windowing.from_width_level(float(custom[0]), float(custom[1]), "custom")
    return windowing.choose_window(volume_array, preset=choice)


def describe(window, note: Optional[str] = None) -> str:
    """"name: W .. L .." for the status line; note: how it was chosen ("picked by the model ...")."""
    width = window.high - window.low
    level = (window.high + window.low) / 2.0
    text = f"{window.name}: W {width:g} L {level:g}" + (" (zeros kept)" if window.keep_zero else "")
    return f"{text}, {note}" if note else text
