"""`medsam-slicer batch`: manifest checks, the local runner, resume, the CSV report, Ray, clinical outputs.

Plumbing runs the tiny random checkpoint; one end-to-end test runs the real LiteMedSAM weights on one
slice of a DICOM series and writes a DICOM SEG.
"""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medsam_slicer import batch
from medsam_slicer.cli import main
from medsam_slicer.predictor import SlicePredictor
from medsam_slicer.volume_io import read_segmentation_masks, read_volume
from medsam_slicer.windowing import choose_window

BOX17 = [20, 30, 17, 60, 95, 17]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_manifest(path, cases):
    path.write_text("\n".join(c if isinstance(c, str) else json.dumps(c) for c in cases) + "\n")
    return path


def read_report(path):
    with open(path, newline="") as f:
        return {int(row["line"]): row for row in csv.DictReader(f)}


@pytest.fixture()
def workdir(tmp_path, ct_path):
    """ct/a.nrrd, ct/b.nrrd (copies of the CT sample) and ct/broken.nrrd (a readable header, truncated data)."""
    (tmp_path / "ct").mkdir()
    for name in ("a.nrrd", "b.nrrd"):
        shutil.copy(ct_path, tmp_path / "ct" / name)
    broken = tmp_path / "ct" / "broken.nrrd"
    sitk.WriteImage(sitk.ReadImage(ct_path), str(broken), False)  # raw data after the header
    broken.write_bytes(broken.read_bytes()[:-200_000])
    return tmp_path


def three_cases_and_a_broken_one(root):
    return write_manifest(root / "cases.jsonl", [
        {"input": "ct/a.nrrd", "output": "out/a.seg.nrrd", "segments": [{"name": "lung", "box": BOX17}]},
        "# a comment line, then a blank one",
        "",
        {"input": "ct/b.nrrd", "output": "out/b.nii.gz", "preset": "ct-lung",
         "segments": [{"name": "grown", "box": [56, 38, 20, 104, 96, 20], "propagate": True, "direction": "up",
                       "max_slices": 1},
                      {"name": "keys", "key_boxes": [[60, 40, 5, 100, 90, 5], [62, 42, 6, 98, 88, 6]]}]},
        {"input": "ct/broken.nrrd", "output": "out/broken.seg.nrrd", "segments": [{"box": BOX17}]},
        {"input": "ct/a.nrrd", "output": "out/a_roi.seg.nrrd", "window": [400, 40],
         "segments": [{"name": "roi", "box": [20, 30, 10, 60, 95, 11]}]},
    ])


def test_bad_manifest_lines_are_all_reported_before_any_model_loads(capsys, workdir, monkeypatch):
    def no_model(self):
        raise AssertionError("the model must not load for a bad manifest")

    monkeypatch.setattr(batch.EngineSpec, "load", no_model)
    seg = [{"box": BOX17}]
    manifest = write_manifest(workdir / "bad.jsonl", [
        {"input": "ct/a.nrrd", "output": "o1.seg.nrrd", "segments": seg},                       # 1 fine
        '{"input": "ct/a.nrrd", "output": ',                                                     # 2
        {"input": "ct/a.nrrd", "output": "o3.seg.nrrd", "segments": seg, "colour": 1},           # 3
        {"input": "ct/missing.nrrd", "output": "o4.seg.nrrd", "segments": seg},                  # 4
        {"input": "ct/a.nrrd", "output": "o5.seg.nrrd", "segments": [{"box": [0, 0, 0, 200, 5, 0]}]},  # 5
        {"input": "ct/a.nrrd", "output": "o1.seg.nrrd", "segments": seg},                        # 6 duplicate
        {"input": "ct/a.nrrd", "output": "o7.dcm", "segments": seg},                             # 7 not DICOM
        {"input": "ct/a.nrrd", "output": "o8.seg.nrrd", "segments": [{"box": [20, 30, 3, 60, 95, 9],
                                                                      "propagate": True}]},       # 8
        {"input": "ct/a.nrrd", "output": "o9.txt", "segments": seg},                             # 9
        {"input": "ct/a.nrrd", "output": "o10.seg.nrrd", "window": [400, 40], "preset": "mr", "segments": seg},
        {"input": "ct/a.nrrd", "output": "o11.seg.nrrd", "segments": [{"key_boxes": [BOX17]}]},  # 11
        {"input": "ct/a.nrrd", "output": "o12.seg.nrrd", "segments": []},                        # 12
        {"input": "ct/a.nrrd", "output": "o13.seg.nrrd", "protect": "ct/none.seg.nrrd",
         "segments": [{"box": BOX17, "propagate": True}]},                                        # 13
        {"input": "ct/a.nrrd", "output": "o14.seg.nrrd", "protect": "ct/a.nrrd", "segments": seg},  # 14
    ])
    code, out, err = run(capsys, "batch", manifest, "--quiet")
    assert code == 2, err
    lines = err.strip().splitlines()
    expected = {2: "not valid JSON", 3: "unknown key 'colour'", 4: "input not found", 5: "outside the image",
                6: "also the output of line 1", 7: "needs a DICOM series", 8: "'propagate' needs a box flat",
                9: "output format", 10: "not both", 11: "at least two slices", 12: "non-empty list",
                13: "protect file not found", 14: "needs a segment with \"propagate\""}
    assert len(lines) == len(expected)
    for line, (number, reason) in zip(lines, sorted(expected.items())):
        assert line.startswith("medsam-slicer: error: ") and f"bad.jsonl line {number}: " in line and reason in line
    assert not any(p.name.startswith("o") for p in workdir.iterdir())


