"""The accuracy evaluation: its score-ranking summary (the evidence a model needs before its quality
score may choose windows or stop growth, SCORE_RANKS_QUALITY), its goal lines, and evaluating
your own volume and labels."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from accuracy_eval import score_ranking, summarise  # noqa: E402


def sweep_of(*slices):
    """One structure whose slices each list (window, score, Dice)."""
    return {"lung": {"pairs": {str(k): pairs for k, pairs in enumerate(slices)}}}


def test_counts_slices_whose_top_scored_window_has_the_best_dice():
    right = [("a", 0.9, 0.95), ("b", 0.7, 0.80), ("c", 0.5, 0.60)]  # score order = Dice order
    wrong = [("a", 0.9, 0.50), ("b", 0.7, 0.80), ("c", 0.5, 0.90)]  # reversed
    tied = [("a", 0.9, 0.895), ("b", 0.8, 0.90), ("c", 0.1, 0.20)]  # top window 0.005 short: a tie
    line = score_ranking(sweep_of(right, wrong, tied))
    assert "best 2D Dice (within 0.01) on 2 of 3 slices" in line
    assert "median 0.50" in line  # per-slice Spearman 1.0, -1.0 and 0.5


def test_a_model_without_scores_gives_no_ranking():
    assert score_ranking(sweep_of([("a", None, 0.9), ("b", None, 0.8)])) is None


def test_structures_made_of_pieces_are_left_out():
    sweep = sweep_of([("a", 0.9, 0.95), ("b", 0.7, 0.80)])
    sweep["ribs"] = {"pairs": {"0": [("a", 0.9, 0.10), ("b", 0.7, 0.30)]}}
    assert "on 1 of 1 slices" in score_ranking(sweep, skip={"ribs"})


def row(name, ends, dice2d_median, dataset="ctchest", kinds=("free", "free")):
    return {"structure": name, "dataset": dataset, "ends_a": list(ends), "dice2d_median": dice2d_median,
            "dice2d_mean": 0.5, "notes": {"pieces": False, "ends": dict(zip(("low", "high"), kinds))},
            "dice_a": 0.8, "dice_b": 0.8, "dice_c": 0.8, "dice_base": 0.8}


def test_the_end_goal_counts_free_ends_of_organs_segmented_well_on_their_median_slice():
    rows = [row("lung", (-4, 0), 0.92, kinds=("free", "edge")),  # one free end, 4 short
            row("kidney", (1, -1), 0.88),  # both within one slice
            row("pancreas", (2, 5), 0.43),  # a poor 2D Dice: not counted
            row("tumour", (0, 9), 0.95, dataset="tumours")]  # tumours have their own goal
    lines = summarise(rows)
    assert lines[0].startswith("mode a, free ends of organs with median-slice 2D Dice >= 0.85: 2/3 within +-1")
    assert "worst overshoot 1 slices" in lines[0]
    assert lines[1].startswith("mode a, tumour ends: 1/2 within +-2 slices, worst overshoot 9")


# ---------------------------------------------------------------------------------------------
# your own files: the same evaluation on any volume and its labels (real LiteMedSAM weights)

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "medsam-slicer", "test-data", "accuracy-eval")


def cropped_label_map(ct_path, masks, values, path):
    """The masks as one integer label map on the CT's grid, cropped to the labels' extent (so the
    evaluation must place it by physical position), written as NIfTI (RAS on disk, unlike the NRRD)."""
    import SimpleITK as sitk

    ct = sitk.ReadImage(ct_path)
    labels = np.zeros(sitk.GetArrayFromImage(ct).shape, np.uint8)
    for name, value in values.items():
        labels[masks[name]] = value
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    k, j, i = np.nonzero(labels)
    lo, hi = [int(i.min()), int(j.min()), int(k.min())], [int(i.max()), int(j.max()), int(k.max())]
    sitk.WriteImage(sitk.RegionOfInterest(image, [b - a + 1 for a, b in zip(lo, hi)], lo), path)


def test_a_label_handed_over_inside_a_slice_counts_as_abutting_and_organ_ends_stay_free(expert_masks):
    from accuracy_eval import structure_notes

    notes = {name: structure_notes(name, truth, expert_masks)["ends"] for name, truth in expert_masks.items()}
    # the cervical column's lowest slice holds 5 px; the thoracic label has already taken over there
    assert notes["cervical vertebral column"] == {"low": "abuts thoracic vertebral column", "high": "edge"}
    assert notes["thoracic vertebral column"] == {"low": "abuts lumbar vertebral column",
                                                  "high": "abuts cervical vertebral column"}
    # the lungs end above the liver, which is not labelled: free, so the end goal judges them
    assert notes["right lung"]["low"] == notes["left lung"]["low"] == "free"


def test_own_volume_and_label_map_give_the_built_in_case_numbers(tmp_path, ct_path, expert_masks):
    from accuracy_eval import main

    labels = str(tmp_path / "labels.nii.gz")
    cropped_label_map(ct_path, expert_masks, {"left lung": 3, "right lung": 7}, labels)
    common = ["--structures", "left lung", "--cache-dir", CACHE]  # the default window: as segment picks it
    mine, builtin = tmp_path / "mine.json", tmp_path / "builtin.json"
    assert main(["--volume", ct_path, "--labels", labels, "--label-names", "3=left lung,7=right lung",
                 "--tumours", "left lung", "--json", str(mine)] + common) == 0
    assert main(["--data", "ctchest", "--json", str(builtin)] + common) == 0
    (row,), (expected,) = (json.load(open(f))["rows"] for f in (mine, builtin))
    for key in ("slices", "dice2d_median", "dice_a", "ends_a", "dice_b", "dice_c", "dice_base"):
        assert row[key] == expected[key], key
    assert row["dice_a"] > 0.9 and row["dice2d_median"] > 0.85  # a real evaluation, not an empty one
    # the model's own pick for the lung (window_choice), not the volume's one window (ct-abdomen)
    assert json.load(open(mine))["window"] == "model" and row["window"] == expected["window"] == "1000/-500"
    assert row["dataset"] == "tumours" and expected["dataset"] == "ctchest"
    assert any(line.startswith("mode a, tumour ends: ") for line in json.load(open(mine))["summary"])


def test_own_files_with_a_wrong_label_name_stop_with_one_line(tmp_path, ct_path, expert_masks, capsys):
    from accuracy_eval import main

    labels = str(tmp_path / "labels.nii.gz")
    cropped_label_map(ct_path, expert_masks, {"left lung": 3}, labels)
    for extra, message in ((["--label-names", "9=liver"], "has no label value 9"),
                           (["--label-names", "liver"], "is not VALUE=NAME"),
                           (["--tumours", "liver"], "--tumours names no structure")):
        with pytest.raises(SystemExit) as stop:
            main(["--volume", ct_path, "--labels", labels] + extra)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err)
