"""Packaging: every Python file and resource of each Slicer module is listed in its CMakeLists (or it
would not be installed), nothing listed is missing; extension metadata, index entry and icons."""
from __future__ import annotations

import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("MedSAMSlicer", "MedSAMSegmentEffect")


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def cmake_list(module: str, variable: str):
    """Entries of set(<variable> ...) in <module>/CMakeLists.txt with ${MODULE_NAME} substituted."""
    text = re.sub(r"#[^\n]*", "", _read(os.path.join(module, "CMakeLists.txt")))
    name = re.search(r"set\(\s*MODULE_NAME\s+(\S+?)\s*\)", text).group(1)
    match = re.search(r"set\(\s*" + variable + r"\b(.*?)\)", text, re.S)
    assert match, f"{module}/CMakeLists.txt has no set({variable} ...)"
    return name, [item.replace("${MODULE_NAME}", name) for item in match.group(1).split()]


def python_files_on_disk(module: str):
    base = os.path.join(ROOT, module)
    found = set()
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in ("Testing", "__pycache__") and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                found.add(os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/"))
    return found


@pytest.mark.parametrize("module", MODULES)
def test_every_python_file_is_listed_and_exists(module):
    name, scripts = cmake_list(module, "MODULE_PYTHON_SCRIPTS")
    assert name == module
    listed = set(scripts)
    assert len(listed) == len(scripts), "a file is listed twice"
    on_disk = python_files_on_disk(module)
    assert sorted(on_disk - listed) == [], f"not listed in {module}/CMakeLists.txt (would not be installed)"
    missing = sorted(p for p in listed if not os.path.isfile(os.path.join(ROOT, module, p)))
    assert missing == [], f"listed in {module}/CMakeLists.txt but missing"
    assert f"{module}.py" in listed


@pytest.mark.parametrize("module", MODULES)
def test_resources_listed_exist_and_build_macro(module):
    _, resources = cmake_list(module, "MODULE_PYTHON_RESOURCES")
    assert f"Resources/Icons/{module}.png" in resources
    for path in resources:
        assert os.path.isfile(os.path.join(ROOT, module, path)), path
    icons_dir = os.path.join(ROOT, module, "Resources")
    for dirpath, _, filenames in os.walk(icons_dir):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), os.path.join(ROOT, module)).replace(os.sep, "/")
            assert rel in resources, f"{rel} not listed"
    text = _read(os.path.join(module, "CMakeLists.txt"))
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1).split()
    for keyword in ("NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS"):
        assert keyword in macro
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)


def test_sync_tool_agrees():
    """tools/sync_cmake_lists.py --check: the lists are what the tool would write."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sync_cmake_lists.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_extension_metadata():
    text = _read("CMakeLists.txt")
    assert re.search(r"project\(MedSAMSlicer\)", text)
    fields = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert fields.get(key), key
    assert fields["EXTENSION_CATEGORY"] == "Segmentation"
    assert fields["EXTENSION_DEPENDS"] == "PyTorch"
    assert fields["EXTENSION_HOMEPAGE"].startswith("https://")
    assert fields["EXTENSION_ICONURL"].endswith("MedSAMSlicer.png")
    order = [text.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                     "add_subdirectory(MedSAMSlicer)", "add_subdirectory(MedSAMSegmentEffect)",
                                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)
    # the existing "MedSAM" extension's module names must not be reused
    for module in MODULES:
        assert module not in ("MedSAM", "MedSAMLite")


def test_extension_index_entry():
    entry = json.loads(_read("MedSAMSlicer.json"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"].startswith("https://github.com/")
    assert entry["build_dependencies"] == ["PyTorch"]
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["scm_revision"]


@pytest.mark.parametrize("path", ["MedSAMSlicer.png", "MedSAMSlicer/Resources/Icons/MedSAMSlicer.png",
                                  "MedSAMSegmentEffect/Resources/Icons/MedSAMSegmentEffect.png"])
def test_icons_are_128_png(path):
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(os.path.join(ROOT, path)) as img:
        assert img.format == "PNG"
        assert img.size == (128, 128)
        assert img.getextrema()[3][1] == 255  # not blank
