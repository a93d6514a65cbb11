"""`medsam-slicer demo` end to end with a random-weight checkpoint (the real weights cannot be
downloaded here): outputs on the CT's grid, an overview image, and a Dice that matches the files."""
from __future__ import annotations

import re

import numpy as np
from PIL import Image

from medsam_slicer.cli import main
from medsam_slicer.demo import dice, sample_paths
from medsam_slicer.volume_io import read_segmentation_masks, read_volume


def test_demo_writes_segmentation_overview_and_true_dice(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "demo"
    code = main(["demo", "-o", str(out), "--checkpoint", tiny_checkpoint, "--precision", "fp32", "--quiet"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    ct_path, expert_path = sample_paths()
    ct = read_volume(ct_path)
    ours = read_segmentation_masks(str(out / "right_lung.seg.nrrd"), reference=ct)["right lung"]
    expert = read_segmentation_masks(expert_path, reference=ct)["right lung"]
    assert ours.any()
    printed = float(re.search(r"Dice vs expert right lung: ([0-9.]+)", stdout).group(1))
    assert abs(printed - dice(ours, expert)) < 1e-3
    overview = Image.open(out / "right_lung_overview.png")
    assert overview.size == (5 * 128 * 3, 128 * 3)  # five axial slices, scaled 3x
    pixels = np.asarray(overview.convert("RGB"))
    assert ((pixels == (255, 40, 40)).all(axis=2)).any() and ((pixels == (0, 220, 0)).all(axis=2)).any()
    # A second run refuses to overwrite without --force.
    assert main(["demo", "-o", str(out), "--checkpoint", tiny_checkpoint, "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
