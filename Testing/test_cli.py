"""The medsam-slicer command line on the real CT sample: outputs, geometry and every bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medsam_slicer.cli import main
from medsam_slicer.predictor import SlicePredictor
from medsam_slicer.volume_io import read_segmentation_masks, read_volume
from medsam_slicer.windowing import choose_window


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def seg(ct_path, out, checkpoint, *extra):
    return ["segment", ct_path, "-o", out, "--checkpoint", checkpoint, "--precision", "fp32", "--quiet", *extra]


def test_single_slice_matches_engine_and_geometry(capsys, tmp_path, ct_path, ct_array, tiny_checkpoint, tiny_engine):
    out = tmp_path / "one.seg.nrrd"
    code, stdout, err = run(capsys, *seg(ct_path, out, tiny_checkpoint, "--box", 20, 30, 17, 60, 95, 17, "--name", "lung"))
    assert code == 0, err
    masks = read_segmentation_masks(str(out), reference=read_volume(ct_path))
    assert list(masks) == ["lung"]
    mask = masks["lung"]
    expected, _ = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array), "k")(17, (20, 30, 60, 95))
    assert expected.any()
    np.testing.assert_array_equal(mask[17], expected)
    assert not np.delete(mask, 17, axis=0).any()  # nothing written on other slices
    # The .seg.nrrd sits on the CT's physical grid.
    ct, labels = sitk.ReadImage(ct_path), sitk.ReadImage(str(out))
    k, j, i = np.argwhere(mask)[0]
    point = ct.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
    idx = labels.TransformPhysicalPointToIndex(point)
    assert sitk.GetArrayViewFromImage(labels)[idx[2], idx[1], idx[0]] != 0
    assert "slices 17-17" in stdout


def test_colour_png_is_segmented_as_one_slice(capsys, tmp_path, ct_array, tiny_checkpoint, tiny_engine):
    from PIL import Image

    from medsam_slicer.windowing import IntensityWindow

    grey = IntensityWindow(-160, 240).apply(ct_array[17])
    rgb = np.stack([grey, grey[::-1], np.full_like(grey, 40)], axis=-1)  # channels differ
    Image.fromarray(rgb, "RGB").save(tmp_path / "colour.png")
    out = tmp_path / "colour.nii.gz"
    code, stdout, err = run(capsys, *seg(tmp_path / "colour.png", out, tiny_checkpoint, "--box", 20, 30, 0, 60, 95, 0))
    assert code == 0, err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    expected, _ = SlicePredictor(tiny_engine, rgb[None], IntensityWindow(0, 255, False, "rgb"), "k")(0, (20, 30, 60, 95))
    assert labels.shape == (1,) + grey.shape and expected.any()
    np.testing.assert_array_equal(labels[0] == 1, expected)


def test_axis_j_box_uses_i_and_k_in_plane(capsys, tmp_path, ct_path, ct_array, tiny_checkpoint, tiny_engine):
    out = tmp_path / "coronal.nii.gz"
    code, _, err = run(capsys, *seg(ct_path, out, tiny_checkpoint, "--axis", "j", "--box", 10, 64, 5, 100, 64, 30))
    assert code == 0, err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    expected, _ = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array), "j")(64, (10, 5, 100, 30))
    np.testing.assert_array_equal(labels[:, 64, :] == 1, expected)
    assert labels[:, :64, :].max() == 0 and labels[:, 65:, :].max() == 0


def test_propagate_box3d_keys_and_probabilities(capsys, tmp_path, ct_path, tiny_checkpoint):
    out, prob = tmp_path / "multi.seg.nrrd", tmp_path / "prob.nrrd"
    code, stdout, err = run(capsys, *seg(
        ct_path, out, tiny_checkpoint,
        "--box", 56, 38, 20, 104, 96, 20, "--propagate", "--direction", "up", "--max-slices", "3",
        "--box", 20, 30, 10, 60, 95, 12,
        "--key-box", 60, 40, 5, 100, 90, 5, "--key-box", 62, 42, 8, 98, 88, 8,
        "--name", "grown", "--name", "roi", "--name", "keys", "--probabilities", prob))
    assert code == 0, err
    masks = read_segmentation_masks(str(out))
    per_slice = {name: set(np.flatnonzero(m.any(axis=(1, 2)))) for name, m in masks.items()}
    assert per_slice["grown"] <= set(range(20, 24)) and 20 in per_slice["grown"]  # up only, at most 3 more
    assert per_slice["roi"] <= {10, 11, 12}
    assert per_slice["keys"] <= set(range(5, 9)) and {5, 8} <= per_slice["keys"]
    assert "up: max slices" in stdout or "up:" in stdout
    p = sitk.GetArrayFromImage(sitk.ReadImage(str(prob)))
    assert p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    segmented = set().union(*per_slice.values())
    assert all(p[k].max() == 0 for k in range(p.shape[0]) if k not in segmented)
    union = np.logical_or.reduce(list(masks.values()))
    # each slice's probabilities come from the call that produced its mask, although mode a also
    # prompts each grown slice with a looser box and mode b with the 3D box's extent
    assert (p[union] > 0.5).all()


def test_protect_ends_growth_where_the_given_segments_begin(capsys, tmp_path, ct_path, tiny_checkpoint):
    """--protect FILE: growth ends at the first slice whose mask lies half inside FILE's segments (as
    in the Slicer effect); the slice before is kept, nothing beyond is written."""
    volume = read_volume(ct_path)
    labels = np.zeros(volume.shape_kji, np.uint8)
    labels[23:] = 1  # everything from slice 23 up, as a neighbour contoured before
    protect = tmp_path / "neighbour.nii.gz"
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(volume.to_sitk())
    sitk.WriteImage(image, str(protect))
    grow = ["--box", 56, 38, 20, 104, 96, 20, "--propagate", "--direction", "up", "--min-area", 1,
            "--max-area-ratio", 1e9, "--no-centroid-check", "--min-stability-ratio", 0, "--min-backward-ratio", 0]
    code, stdout, err = run(capsys, *seg(ct_path, tmp_path / "free.seg.nrrd", tiny_checkpoint, *grow, "--max-slices", 5))
    assert code == 0, err
    free = read_segmentation_masks(str(tmp_path / "free.seg.nrrd"))
    assert max(np.flatnonzero(next(iter(free.values())).any(axis=(1, 2)))) >= 23  # without it, growth goes on
    code, stdout, err = run(capsys, *seg(ct_path, tmp_path / "out.seg.nrrd", tiny_checkpoint, *grow, "--protect", protect))
    assert code == 0, err
    grown = next(iter(read_segmentation_masks(str(tmp_path / "out.seg.nrrd")).values()))
    assert max(np.flatnonzero(grown.any(axis=(1, 2)))) == 22
    assert "up: ran into the protected area at slice 23" in stdout


def test_a_protect_file_that_cannot_protect_is_refused_before_loading_the_model(capsys, tmp_path, ct_path):
    volume = read_volume(ct_path)
    empty = tmp_path / "empty.nii.gz"
    image = sitk.GetImageFromArray(np.zeros(volume.shape_kji, np.uint8))
    image.CopyInformation(volume.to_sitk())
    sitk.WriteImage(image, str(empty))
    grow = ["--box", 20, 30, 17, 60, 95, 17, "--propagate"]
    out = tmp_path / "out.seg.nrrd"
    for extra, message in ((grow + ["--protect", tmp_path / "missing.seg.nrrd"], "segmentation not found"),
                           (grow + ["--protect", empty], "holds no segment voxels"),
                           (["--box", 20, 30, 17, 60, 95, 17, "--protect", empty], "needs a --box with --propagate")):
        code, _, err = run(capsys, *seg(ct_path, out, tmp_path / "missing.pth", *extra))
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()


BAD = [
    (["--box", 20, 30, 17, 200, 95, 17], "outside the image"),
    (["--box", 60, 30, 17, 20, 95, 17], "inverted"),
    (["--box", -1, 30, 17, 20, 95, 17], "negative"),
    (["--box", 20, 30, 40, 60, 95, 40], "outside the image"),
    (["--box", 20, 30, 17, 60, 95, 17, "--axis", "z"], "unknown axis"),
    (["--box", 20, 30, 17, 60, 95, 17, "--window", 0, 40], "width"),
    (["--box", 20, 30, 17, 60, 95, 17, "--window", 400, "nan"], "level"),
    (["--key-box", 20, 30, 5, 60, 95, 7], "key box"),
    (["--box", 20, 30, 17, 60, 95, 17, "--name", "a", "--name", "b"], "names"),
    ([], "--box"),
]
GROW = ["--box", 20, 30, 17, 60, 95, 17, "--propagate"]
BAD += [  # stop rules that cannot mean anything (NaN would silently switch a rule off)
    (GROW + ["--min-area", -3], "min_area must not be negative"),
    (GROW + ["--min-appearance", 2], "min_appearance must be between 0 and 1"),
    (GROW + ["--min-score-ratio", -0.5], "min_score_ratio must be between 0 and 1"),
    (GROW + ["--min-stability-ratio", "nan"], "min_stability_ratio must be between 0 and 1, got nan"),
    (GROW + ["--min-backward-ratio", 1.5], "min_backward_ratio must be between 0 and 1, got 1.5"),
    (GROW + ["--min-score", "nan"], "min_score must be a number"),
    (GROW + ["--max-area-ratio", 1], "max_area_ratio must be above 1"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_boxes_and_options_are_refused_before_loading_the_model(capsys, tmp_path, ct_path, extra, message):
    out = tmp_path / "out.seg.nrrd"
    # A checkpoint that does not exist proves the arguments are checked before the model is loaded.
    code, stdout, err = run(capsys, *seg(ct_path, out, tmp_path / "missing.pth", *extra))
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_files(capsys, tmp_path, ct_path, tiny_checkpoint):
    box = ["--box", 20, 30, 17, 60, 95, 17]
    out = tmp_path / "out.seg.nrrd"
    cases = []
    cases.append((seg(tmp_path / "nope.nrrd", out, tiny_checkpoint, *box), "not found"))
    text = tmp_path / "notes.nrrd"
    text.write_text("not an image")
    cases.append((seg(text, out, tiny_checkpoint, *box), "notes.nrrd"))
    bad_ckpt = tmp_path / "bad.pth"
    bad_ckpt.write_bytes(b"\x00" * 100)
    cases.append((seg(ct_path, out, bad_ckpt, *box), "bad.pth"))
    cases.append((seg(ct_path, tmp_path / "no_dir" / "x.seg.nrrd", tiny_checkpoint, *box), "does not exist"))
    cases.append((seg(ct_path, tmp_path / "x.txt", tiny_checkpoint, *box), "output format"))
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
        assert not out.exists()
    assert list(tmp_path.iterdir()) == [] or {p.name for p in tmp_path.iterdir()} <= {"notes.nrrd", "bad.pth"}


def test_existing_output_needs_force(capsys, tmp_path, ct_path, tiny_checkpoint):
    out = tmp_path / "keep.nii.gz"
    out.write_bytes(b"precious")
    argv = seg(ct_path, out, tiny_checkpoint, "--box", 20, 30, 17, 60, 95, 17)
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--force" in err and out.read_bytes() == b"precious"
    code, _, err = run(capsys, *argv, "--force")
    assert code == 0 and out.read_bytes() != b"precious"


def test_force_never_overwrites_the_input(capsys, tmp_path, ct_path, tiny_checkpoint):
    volume = tmp_path / "ct.nrrd"
    volume.write_bytes(open(ct_path, "rb").read())
    before = volume.read_bytes()
    box = ["--box", 20, 30, 17, 60, 95, 17, "--force"]
    for argv in (seg(volume, volume, tiny_checkpoint, *box),
                 seg(volume, tmp_path / "o.seg.nrrd", tiny_checkpoint, "--probabilities", volume, *box)):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "is the input" in err and err.count("\n") == 1, err
        assert volume.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_console_script_runs_without_traceback(tmp_path, ct_path, tiny_checkpoint):
    exe = os.path.join(os.path.dirname(sys.executable), "medsam-slicer")
    proc = subprocess.run([exe, "segment", ct_path, "-o", str(tmp_path / "o.seg.nrrd"), "--box", "1", "2", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("medsam-slicer: error:")
    # A run that succeeds exits without the interpreter's teardown: its summary and file are complete.
    out = tmp_path / "ok.seg.nrrd"
    proc = subprocess.run([exe, "segment", ct_path, "-o", str(out), "--box", "20", "30", "17", "60", "95", "18",
                           "--checkpoint", str(tiny_checkpoint), "--precision", "fp32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "slices 17-18" in proc.stdout + proc.stderr
    import slicerio

    segmentation = slicerio.read_segmentation(str(out))
    assert segmentation["voxels"].shape == (128, 128, 34) and len(segmentation["segments"]) == 1
    help_text = subprocess.run([exe, "segment", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--box", "--key-box", "--propagate", "--direction", "--max-slices", "--probabilities", "--server"):
        assert flag in help_text


def test_weights_verify_says_when_it_only_records(capsys, tmp_path):
    blob = tmp_path / "medsam_vit_b.pth"
    blob.write_bytes(b"weights" * 1000)
    code, out, _ = run(capsys, "weights", "verify", blob)
    assert code == 0 and "no digest was known; recorded" in out and "OK" not in out
    code, out, _ = run(capsys, "weights", "verify", blob)
    assert code == 0 and ": OK sha256" in out
    blob.write_bytes(b"tampered" * 1000)
    code, _, err = run(capsys, "weights", "verify", blob)
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize("flag,value", [("--limit-concurrency", 0), ("--timeout-keep-alive", -1),
                                        ("--header-timeout", 0), ("--max-header-bytes", 0)])
def test_serve_connection_flags_are_checked_before_loading_the_model(capsys, tmp_path, flag, value):
    # A checkpoint that does not exist proves the flag is checked (one line, exit 2) before any loading.
    code, _, err = run(capsys, "serve", "--checkpoint", tmp_path / "missing.pth", "--port", 0, flag, value)
    assert code == 2
    assert flag in err and err.count("\n") == 1 and "Traceback" not in err


def test_stop_rule_options_reach_the_rules():
    from medsam_slicer.cli import build_parser
    from medsam_slicer.segment_command import stop_rules
    from medsam_slicer.stop_rules import StopRules

    def rules(*extra):
        return stop_rules(build_parser().parse_args(["segment", "in.nrrd", "-o", "out.seg.nrrd", "--box", "1", "1", "0", "5", "5", "0", *extra]))

    assert rules() == StopRules()
    assert rules("--min-footprint-share", "0.3").min_footprint_share == 0.3
    assert rules("--min-footprint-share", "0").min_footprint_share is None  # 0 is off: any share would carry on
    assert rules("--min-stability-ratio", "0.7").min_stability_ratio == 0.7
    assert rules("--min-backward-ratio", "0.6").min_backward_ratio == 0.6