def test_local_batch_resume_and_report(capsys, workdir, tiny_checkpoint, tiny_engine, ct_array, monkeypatch):
    loads = []
    real_load = batch.EngineSpec.load
    monkeypatch.setattr(batch.EngineSpec, "load", lambda self: loads.append(1) or real_load(self))
    manifest = three_cases_and_a_broken_one(workdir)
    report = workdir / "report.csv"
    argv = ["batch", manifest, "--checkpoint", tiny_checkpoint, "--precision", "fp32", "--report", report]
    code, out, err = run(capsys, *argv)
    assert code == 1, err
    assert loads == [1], "one resident model for the whole batch"
    assert "3 done, 0 skipped, 1 failed" in out and "model loaded 1 time(s)" in out
    rows = read_report(report)
    assert [rows[n]["status"] for n in sorted(rows)] == ["done", "done", "failed", "done"]
    assert rows[1]["input"] == "ct/a.nrrd" and rows[1]["slices"] == "lung: 1"
    assert rows[4]["slices"].startswith("grown: ") and "keys: " in rows[4]["slices"]
    assert "grown: " in rows[4]["stop_reasons"] and "up " in rows[4]["stop_reasons"]
    assert rows[5]["attempts"] == "2" and "broken.nrrd" in rows[5]["error"]
    assert "line 5: ct/broken.nrrd: failed" in err
    assert not (workdir / "out" / "broken.seg.nrrd").exists()
    assert sorted(os.listdir(workdir / "out")) == ["a.seg.nrrd", "a_roi.seg.nrrd", "b.nii.gz"]  # no scratch left

    # Same answer as the engine (and as `segment`) for the flat box.
    masks = read_segmentation_masks(str(workdir / "out" / "a.seg.nrrd"), reference=read_volume(str(workdir / "ct" / "a.nrrd")))
    expected, _ = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array), "k")(17, (20, 30, 60, 95))
    np.testing.assert_array_equal(masks["lung"][17], expected)
    assert not np.delete(masks["lung"], 17, axis=0).any()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(workdir / "out" / "b.nii.gz")))
    grown = set(np.flatnonzero((labels == 1).any(axis=(1, 2))))
    assert 20 in grown and grown <= {20, 21}

    # Resume: finished cases are skipped (files untouched), the broken one is tried again.
    before = {name: os.stat(workdir / "out" / name).st_mtime_ns for name in os.listdir(workdir / "out")}
    code, out, err = run(capsys, *argv, "--quiet")
    assert code == 1 and "0 done, 3 skipped, 1 failed" in out
    assert before == {name: os.stat(workdir / "out" / name).st_mtime_ns for name in os.listdir(workdir / "out")}
    assert [r["status"] for _, r in sorted(read_report(report).items())] == ["skipped", "skipped", "failed", "skipped"]

    # Fixed input: only that case runs, and the batch succeeds.
    shutil.copy(workdir / "ct" / "a.nrrd", workdir / "ct" / "broken.nrrd")
    code, out, err = run(capsys, *argv, "--quiet")
    assert code == 0 and "1 done, 3 skipped, 0 failed" in out
    # --force redoes a case whose output exists.
    one = write_manifest(workdir / "one.jsonl", [{"input": "ct/a.nrrd", "output": "out/a.seg.nrrd",
                                                  "segments": [{"name": "lung", "box": BOX17}]}])
    code, out, _ = run(capsys, "batch", one, "--checkpoint", tiny_checkpoint, "--precision", "fp32", "--quiet", "--force")
    assert code == 0 and "1 done, 0 skipped, 0 failed" in out
    assert os.stat(workdir / "out" / "a.seg.nrrd").st_mtime_ns != before["a.seg.nrrd"]


