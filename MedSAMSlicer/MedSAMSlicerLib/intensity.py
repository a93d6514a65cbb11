"""The intensity window MedSAM sees: the volume's display window/level by default, or a preset."""
from __future__ import annotations

from typing import Optional, Sequence

DISPLAY = "display"
# (value, label) pairs for the effect's combo box.
CHOICES = (
    (DISPLAY, "Display window/level"),
    ("ct-abdomen", "CT abdomen (W 400, L 40)"),
    ("ct-lung", "CT lung (W 1500, L -600)"),
    ("ct-brain", "CT brain (W 80, L 40)"),
    ("ct-bone", "CT bone (W 1800, L 400)"),
    ("ct-mediastinum", "CT mediastinum (W 350, L 50)"),
    ("mr", "MR (0.5-99.5th percentile)"),
    ("auto", "Automatic (CT abdomen or MR)"),
    ("custom", "Custom width/level"),
)


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
    """The medsam_slicer.windowing.IntensityWindow for a choice from CHOICES.

    display_wl: (width, level) of the volume's display (see display_width_level), read on the main
    thread; this function may run on the worker (MR percentiles scan the volume)."""
    from medsam_slicer import windowing

    choice = (choice or DISPLAY).lower()
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


def describe(window) -> str:
    width = window.high - window.low
    level = (window.high + window.low) / 2.0
    return f"{window.name}: W {width:g} L {level:g}" + (" (zeros kept)" if window.keep_zero else "")
