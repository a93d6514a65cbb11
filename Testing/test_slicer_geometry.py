"""Slice-view geometry on real Slicer core libraries (slicer-core): which IJK axis and slice a view
shows, and a box dragged in display XY as a voxel box, over volumes whose IJK-to-RAS is not the
identity. Ground truth is chosen in voxel space and mapped to display pixels independently."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkMRMLSliceNode"):
    pytest.skip("slicer-core (Slicer's MRML libraries) is not installed", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "MedSAMSlicer"))
from MedSAMSlicerLib import geometry  # noqa: E402
from slicer_scene import read_volume_node  # noqa: E402

SIZE_IJK = (40, 30, 20)


def _matrix(m4):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(m4[r][c]))
    return m


def _ijk_to_ras(directions, spacing, origin):
    m = np.eye(4)
    m[:3, :3] = np.asarray(directions, float) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


# name -> IJK-to-RAS. Columns are where i, j, k point in RAS.
VOLUMES = {
    "ras_anisotropic": _ijk_to_ras(np.eye(3), (0.7, 0.9, 2.5), (10.0, -20.0, 30.0)),
    "lps_like": _ijk_to_ras(np.diag([-1, -1, 1]), (1.2, 1.2, 3.0), (50.0, 40.0, -60.0)),
    # sagittal acquisition: i -> A, j -> -S (flipped), k -> R
    "permuted_flipped": _ijk_to_ras([[0, 0, 1], [1, 0, 0], [0, -1, 0]], (0.8, 1.1, 4.0), (-5.0, 7.0, 90.0)),
    # coronal acquisition, every axis flipped: i -> -R, j -> +S... k -> -A
    "coronal_flipped": _ijk_to_ras([[-1, 0, 0], [0, 0, -1], [0, 1, 0]], (0.5, 0.5, 2.0), (3.0, 2.0, 1.0)),
}

# Which IJK axis each standard view cuts, per volume (from the columns above, by hand).
EXPECTED_AXIS = {
    "ras_anisotropic": {"Axial": "k", "Sagittal": "i", "Coronal": "j"},
    "lps_like": {"Axial": "k", "Sagittal": "i", "Coronal": "j"},
    "permuted_flipped": {"Axial": "j", "Sagittal": "k", "Coronal": "i"},
    "coronal_flipped": {"Axial": "j", "Sagittal": "i", "Coronal": "k"},
}


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(s)
    return s


def make_volume(scene, ijk_to_ras, size=SIZE_IJK):
    image = vtk.vtkImageData()
    image.SetDimensions(*size)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_matrix(ijk_to_ras))
    return node


def make_slice_node(scene, orientation, center_ras, zoom=6.0, dims=(700, 500)):
    """A slice view of `dims` pixels showing `orientation` through center_ras, `zoom` pixels per mm."""
    node = scene.CreateNodeByClass("vtkMRMLSliceNode")  # carries the scene's orientation presets
    node.SetName(f"view{orientation}")
    node.SetLayoutName(f"view{orientation}")
    scene.AddNode(node)
    assert node.SetOrientation(orientation)
    node.SetDimensions(dims[0], dims[1], 1)
    node.SetFieldOfView(dims[0] / zoom, dims[1] / zoom, 1.0)
    node.JumpSliceByCentering(*center_ras)
    node.UpdateMatrices()
    return node


def ras_to_xy(slice_node, ras):
    xy_to_ras = np.array([[slice_node.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    xy = np.linalg.inv(xy_to_ras) @ np.r_[np.asarray(ras, float), 1.0]
    return xy[:2]


def voxel_ras(ijk_to_ras, ijk):
    return (ijk_to_ras @ np.r_[np.asarray(ijk, float), 1.0])[:3]


@pytest.mark.parametrize("volume_name", sorted(VOLUMES))
@pytest.mark.parametrize("orientation", ["Axial", "Sagittal", "Coronal"])
def test_dragged_box_maps_to_voxels(scene, volume_name, orientation):
    ijk_to_ras = VOLUMES[volume_name]
    volume = make_volume(scene, ijk_to_ras)
    axis = EXPECTED_AXIS[volume_name][orientation]
    n = "ijk".index(axis)
    xa, ya = geometry.IN_PLANE[axis]

    # Ground truth chosen in voxel space: slice 7 along the axis, box x 4..13, y 3..9 on it.
    seed = [0, 0, 0]
    seed[n] = 7
    seed[xa], seed[ya] = 9, 6
    view = make_slice_node(scene, orientation, voxel_ras(ijk_to_ras, seed))
    truth_box = (4, 3, 13, 9)

    def corner(x, y):
        ijk = [0, 0, 0]
        ijk[n], ijk[xa], ijk[ya] = 7, x, y
        return ras_to_xy(view, voxel_ras(ijk_to_ras, ijk))

    # Drag between the centres of two opposite corner voxels, as integer mouse positions,
    # from the corner that appears top-right on screen to the bottom-left one (any direction works).
    p0, p1 = corner(truth_box[0], truth_box[1]), corner(truth_box[2], truth_box[3])
    xy0 = (int(round(max(p0[0], p1[0]))), int(round(max(p0[1], p1[1]))))
    xy1 = (int(round(min(p0[0], p1[0]))), int(round(min(p0[1], p1[1]))))

    got_axis, got_index = geometry.view_axis_and_slice(view, volume)
    assert (got_axis, got_index) == (axis, 7)
    got = geometry.xy_box_to_ijk_box(view, xy0, xy1, volume)
    assert got == (axis, 7, truth_box)

    # Cross-check the corners with Slicer's own XY -> IJK (the Segment Editor's conversion).
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(volume.GetImageData())
    oriented.SetGeometryFromImageToWorldMatrix(_matrix(ijk_to_ras))
    for xy in (xy0, xy1):
        ijk = [0, 0, 0]
        slicer.vtkSlicerSegmentEditorLogic.XyToIjk(list(xy), ijk, view, oriented)
        assert ijk[n] == 7
        assert {ijk[xa], ijk[ya]} <= set(truth_box)

    # The same through the oriented image (the editor's source image) gives the same answer.
    assert geometry.xy_box_to_ijk_box(view, xy0, xy1, oriented) == (axis, 7, truth_box)

    # The outline drawn back on screen encloses the dragged corners.
    outline = geometry.box_outline_xy(view, volume, axis, 7, truth_box)
    assert outline[:, 0].min() < min(xy0[0], xy1[0]) and outline[:, 0].max() > max(xy0[0], xy1[0])
    assert outline[:, 1].min() < min(xy0[1], xy1[1]) and outline[:, 1].max() > max(xy0[1], xy1[1])


def test_lps_file_read_by_slicer(scene, tmp_path):
    """A real NRRD written in LPS (SimpleITK) and read by Slicer's volume reader."""
    sitk = pytest.importorskip("SimpleITK")
    arr = np.zeros((12, 16, 20), dtype=np.int16)  # [k, j, i]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 1.3, 2.5))
    img.SetOrigin((12.0, -8.0, 40.0))
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # LPS identity: i -> L, j -> P, k -> S
    path = str(tmp_path / "lps.nrrd")
    sitk.WriteImage(img, path)
    node = read_volume_node(scene, path)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert ijk_to_ras[0, 0] < 0 and ijk_to_ras[1, 1] < 0  # L and P: RAS x and y flip

    center = voxel_ras(ijk_to_ras, (10, 5, 4))
    view = make_slice_node(scene, "Axial", center, zoom=10.0)
    assert geometry.view_axis_and_slice(view, node) == ("k", 4)
    a, b = ras_to_xy(view, voxel_ras(ijk_to_ras, (2, 3, 4))), ras_to_xy(view, voxel_ras(ijk_to_ras, (15, 11, 4)))
    # In the Axial preset screen +x is RAS -x = +i for an LPS file: i grows to the right.
    assert a[0] < b[0]
    got = geometry.xy_box_to_ijk_box(view, np.round(a), np.round(b), node)
    assert got == ("k", 4, (2, 3, 15, 11))


