"""Rewrites the file lists in MedSAMSlicer/CMakeLists.txt and MedSAMSegmentEffect/CMakeLists.txt from
the files on disk: every .py under a module folder (except Testing/ and __pycache__/) goes in SCRIPTS,
every file under Resources/ (and data files of the engine package) in RESOURCES.

    python tools/sync_cmake_lists.py          # rewrite
    python tools/sync_cmake_lists.py --check  # exit 1 when a list is out of date
"""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("MedSAMSlicer", "MedSAMSegmentEffect")
SKIP_DIRS = {"Testing", "__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")
BEGIN = {"scripts": "set(MODULE_PYTHON_SCRIPTS", "resources": "set(MODULE_PYTHON_RESOURCES"}


def module_files(module: str):
    """(scripts, resources): paths relative to the module folder, '/'-separated, sorted."""
    base = os.path.join(ROOT, module)
    scripts, resources = [], []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(SKIP_SUFFIXES)
                             and not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, base)
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(SKIP_SUFFIXES) or name == "CMakeLists.txt":
                continue
            rel = name if rel_dir == "." else os.path.join(rel_dir, name).replace(os.sep, "/")
            if name.endswith(".py"):
                scripts.append(rel)
            elif rel.startswith("Resources/") or rel.startswith("medsam_slicer/"):
                resources.append(rel)
    main = module + ".py"
    scripts.sort(key=lambda p: (p != main, p))
    return scripts, sorted(resources)


def _block(header: str, items) -> str:
    lines = [header] + ["  " + item for item in items] + ["  )"]
    return "\n".join(lines)


def render(module: str, text: str) -> str:
    scripts, resources = module_files(module)
    for key, items in (("scripts", scripts), ("resources", resources)):
        # Literal file names (no ${MODULE_NAME}) so a plain search finds every listed file.
        pattern = re.compile(re.escape(BEGIN[key]) + r"\n(?:[^)]*\n)?\s*\)", re.MULTILINE)
        if not pattern.search(text):
            raise SystemExit(f"{module}/CMakeLists.txt: no '{BEGIN[key]} ... )' block")
        text = pattern.sub(lambda m: _block(BEGIN[key], items), text, count=1)
    return text


def main(argv) -> int:
    check = "--check" in argv
    stale = []
    for module in MODULES:
        path = os.path.join(ROOT, module, "CMakeLists.txt")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render(module, text)
        if new != text:
            stale.append(path)
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    if check and stale:
        print("out of date: " + ", ".join(stale))
        return 1
    for path in stale:
        print("updated " + path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
