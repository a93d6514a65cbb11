"""Hidden module that registers the "MedSAM" Segment Editor effect when Slicer has started."""
from __future__ import annotations

import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest


class MedSAMSegmentEffect(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "MedSAM Segment Effect"
        parent.categories = ["Segmentation"]
        # MedSAMSlicer: its folder holds MedSAMSlicerLib and the engine, and its settings choose the engine
        parent.dependencies = ["Segmentations", "MedSAMSlicer"]
        parent.contributors = ["MedSAMSlicer contributors"]
        parent.hidden = True
        parent.helpText = (
            "Registers the MedSAM effect in the Segment Editor: draw a box on a slice and MedSAM (ViT-B) "
            "segments it; propagate in 3D. Settings are in the MedSAM Slicer module."
        )
        parent.acknowledgementText = (
            "MedSAM: Ma J, He Y, Li F, Han L, You C, Wang B. Segment anything in medical images. "
            "Nature Communications 15, 654 (2024)."
        )
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        instance = effects.qSlicerSegmentEditorScriptedEffect(None)
        source = os.path.join(os.path.dirname(__file__), "MedSAMSegmentEffectLib", "SegmentEditorEffect.py")
        instance.setPythonSource(source.replace("\\", "/"))
        instance.self().register()


class MedSAMSegmentEffectTest(ScriptedLoadableModuleTest):
    """The effect is exercised end to end by MedSAMSlicer's self-test; this checks registration."""

    def runTest(self):
        self.setUp()
        self.test_effect_registered()

    def test_effect_registered(self):
        widget = slicer.qMRMLSegmentEditorWidget()
        widget.setMRMLScene(slicer.mrmlScene)
        self.assertIsNotNone(widget.effectByName("MedSAM"))