def test_a_protect_file_ends_growth_where_its_segments_begin(capsys, workdir, tiny_checkpoint):
    volume = read_volume(str(workdir / "ct" / "a.nrrd"))
    labels = np.zeros(volume.shape_kji, np.uint8)
    labels[21:] = 1  # everything above the seed slice, as neighbours contoured before
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(volume.to_sitk())
    sitk.WriteImage(image, str(workdir / "ct" / "neighbours.nii.gz"))
    grown = {"name": "grown", "box": [56, 38, 20, 104, 96, 20], "propagate": True, "direction": "up", "max_slices": 3}
    manifest = write_manifest(workdir / "protect.jsonl", [
        {"input": "ct/a.nrrd", "output": "out/free.seg.nrrd", "segments": [grown]},
        {"input": "ct/a.nrrd", "output": "out/kept.seg.nrrd", "protect": "ct/neighbours.nii.gz", "segments": [grown]}])
    report = workdir / "report.csv"
    code, out, err = run(capsys, "batch", manifest, "--checkpoint", tiny_checkpoint, "--precision", "fp32",
                         "--quiet", "--report", report)
    assert code == 0, err
    rows = read_report(report)
    slices = {name: set(np.flatnonzero(next(iter(read_segmentation_masks(str(workdir / "out" / name)).values()))
                                       .any(axis=(1, 2)))) for name in ("free.seg.nrrd", "kept.seg.nrrd")}
    assert 21 in slices["free.seg.nrrd"], rows[1]["stop_reasons"]  # without it, growth goes on
    assert slices["kept.seg.nrrd"] == {20}
    assert "ran into the protected area at slice 21" in rows[2]["stop_reasons"]


def test_local_worker_processes(capsys, workdir, tiny_checkpoint):
    manifest = write_manifest(workdir / "two.jsonl", [
        {"input": "ct/a.nrrd", "output": "out/a.seg.nrrd", "segments": [{"name": "lung", "box": BOX17}]},
        {"input": "ct/b.nrrd", "output": "out/b.seg.nrrd", "segments": [{"name": "lung", "box": BOX17}]},
    ])
    code, out, err = run(capsys, "batch", manifest, "--checkpoint", tiny_checkpoint, "--precision", "fp32",
                         "--workers", "2", "--quiet")
    assert code == 0, err
    assert "2 done" in out and "model loaded 2 time(s)" in out
    a = read_segmentation_masks(str(workdir / "out" / "a.seg.nrrd"))["lung"]
    b = read_segmentation_masks(str(workdir / "out" / "b.seg.nrrd"))["lung"]
    assert a[17].any()
    np.testing.assert_array_equal(a, b)


def test_ray_batch_reports_the_bad_case_and_writes_the_rest(capsys, workdir, tiny_checkpoint):
    ray = pytest.importorskip("ray")
    manifest = three_cases_and_a_broken_one(workdir)
    report = workdir / "report.csv"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, out, err = run(capsys, "batch", manifest, "--ray", "--workers", "2", "--checkpoint", tiny_checkpoint,
                             "--precision", "fp32", "--report", report, "--quiet")
        assert ray.is_initialized()  # a Ray the caller started is left running
    finally:
        ray.shutdown()
    assert code == 1, err
    assert "3 done, 0 skipped, 1 failed" in out and "model loaded 2 time(s)" in out
    rows = read_report(report)
    assert [rows[n]["status"] for n in sorted(rows)] == ["done", "done", "failed", "done"]
    assert rows[5]["attempts"] == "2" and "broken.nrrd" in rows[5]["error"]
    assert sorted(os.listdir(workdir / "out")) == ["a.seg.nrrd", "a_roi.seg.nrrd", "b.nii.gz"]
    assert read_segmentation_masks(str(workdir / "out" / "a.seg.nrrd"))["lung"][17].any()


