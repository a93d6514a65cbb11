# Imported when Slicer starts: keep it free of torch and of the engine (both load on first use).
from .SegmentEditorEffect import *  # noqa: F401,F403
