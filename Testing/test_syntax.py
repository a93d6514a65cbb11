"""Code that Slicer loads must parse as Python 3.9 (Slicer 5.8 embeds 3.9) and the engine must not
import Slicer, Qt or VTK, nor torch at import time."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLICER_LOADED = sorted(
    p for d in ("MedSAMSlicer", "MedSAMSegmentEffect") for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts
)


@pytest.mark.parametrize("path", SLICER_LOADED, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses_as_python_39(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_engine_imports_nothing_from_slicer_or_qt():
    forbidden = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt"}
    for path in (ROOT / "MedSAMSlicer" / "medsam_slicer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_importing_engine_does_not_import_torch():
    code = (
        "import sys, medsam_slicer, medsam_slicer.slicing, medsam_slicer.windowing, medsam_slicer.session;"
        "import medsam_slicer.engine, medsam_slicer.model, medsam_slicer.predictor, medsam_slicer.models;"
        "import medsam_slicer.models.medsam, medsam_slicer.models.litemedsam;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