def test_box_is_clipped_to_the_slice_and_off_volume_box_refused(scene):
    ijk_to_ras = VOLUMES["ras_anisotropic"]
    volume = make_volume(scene, ijk_to_ras)
    view = make_slice_node(scene, "Axial", voxel_ras(ijk_to_ras, (0, 0, 5)), zoom=4.0)
    inside = ras_to_xy(view, voxel_ras(ijk_to_ras, (3, 2, 5)))
    outside = ras_to_xy(view, voxel_ras(ijk_to_ras, (-6, -4, 5)))
    axis, index, box = geometry.xy_box_to_ijk_box(view, np.round(outside), np.round(inside), volume)
    assert (axis, index, box) == ("k", 5, (0, 0, 3, 2))
    far = ras_to_xy(view, voxel_ras(ijk_to_ras, (-20, -20, 5)))
    with pytest.raises(geometry.OutsideVolumeError):
        geometry.xy_box_to_ijk_box(view, np.round(far), np.round(far) + 5, volume)


def test_view_outside_the_volume_is_refused(scene):
    ijk_to_ras = VOLUMES["lps_like"]
    volume = make_volume(scene, ijk_to_ras)
    view = make_slice_node(scene, "Axial", voxel_ras(ijk_to_ras, (5, 5, SIZE_IJK[2] + 3)))
    with pytest.raises(geometry.OutsideVolumeError):
        geometry.view_axis_and_slice(view, volume)


