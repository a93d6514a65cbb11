"""What Slicer loads at start-up: Python 3.9 syntax everywhere, and no torch / engine import at module
level in the effect, its Lib package, the module and MedSAMSlicerLib (effects load when Slicer starts)."""
from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICER_LOADED = [
    "MedSAMSegmentEffect/MedSAMSegmentEffect.py",
    "MedSAMSegmentEffect/MedSAMSegmentEffectLib/__init__.py",
    "MedSAMSegmentEffect/MedSAMSegmentEffectLib/SegmentEditorEffect.py",
    "MedSAMSlicer/MedSAMSlicer.py",
] + sorted(
    "MedSAMSlicer/MedSAMSlicerLib/" + n for n in os.listdir(os.path.join(ROOT, "MedSAMSlicer", "MedSAMSlicerLib"))
    if n.endswith(".py")
)
HEAVY = ("torch", "torchvision", "segment_anything", "medsam_slicer", "SimpleITK", "skimage", "httpx")


def _source(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def top_level_imports(tree):
    """Modules imported when the file is executed (not inside functions or methods)."""
    found = []

    def visit(node, in_function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if not in_function:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", SLICER_LOADED)
def test_parses_as_python_39(path):
    ast.parse(_source(path), filename=path, feature_version=(3, 9))


@pytest.mark.parametrize("path", SLICER_LOADED)
def test_no_heavy_import_at_load(path):
    imports = top_level_imports(ast.parse(_source(path)))
    heavy = [m for m in imports if m.split(".")[0] in HEAVY]
    assert heavy == [], f"{path} imports {heavy} when loaded"


def test_the_detector_sees_top_level_imports():
    tree = ast.parse("import torch\nfrom medsam_slicer import engine\ndef f():\n    import torch\n")
    assert top_level_imports(tree) == ["torch", "medsam_slicer"]


def test_lib_imports_without_torch_in_a_fresh_interpreter():
    """Importing MedSAMSlicerLib (what the effect does first) leaves torch unimported."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, {!r})\n"
        "import MedSAMSlicerLib.geometry, MedSAMSlicerLib.writing, MedSAMSlicerLib.worker, "
        "MedSAMSlicerLib.engines, MedSAMSlicerLib.intensity\n"
        "bad = [m for m in ('torch', 'segment_anything', 'medsam_slicer.engine') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n".format(os.path.join(ROOT, "MedSAMSlicer"))
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_effect_registered_under_a_new_name():
    text = _source("MedSAMSegmentEffect/MedSAMSegmentEffectLib/SegmentEditorEffect.py")
    assert 'scriptedEffect.name = "MedSAM"' in text
    assert "updateSegmentBinaryLabelmapFromArray" not in text
    assert "saveStateForUndo" in text and "modifySelectedSegmentByLabelmap" in _source(
        "MedSAMSlicer/MedSAMSlicerLib/writing.py")