def test_ray_missing_is_one_line(capsys, workdir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    manifest = write_manifest(workdir / "one.jsonl", [{"input": "ct/a.nrrd", "output": "a.seg.nrrd",
                                                       "segments": [{"box": BOX17}]}])
    code, _, err = run(capsys, "batch", manifest, "--ray")
    assert code == 2 and 'pip install "medsam-slicer[ray]"' in err and err.count("\n") == 1


def test_real_litemedsam_batch_to_dicom_seg_and_rtstruct(capsys, tmp_path, ct_path, expert_masks):
    """The real weights, one slice of the right lung from a DICOM series, written as SEG and RTSTRUCT."""
    pytest.importorskip("highdicom")
    from test_clinical import read_rtstruct_masks, read_seg_masks, source_by_position, write_ct_series

    from medsam_slicer.models import get_family

    try:
        get_family("litemedsam").ensure_weights(None, download=False)
    except Exception as error:  # noqa: BLE001 - no weights on this machine
        pytest.skip(f"LiteMedSAM weights unavailable: {error}")
    uids = write_ct_series(ct_path, str(tmp_path / "series"))
    from medsam_slicer.slicing import mask_bbox

    truth = expert_masks["right lung"]
    x0, y0, x1, y1 = mask_bbox(truth[20])  # the tight box a user would draw, as the demo does
    segments = [{"name": "right lung", "box": [x0, y0, 20, x1, y1, 20]}]
    manifest = write_manifest(tmp_path / "real.jsonl", [
        {"input": "series", "output": "out/lung_seg.dcm", "preset": "ct-lung", "segments": segments},
        {"input": "series", "output": "out/lung_rt.dcm", "format": "rtstruct", "preset": "ct-lung",
         "segments": segments},
    ])
    code, out, err = run(capsys, "batch", manifest, "--model", "litemedsam", "--device", "cpu", "--quiet",
                         "--report", tmp_path / "r.csv")
    assert code == 0, err
    assert "2 done" in out and "model loaded 1 time(s)" in out
    volume = read_volume(str(tmp_path / "series"))
    ds, seg = read_seg_masks(str(tmp_path / "out" / "lung_seg.dcm"), volume)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    assert ds.FrameOfReferenceUID == uids["frame"]
    _, rt, _ = read_rtstruct_masks(str(tmp_path / "out" / "lung_rt.dcm"), source_by_position(str(tmp_path / "series")),
                                   volume)
    mask = seg["right lung"]
    np.testing.assert_array_equal(rt["right lung"], mask)  # both formats hold the same voxels
    inter = np.logical_and(mask[20], truth[20]).sum()
    dice = 2 * inter / (mask[20].sum() + truth[20].sum())
    assert dice > 0.7, dice  # 0.755 measured: one 2D box on one slice, no propagation
    assert not np.delete(mask, 20, axis=0).any()


def test_ctrl_c_mid_write_leaves_no_output_and_reports_cancelled(capsys, workdir, tiny_checkpoint, monkeypatch):
    from medsam_slicer import volume_io

    def interrupted_write(path, segments, reference):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(volume_io, "_write_seg_nrrd", interrupted_write)
    manifest = write_manifest(workdir / "two.jsonl", [
        {"input": "ct/a.nrrd", "output": "out/a.seg.nrrd", "segments": [{"box": BOX17}]},
        {"input": "ct/b.nrrd", "output": "out/b.seg.nrrd", "segments": [{"box": BOX17}]},
    ])
    report = workdir / "report.csv"
    code, _, err = run(capsys, "batch", manifest, "--checkpoint", tiny_checkpoint, "--precision", "fp32", "--quiet",
                       "--report", report)
    assert code == 130 and "interrupted" in err
    assert os.listdir(workdir / "out") == []  # neither the output nor its scratch folder
    assert [r["status"] for _, r in sorted(read_report(report).items())] == ["cancelled", "cancelled"]