def test_oblique_view_is_refused(scene):
    ijk_to_ras = VOLUMES["ras_anisotropic"]
    volume = make_volume(scene, ijk_to_ras)
    view = make_slice_node(scene, "Axial", voxel_ras(ijk_to_ras, (10, 10, 5)))
    rotation = vtk.vtkTransform()
    rotation.RotateX(20.0)
    slice_to_ras = view.GetSliceToRAS()
    combined = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), slice_to_ras, combined)
    slice_to_ras.DeepCopy(combined)
    view.UpdateMatrices()
    with pytest.raises(geometry.ObliqueViewError, match="oblique"):
        geometry.view_axis_and_slice(view, volume)
    with pytest.raises(geometry.ObliqueViewError):
        geometry.xy_box_to_ijk_box(view, (100, 100), (200, 200), volume)


def test_in_plane_rotated_view_still_aligned(scene):
    """A view rotated 90 degrees within the slice plane still cuts the same axis; the box follows."""
    ijk_to_ras = VOLUMES["permuted_flipped"]
    volume = make_volume(scene, ijk_to_ras)
    center = voxel_ras(ijk_to_ras, (12, 8, 6))
    view = make_slice_node(scene, "Sagittal", center)
    rotation = vtk.vtkTransform()
    rotation.RotateX(90.0)  # about R, the sagittal normal
    slice_to_ras = view.GetSliceToRAS()
    combined = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), slice_to_ras, combined)
    combined.SetElement(0, 3, center[0])
    combined.SetElement(1, 3, center[1])
    combined.SetElement(2, 3, center[2])
    slice_to_ras.DeepCopy(combined)
    view.UpdateMatrices()
    a = ras_to_xy(view, voxel_ras(ijk_to_ras, (5, 2, 6)))
    b = ras_to_xy(view, voxel_ras(ijk_to_ras, (18, 14, 6)))
    assert geometry.xy_box_to_ijk_box(view, np.round(a), np.round(b), volume) == ("k", 6, (5, 2, 18, 14))


def test_roi_bounds_to_voxel_box(scene):
    ijk_to_ras = VOLUMES["coronal_flipped"]
    volume = make_volume(scene, ijk_to_ras)
    lo_ras = voxel_ras(ijk_to_ras, (4, 3, 2))
    hi_ras = voxel_ras(ijk_to_ras, (20, 11, 9))
    lo, hi = geometry.ras_box_to_ijk_box3d(volume, np.minimum(lo_ras, hi_ras), np.maximum(lo_ras, hi_ras))
    assert (lo, hi) == ((4, 3, 2), (20, 11, 9))


def test_overlays_follow_pan_zoom_and_slice_changes(scene):
    """An outline is kept on its voxels: after a pan or a zoom it is recomputed to the voxels' new
    display position; on another slice (or an oblique view) it is hidden."""
    ijk_to_ras = VOLUMES["lps_like"]
    volume = make_volume(scene, ijk_to_ras)
    k = 7
    view = make_slice_node(scene, "Axial", voxel_ras(ijk_to_ras, (20, 15, k)))
    box = (10, 8, 25, 20)

    def expected_corners():
        corners = [(box[0] - 0.5, box[1] - 0.5), (box[2] + 0.5, box[1] - 0.5), (box[2] + 0.5, box[3] + 0.5),
                   (box[0] - 0.5, box[3] + 0.5)]
        return np.array([ras_to_xy(view, voxel_ras(ijk_to_ras, (x, y, k))) for x, y in corners])

    first = geometry.overlay_xy(view, volume, "k", k, box2d=box)
    assert np.allclose(first, expected_corners(), atol=1e-6)
    view.SetXYZOrigin(15.0, -8.0, 0.0)  # pan
    view.UpdateMatrices()
    panned = geometry.overlay_xy(view, volume, "k", k, box2d=box)
    assert not np.allclose(panned, first) and np.allclose(panned, expected_corners(), atol=1e-6)
    view.SetFieldOfView(50.0, 40.0, 1.0)  # zoom
    view.UpdateMatrices()
    zoomed = geometry.overlay_xy(view, volume, "k", k, box2d=box)
    assert np.allclose(zoomed, expected_corners(), atol=1e-6)
    assert np.ptp(zoomed[:, 0]) > np.ptp(panned[:, 0])
    mask = np.zeros((30, 40), bool)
    mask[10:15, 12:20] = True
    segments = geometry.overlay_xy(view, volume, "k", k, mask=mask)
    assert segments.shape == (2 * (5 + 8), 2, 2)
    view.JumpSliceByCentering(*voxel_ras(ijk_to_ras, (20, 15, k + 2)))  # another slice
    view.UpdateMatrices()
    assert geometry.overlay_xy(view, volume, "k", k, box2d=box).shape == (0, 2)
    assert geometry.overlay_xy(view, volume, "k", k, mask=mask).shape == (0, 2, 2)
    assert geometry.shows_slice(view, volume, "k", k + 2)
