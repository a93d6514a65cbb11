"""The two Slicer modules as Slicer loads them, without Slicer: MedSAMSlicer.py and MedSAMSegmentEffect.py
run in a fresh interpreter with stand-ins for Qt and the Slicer application (slicer-core gives the
rest). Checks what only a Slicer session or the extension build dashboard would show: the ctest
self-test skips (not fails) without MedSAM's Python dependencies, the inference thread is stopped at
application exit, the effect module declares its dependency on MedSAMSlicer; and the effect's keys
are ones the Segment Editor and the slice views leave to effects, and are the ones documented."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MedSAMSlicer"))

pytest.importorskip("slicer")

# Qt, the application object and ScriptedLoadableModule as far as the modules use them at load time
# and in the self-test's first lines.
STUBS = textwrap.dedent('''
    import sys, types, unittest
    sys.path.insert(0, {lib!r})
    sys.modules["qt"] = types.ModuleType("qt")
    import slicer

    class App:
        def __init__(self):
            self.connections = []

        def connect(self, signal, slot):
            self.connections.append((signal, slot))

    slicer.app = App()
    slicer.mrmlScene = types.SimpleNamespace(Clear=lambda flag: None)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            print("delayDisplay:", message)

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleLogic = object
    slm.ScriptedLoadableModuleWidget = object
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    sys.modules["SampleData"] = None  # importing it fails: the self-test must skip before loading data
''')


def run_python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_self_test_skips_without_the_dependencies():
    code = STUBS.format(lib=os.path.join(ROOT, "MedSAMSlicer")) + textwrap.dedent('''
        import MedSAMSlicer
        MedSAMSlicer.MedSAMSlicerLogic.missingPackages = staticmethod(lambda mode="local": ["torch", "segment_anything"])
        # what ctest runs: slicer.testing.runUnitTest(path, "MedSAMSlicer")
        suite = unittest.TestLoader().loadTestsFromName("MedSAMSlicer")
        result = unittest.TextTestRunner(verbosity=2).run(suite)
        print("RESULT", result.testsRun, len(result.skipped), result.wasSuccessful())
        # what Reload and Test runs
        MedSAMSlicer.MedSAMSlicerTest().runTest()
        print("RUNTEST OK")
    ''')
    rc, out = run_python(code)
    assert rc == 0, out
    assert "RESULT 1 1 True" in out, out
    assert "skipped" in out and "torch" in out
    assert "RUNTEST OK" in out and "self-test skipped" in out


def test_inference_thread_stops_at_application_exit():
    code = STUBS.format(lib=os.path.join(ROOT, "MedSAMSlicer")) + textwrap.dedent('''
        import types
        import MedSAMSlicer
        from MedSAMSlicerLib import worker
        MedSAMSlicer.MedSAMSlicer(types.SimpleNamespace())
        slots = [slot for signal, slot in slicer.app.connections if signal == "aboutToQuit()"]
        assert len(slots) == 1, slicer.app.connections
        shared = worker.shared_worker()
        job = shared.submit(lambda job: job.cancel_event.wait(60))  # a long job, stopped by the slot
        while job.state != "running":
            pass
        slots[0]()
        print("ALIVE", shared.alive, job.cancelled)
    ''')
    rc, out = run_python(code)
    assert rc == 0, out
    assert "ALIVE False True" in out, out


def _module_dependencies(path):
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and node.targets[0].attr == "dependencies"):
            return ast.literal_eval(node.value)
    return None


def test_effect_module_depends_on_medsamslicer():
    # the effect imports MedSAMSlicerLib and the engine from MedSAMSlicer's folder and its settings
    deps = _module_dependencies("MedSAMSegmentEffect/MedSAMSegmentEffect.py")
    assert "MedSAMSlicer" in deps and "Segmentations" in deps
    assert "MedSAMSegmentEffect" not in _module_dependencies("MedSAMSlicer/MedSAMSlicer.py")  # no cycle


def test_effect_keys_are_free_and_documented():
    from MedSAMSlicerLib import actions

    keys = set(actions.SHORTCUTS)
    assert not keys & actions.EDITOR_KEYS, "the Segment Editor's shortcuts take these keys first"
    assert not keys & actions.VIEW_KEYS, "slice views use these keys"
    assert {"Escape", "i"} <= actions.EDITOR_KEYS
    assert set(actions.SHORTCUTS.values()) >= {"up", "down", "both", "interpolate", "cancel", "accept"}
    effect = open(os.path.join(ROOT, "MedSAMSegmentEffect", "MedSAMSegmentEffectLib", "SegmentEditorEffect.py"),
                  encoding="utf-8").read()
    help_text = re.search(r'def helpText\(self\):\s+return """(.*?)"""', effect, re.S).group(1)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    slicer_section = readme[readme.index("## Slicer extension"):]
    slicer_section = slicer_section[:slicer_section.index("\n## ", 3)]
    for key, action in actions.SHORTCUTS.items():
        if key in ("Return", "KP_Enter"):
            assert "<b>Enter</b>" in help_text and "**Enter**" in slicer_section
            continue
        assert f"<b>{key}</b>" in help_text, f"help text does not give {key} ({action})"
        bold = r"\*\*[^*]*\b" + re.escape(key) + r"\b[^*]*\*\*"
        assert re.search(bold, slicer_section), f"README lacks {key}"
    # the keys the editor takes first are not promised as the effect's
    assert "<b>Esc</b> cancels" not in help_text and "**Esc** cancels" not in slicer_section
    assert "<b>i</b>" not in help_text and "**i** (Interpolate)" not in slicer_section


# ------------------------------------------------------------------ packaging

# The catalog-entry schemas in Slicer v5.8.0's Schemas/ folder, with the properties the newest of them
# allows (v1.0.2, with "dicom_support_rule", came after 5.8).
SCHEMAS_IN_SLICER_58 = ("slicer-extension-catalog-entry-schema-v1.0.0.json", "slicer-extension-catalog-entry-schema-v1.0.1.json")
V101_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                   "build_subdirectory", "enabled", "tier"}


def test_index_entry_uses_a_schema_slicer_58_knows():
    import json

    with open(os.path.join(ROOT, "MedSAMSlicer.json"), encoding="utf-8") as f:
        entry = json.load(f)
    name = entry["$schema"].rstrip("#").rsplit("/", 1)[-1]
    assert name in SCHEMAS_IN_SLICER_58
    assert set(entry) <= V101_PROPERTIES
    assert {"$schema", "category", "scm_url"} <= set(entry)


def test_screenshots_exist_and_license_is_there():
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        text = f.read()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS\s+"([^"]*)"\)', text).group(1).split()
    prefix = "https://raw.githubusercontent.com/medsamslicer/MedSAMSlicer/main/"
    for url in urls:
        assert url.startswith(prefix), url
        assert os.path.isfile(os.path.join(ROOT, url[len(prefix):])), f"{url} names no file of the repository"
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        license_text = f.read()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


# ------------------------------------------------------------------ the effect's intensity parameter

EFFECT_STUBS = textwrap.dedent('''
    import importlib.util, sys, types
    sys.modules["qt"] = types.ModuleType("qt")
    editor_effects = types.ModuleType("SegmentEditorEffects")
    editor_effects.AbstractScriptedSegmentEditorEffect = object
    sys.modules["SegmentEditorEffects"] = editor_effects
    spec = importlib.util.spec_from_file_location("SegmentEditorEffect", {path!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Effect = module.SegmentEditorEffect

    class Scripted:
        """qSlicerSegmentEditorAbstractEffect's parameters: a default never replaces a saved value."""

        def __init__(self, saved):
            self.params = dict(saved)

        def setParameterDefault(self, name, value):
            if name not in self.params:
                self.params[name] = value

        def parameter(self, name):
            return str(self.params.get(name, ""))

        def doubleParameter(self, name):
            return float(self.params.get(name, 0.0))

    class Display:
        def GetWindow(self):
            return 350.0

        def GetLevel(self):
            return 40.0

    def effect(saved):
        self = types.SimpleNamespace(scriptedEffect=Scripted(saved))
        self.sourceVolumeNode = lambda: types.SimpleNamespace(GetDisplayNode=lambda: Display())
        Effect.setMRMLDefaults(self)
        return self
''')


def test_the_effect_defaults_to_automatic_and_keeps_a_saved_choice():
    path = os.path.join(ROOT, "MedSAMSegmentEffect", "MedSAMSegmentEffectLib", "SegmentEditorEffect.py")
    code = EFFECT_STUBS.format(path=path) + textwrap.dedent('''
        fresh = effect({})
        print("FRESH", fresh.scriptedEffect.parameter("Window"), Effect.windowSpec(fresh)[:3])
        saved = effect({"Window": "display"})  # a scene saved when the display window was the default
        print("SAVED", saved.scriptedEffect.parameter("Window"), Effect.windowSpec(saved)[:3])
        odd = effect({"Window": "no-such-window"})
        print("ODD", Effect.windowSpec(odd)[:3])
    ''')
    rc, out = run_python(code)
    assert rc == 0, out
    assert "FRESH auto ('auto', None, None)" in out, out
    assert "SAVED display ('display', (350.0, 40.0), None)" in out, out
    assert "ODD ('auto', None, None)" in out, out
