"""The effect's path end to end without Qt: the real CT sample read by Slicer's reader, a box dragged
on an Axial view, inference on the editor's source image through the engine provider on the
persistent worker, results written through the editor logic; propagation streamed slice by slice
under one undo, cancel keeps what is done. Random-weight tiny model: this checks plumbing and
alignment (the segment equals the engine's masks voxel for voxel), not segmentation quality."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "MedSAMSlicer"))
from MedSAMSlicerLib import engines, geometry, intensity, worker, writing  # noqa: E402
from slicer_scene import read_volume_node, register_converter_rules  # noqa: E402


@pytest.fixture()
def editor(ct_path):
    register_converter_rules()
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    volume = read_volume_node(scene, ct_path)
    display = slicer.vtkMRMLScalarVolumeDisplayNode()
    scene.AddNode(display)
    volume.SetAndObserveDisplayNodeID(display.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(400.0, 40.0)
    seg = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(seg)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg.GetSegmentation().AddEmptySegment("s", "s")
    node = slicer.vtkMRMLSegmentEditorNode()
    scene.AddNode(node)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(node)
    node.SetAndObserveSegmentationNode(seg)
    node.SetAndObserveSourceVolumeNode(volume)
    node.SetSelectedSegmentID("s")
    assert logic.UpdateAlignedSourceVolume()
    return dict(scene=scene, volume=volume, seg=seg, node=node, logic=logic, source=logic.GetAlignedSourceVolume())


@pytest.fixture()
def provider(tiny_checkpoint):
    p = engines.EngineProvider(engines.EngineSettings(checkpoint=tiny_checkpoint, device="cpu", precision="fp32"))
    return p


def wait(job, timeout=300.0):
    """Collects a job's events like the effect's QTimer does; returns (progress payloads, last event)."""
    progress, start = [], time.time()
    while True:
        for kind, payload in job.poll():
            if kind == worker.PROGRESS:
                progress.append(payload)
            else:
                return progress, (kind, payload)
        assert time.time() - start < timeout
        time.sleep(0.01)


def test_box_on_axial_view_segments_that_slice(editor, provider):
    volume, source = editor["volume"], editor["source"]
    grid = geometry.grid_of(source, geometry.image_to_world(source, editor["seg"]))
    view = editor["scene"].CreateNodeByClass("vtkMRMLSliceNode")
    editor["scene"].AddNode(view)
    view.SetOrientation("Axial")
    view.SetDimensions(600, 600, 1)
    view.SetFieldOfView(400.0, 400.0, 1.0)
    view.JumpSliceByCentering(*grid.index_to_ras([64, 64, 20])[0])
    view.UpdateMatrices()
    ras_to_xy = np.linalg.inv(geometry.matrix_to_numpy(view.GetXYToRAS()))
    xy = [(ras_to_xy @ np.r_[grid.index_to_ras(p)[0], 1])[:2] for p in ([40, 50, 20], [90, 85, 20])]
    axis, index, box = geometry.xy_box_to_ijk_box(view, np.round(xy[0]), np.round(xy[1]), grid)
    assert (axis, index, box) == ("k", 20, (40, 50, 90, 85))

    array = writing.image_to_array(source)
    wl = intensity.display_width_level(volume)
    assert wl == (400.0, 40.0)
    window = intensity.window_for("display", array, display_wl=wl)
    assert (window.low, window.high) == (-160.0, 240.0)

    def job_fn(job):
        session = provider.session(array, window)
        return session.segment_slice(axis, index, box)

    job = worker.shared_worker().submit(job_fn)
    _, (kind, payload) = wait(job)
    assert kind == worker.DONE, payload
    mask, score = payload
    assert mask.shape == array.shape[1:]
    assert mask.any()
    editor["logic"].SaveStateForUndo()
    writing.write_slices(writing.logic_modifier(editor["logic"], editor["seg"], "s"), source, {index: mask}, axis)
    result = writing.segment_array(editor["seg"], "s", source)
    expected = np.zeros_like(result)
    expected[index] = mask
    assert np.array_equal(result, expected)
    assert np.array_equal(writing.image_to_array(volume.GetImageData()), array)  # voxels untouched


def test_propagation_streams_under_one_undo_and_cancel_keeps_done(editor, provider):
    from medsam_slicer.propagation import StopRules

    source = editor["source"]
    array = writing.image_to_array(source)
    window = intensity.window_for("ct-abdomen", array)
    modify = writing.logic_modifier(editor["logic"], editor["seg"], "s")
    loose = StopRules(min_area=1, max_area_ratio=1e9, check_centroid=False, max_slices=4)

    def propagate(job, seed):
        session = provider.session(array, window)
        return session.propagate("k", seed, seed_box=(30, 30, 100, 100), direction="both", rules=loose,
                                 progress=lambda i, m, d, t: job.report((i, m)), cancel=job.cancel_event)

    editor["logic"].SaveStateForUndo()
    job = worker.shared_worker().submit(propagate, 17)
    written = {}
    start = time.time()
    final = None
    while final is None:  # what the effect's timer does: write whatever arrived, slice by slice
        batch = {}
        for kind, payload in job.poll():
            if kind == worker.PROGRESS:
                batch[payload[0]] = payload[1]
            else:
                final = (kind, payload)
        if batch:
            writing.write_slices(modify, source, batch, "k")
            written.update(batch)
        assert time.time() - start < 300
        time.sleep(0.01)
    kind, result = final
    assert kind == worker.DONE, result
    assert len(result.masks) > 2 and 17 in result.masks
    assert set(written) <= set(result.masks)
    # streamed slices are raw, the final result is post-processed in 3D: rewrite what differs, clear
    # what was dropped (as the effect does when the job is done)
    fix = {i: m for i, m in result.masks.items() if i not in written or not np.array_equal(written[i], m)}
    fix.update({i: np.zeros_like(m) for i, m in written.items() if i not in result.masks})
    if fix:
        writing.write_slices(modify, source, fix, "k")
    got = writing.segment_array(editor["seg"], "s", source)
    assert np.array_equal(got, result.volume("k", array.shape))
    editor["logic"].Undo()  # one undo removes the whole propagation
    assert not writing.segment_array(editor["seg"], "s", source).any()

    # cancel after the first streamed slice: what was written stays, one undo removes it
    editor["logic"].SaveStateForUndo()
    job = worker.shared_worker().submit(propagate, 17)
    written = {}
    final = None
    while final is None:
        for kind, payload in job.poll():
            if kind == worker.PROGRESS:
                writing.write_slices(modify, source, {payload[0]: payload[1]}, "k")
                written[payload[0]] = payload[1]
                job.cancel()
            else:
                final = (kind, payload)
        time.sleep(0.01)
    kind, result = final
    assert kind == worker.DONE and result.cancelled
    assert written
    got = writing.segment_array(editor["seg"], "s", source)
    assert sorted(np.flatnonzero(got.reshape(got.shape[0], -1).any(axis=1))) == sorted(i for i, m in written.items() if m.any())
    editor["logic"].Undo()
    assert not writing.segment_array(editor["seg"], "s", source).any()


def test_worker_reports_errors_and_runs_jobs_in_order():
    w = worker.InferenceWorker(name="test-worker")
    order = []
    jobs = [w.submit(lambda job, n=n: order.append(n) or n) for n in range(5)]
    bad = w.submit(lambda job: 1 / 0)
    for n, job in enumerate(jobs):
        assert wait(job)[1] == (worker.DONE, n)
    kind, (exc, tb) = wait(bad)[1]
    assert kind == worker.ERROR and isinstance(exc, ZeroDivisionError) and "ZeroDivisionError" in tb
    assert order == list(range(5))
    import threading

    gate = threading.Event()
    blocker = w.submit(lambda job: gate.wait(5))
    queued = w.submit(lambda job: "never")
    deadline = time.time() + 5
    while blocker.state != "running" and time.time() < deadline:
        time.sleep(0.005)
    w.cancel_all()  # the running job is asked to stop (it decides), the queued one never runs
    gate.set()
    assert wait(queued)[1] == (worker.CANCELLED, None)
    assert wait(blocker)[1][0] == worker.DONE and blocker.cancelled
    w.stop()


def test_missing_checkpoint_is_a_user_error(tmp_path):
    from medsam_slicer.errors import MedSAMError

    p = engines.EngineProvider(engines.EngineSettings(checkpoint=str(tmp_path / "nope.pth"), device="cpu"))
    with pytest.raises(MedSAMError, match="no such file"):
        p.engine()
    empty_cache = engines.EngineProvider(engines.EngineSettings(cache_dir=str(tmp_path / "cache")))
    with pytest.raises(MedSAMError):
        empty_cache.engine()  # no weights and downloads are off inside the provider
