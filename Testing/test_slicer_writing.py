"""Writing slice results through the Segment Editor's own modify path (vtkSlicerSegmentEditorLogic,
which the effect's modifySelectedSegmentByLabelmap delegates to): editable area, editable intensity
range and overwrite settings apply; other slices, other segments and the source voxels stay as they
were; one undo removes a whole multi-slice write."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
    pytest.skip("slicer-core with the Segment Editor logic is not installed", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "MedSAMSlicer"))
from MedSAMSlicerLib import writing  # noqa: E402
from slicer_scene import editor_logic, register_converter_rules  # noqa: E402

SIZE_IJK = (24, 20, 16)
SEG = slicer.vtkMRMLSegmentationNode
ED = slicer.vtkMRMLSegmentEditorNode
_DIM = {"k": 0, "j": 1, "i": 2}


register_converter_rules()


def _matrix(m4):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(m4[r][c]))
    return m


class Editor:
    """A scene with a source volume, a segmentation (target, other1 visible, other2 hidden) and the
    Segment Editor logic bound to an editor node, as the Segment Editor widget sets them up."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)
        image = vtk.vtkImageData()
        image.SetDimensions(*SIZE_IJK)
        image.AllocateScalars(vtk.VTK_SHORT, 1)
        from vtk.util import numpy_support

        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        k, j, i = np.meshgrid(*[np.arange(n) for n in SIZE_IJK[::-1]], indexing="ij")
        values[:] = (i * 10 + j * 3 + k).ravel()  # distinct-ish intensities for the intensity-range test
        self.volume = slicer.vtkMRMLScalarVolumeNode()
        self.scene.AddNode(self.volume)
        self.volume.SetAndObserveImageData(image)
        # non-identity geometry: permuted, flipped, anisotropic
        ijk_to_ras = np.eye(4)
        ijk_to_ras[:3, :3] = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]]) @ np.diag([0.8, 1.1, 2.5])
        ijk_to_ras[:3, 3] = (12.0, -30.0, 45.0)
        self.volume.SetIJKToRASMatrix(_matrix(ijk_to_ras))
        self.voxels_before = writing.image_to_array(image)

        self.seg = slicer.vtkMRMLSegmentationNode()
        self.scene.AddNode(self.seg)
        self.seg.CreateDefaultDisplayNodes()
        self.seg.SetReferenceImageGeometryParameterFromVolumeNode(self.volume)
        for sid in ("target", "other1", "other2"):
            self.seg.GetSegmentation().AddEmptySegment(sid, sid)
        self.seg.GetDisplayNode().SetSegmentVisibility("other2", False)

        self.node = ED()
        self.logic = editor_logic(self.scene, self.node, self.seg, self.volume, "target")
        self.node.SetOverwriteMode(ED.OverwriteNone)
        self.node.SetMaskMode(SEG.EditAllowedEverywhere)
        assert self.logic.UpdateAlignedSourceVolume()
        self.source = self.logic.GetAlignedSourceVolume()  # what sourceVolumeImageData() returns

    def fill(self, segment_id, array_kji):
        ext = self.source.GetExtent()
        labelmap = writing.make_labelmap(self.source, ext, array_kji.astype(np.uint8))
        ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, self.seg, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        )
        assert ok

    def get(self, segment_id):
        return writing.segment_array(self.seg, segment_id, self.source)

    def write(self, masks, axis, save_undo=True):
        if save_undo:
            self.logic.SaveStateForUndo()
        modify = writing.logic_modifier(self.logic, self.seg, self.node.GetSelectedSegmentID())
        return writing.write_slices(modify, self.source, masks, axis)


def _blank():
    return np.zeros(SIZE_IJK[::-1], dtype=bool)


def _sel(axis, index):
    s = [slice(None)] * 3
    s[_DIM[axis]] = index
    return tuple(s)


def _slice_shape(axis):
    return _blank()[_sel(axis, 0)].shape


def _rect(axis, y0, y1, x0, x1):
    m = np.zeros(_slice_shape(axis), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_modification_mode_constants_match_slicer():
    L = slicer.vtkSlicerSegmentEditorLogic
    assert (writing.MODE_SET, writing.MODE_ADD, writing.MODE_REMOVE) == (
        L.ModificationModeSet, L.ModificationModeAdd, L.ModificationModeRemove)


@pytest.fixture()
def editor():
    return Editor()


def setup_segments(ed, axis, s):
    """target: a block on slices s-1..s+1 plus one on slice s+4; other1, other2: blocks over s-1..s+1
    that overlap the new mask on slice s in different places."""
    target, o1, o2 = _blank(), _blank(), _blank()
    for n in (s - 1, s, s + 1):
        target[_sel(axis, n)] = _rect(axis, 0, 4, 0, 5)
        o1[_sel(axis, n)] = _rect(axis, 3, 9, 2, 8)
        o2[_sel(axis, n)] = _rect(axis, 6, 12, 6, 12)
    target[_sel(axis, s + 4)] = _rect(axis, 2, 6, 2, 6)
    ed.fill("target", target)
    ed.fill("other1", o1)
    ed.fill("other2", o2)
    assert np.array_equal(ed.get("target"), target)
    assert np.array_equal(ed.get("other1"), o1)
    return target, o1, o2


MASK_MODES = {
    "everywhere": SEG.EditAllowedEverywhere,
    "inside_all": SEG.EditAllowedInsideAllSegments,
    "inside_visible": SEG.EditAllowedInsideVisibleSegments,
    "outside_all": SEG.EditAllowedOutsideAllSegments,
    "outside_visible": SEG.EditAllowedOutsideVisibleSegments,
    "inside_single": SEG.EditAllowedInsideSingleSegment,
}


@pytest.mark.parametrize("axis", ["k", "i"])
@pytest.mark.parametrize("mode", sorted(MASK_MODES))
def test_editable_area(editor, axis, mode):
    s = 6
    target, o1, o2 = setup_segments(editor, axis, s)
    editor.node.SetMaskMode(MASK_MODES[mode])
    if mode == "inside_single":
        editor.node.SetMaskSegmentID("other2")
    new = _rect(axis, 2, 10, 1, 11)
    editor.write({s: new}, axis)

    O1, O2, T = o1[_sel(axis, s)], o2[_sel(axis, s)], target[_sel(axis, s)]
    # The editor's editable areas: the "inside" modes include the edited segment itself (Slicer's
    # GenerateEditMask), the "outside" modes exclude it; a slice write then behaves like a Set of that
    # slice: inside the editable area the new mask, outside it the old content.
    E = {
        "everywhere": np.ones_like(new),
        "inside_all": O1 | O2 | T,
        "inside_visible": O1 | T,  # other2 is hidden
        "outside_all": ~(O1 | O2),
        "outside_visible": ~O1,
    }
    if mode == "inside_single":
        # editable: inside other2; erasing the edited segment is allowed anywhere
        expected_slice = new & (O2 | T)
    else:
        expected_slice = (T & ~E[mode]) | (new & E[mode])
    result = editor.get("target")
    assert np.array_equal(result[_sel(axis, s)], expected_slice)
    # every other slice of the target, and the other segments (overwrite none), are untouched
    expected = target.copy()
    expected[_sel(axis, s)] = expected_slice
    assert np.array_equal(result, expected)
    assert np.array_equal(editor.get("other1"), o1)
    expected_o2 = o2.copy()
    if mode == "inside_single":
        # Slicer: erasing while editing inside one segment gives the erased voxels back to that segment
        expected_o2[_sel(axis, s)] |= T & ~new
    assert np.array_equal(editor.get("other2"), expected_o2)
    assert np.array_equal(writing.image_to_array(editor.volume.GetImageData()), editor.voxels_before)


@pytest.mark.parametrize("mode", sorted(MASK_MODES))
def test_protected_area_is_where_the_editor_writes_nothing(editor, mode):
    """writing.protected_area (where growth stops) against the editor itself: a whole slice added to
    the target lands everywhere but there."""
    axis, s = "k", 6
    setup_segments(editor, axis, s)
    editor.fill("target", _blank())  # (what the target holds is always editable, and would land anyway)
    editor.node.SetMaskMode(MASK_MODES[mode])
    if mode == "inside_single":
        editor.node.SetMaskSegmentID("other2")
    protected = writing.protected_area(editor.node, editor.source)
    editor.logic.SaveStateForUndo()
    modify = writing.logic_modifier(editor.logic, editor.seg, "target")
    writing.write_slices(modify, editor.source, {s: np.ones(_slice_shape(axis), bool)}, axis, replace=False)
    landed = editor.get("target")[_sel(axis, s)]
    if mode == "everywhere":
        assert protected is None and landed.all()
    else:
        assert protected.shape == _blank().shape and not landed.all()
        assert np.array_equal(protected[_sel(axis, s)], ~landed)


@pytest.mark.parametrize("overwrite", ["all", "visible", "none"])
def test_overwrite_other_segments(editor, overwrite):
    axis, s = "k", 7
    target, o1, o2 = setup_segments(editor, axis, s)
    editor.node.SetOverwriteMode({"all": ED.OverwriteAllSegments, "visible": ED.OverwriteVisibleSegments,
                                  "none": ED.OverwriteNone}[overwrite])
    new = _rect(axis, 2, 10, 1, 11)
    editor.write({s: new}, axis)

    expected_target = target.copy()
    expected_target[_sel(axis, s)] = new
    assert np.array_equal(editor.get("target"), expected_target)

    exp1, exp2 = o1.copy(), o2.copy()
    if overwrite in ("all", "visible"):
        exp1[_sel(axis, s)] &= ~new
    if overwrite == "all":
        exp2[_sel(axis, s)] &= ~new
    assert np.array_equal(editor.get("other1"), exp1)
    assert np.array_equal(editor.get("other2"), exp2)
    # slices s-1 and s+1 of the other segments keep everything
    for n in (s - 1, s + 1):
        assert np.array_equal(editor.get("other1")[_sel(axis, n)], o1[_sel(axis, n)])
    assert np.array_equal(writing.image_to_array(editor.volume.GetImageData()), editor.voxels_before)


def test_editable_intensity_range(editor):
    axis, s = "j", 5
    target, _, _ = setup_segments(editor, axis, s)
    editor.node.SetSourceVolumeIntensityMask(True)
    editor.node.SetSourceVolumeIntensityMaskRange(60.0, 150.0)
    new = np.ones(_slice_shape(axis), dtype=bool)
    editor.write({s: new}, axis)
    source = writing.image_to_array(editor.source)[_sel(axis, s)]
    in_range = (source >= 60) & (source <= 150)
    assert 0 < in_range.sum() < in_range.size
    got = editor.get("target")[_sel(axis, s)]
    T = target[_sel(axis, s)]
    assert np.array_equal(got, (T & ~in_range) | in_range)


def test_multi_slice_write_is_one_undo_and_skips_unlisted_slices(editor):
    axis, s = "k", 6
    target, o1, o2 = setup_segments(editor, axis, s)
    masks = {s - 2: _rect(axis, 1, 3, 1, 3), s: _rect(axis, 5, 7, 5, 9), s + 2: np.zeros(_slice_shape(axis), bool)}
    editor.logic.SaveStateForUndo()
    # slices arrive one at a time (as from propagation), all under one undo state
    for index in sorted(masks):
        editor.write({index: masks[index]}, axis, save_undo=False)
    expected = target.copy()
    for index, mask in masks.items():
        expected[_sel(axis, index)] = mask
    result = editor.get("target")
    assert np.array_equal(result, expected)
    # slices between the written ones keep their content
    assert np.array_equal(result[_sel(axis, s - 1)], target[_sel(axis, s - 1)])
    assert np.array_equal(result[_sel(axis, s + 1)], target[_sel(axis, s + 1)])
    editor.logic.Undo()
    assert np.array_equal(editor.get("target"), target)
    assert np.array_equal(editor.get("other1"), o1)


def test_redraw_replaces_the_slice(editor):
    axis, s = "i", 9
    editor.write({s: _rect(axis, 2, 12, 2, 12)}, axis)
    editor.write({s: _rect(axis, 4, 6, 4, 6)}, axis)
    result = editor.get("target")
    expected = _blank()
    expected[_sel(axis, s)] = _rect(axis, 4, 6, 4, 6)
    assert np.array_equal(result, expected)
    editor.logic.Undo()
    expected[_sel(axis, s)] = _rect(axis, 2, 12, 2, 12)
    assert np.array_equal(editor.get("target"), expected)


def test_bad_masks_are_refused(editor):
    with pytest.raises(ValueError, match="shape"):
        writing.slice_modifiers(editor.source, {3: np.ones((5, 5), bool)}, "k")
    with pytest.raises(ValueError, match="out of range"):
        writing.slice_modifiers(editor.source, {SIZE_IJK[2]: np.ones(_slice_shape("k"), bool)}, "k")


def test_source_image_array_matches_volume_layout(editor):
    """image_to_array gives [k, j, i] like slicer.util.arrayFromVolume."""
    arr = writing.image_to_array(editor.source)
    assert arr.shape == SIZE_IJK[::-1]
    k, j, i = 3, 7, 11
    assert arr[k, j, i] == i * 10 + j * 3 + k


@pytest.mark.parametrize("axis", ["i", "j", "k"])
def test_segment_slices_reads_back_what_was_written(editor, axis):
    """What the effect reads for propagation seeds (listed slices) and re-propagation (non-empty slices)."""
    masks = {2: _rect(axis, 1, 3, 1, 3), 5: _rect(axis, 4, 6, 2, 5)}
    editor.write(masks, axis)
    seg_id = editor.node.GetSelectedSegmentID()
    present = writing.segment_slices(editor.seg, seg_id, editor.source, axis)
    assert sorted(present) == [2, 5]
    for index, mask in masks.items():
        assert np.array_equal(present[index], mask)
    listed = writing.segment_slices(editor.seg, seg_id, editor.source, axis, [3, 5])
    assert sorted(listed) == [3, 5]
    assert not listed[3].any() and np.array_equal(listed[5], masks[5])


def test_regions_limit_what_a_slice_write_removes(editor):
    """With a region, only the region's part of the old slice outside the new mask is removed."""
    axis, s = "k", 4
    old = _rect(axis, 2, 8, 2, 8) | _rect(axis, 12, 16, 16, 22)  # two pieces on the slice
    editor.write({s: old}, axis)
    new = _rect(axis, 3, 6, 3, 6)
    region = writing.redraw_region(old, (1, 1, 9, 9), new)  # box [x0, y0, x1, y1] around the first piece
    editor.logic.SaveStateForUndo()
    modify = writing.logic_modifier(editor.logic, editor.seg, "target")
    writing.write_slices(modify, editor.source, {s: new}, axis, regions={s: region})
    expected = _blank()
    expected[_sel(axis, s)] = new | _rect(axis, 12, 16, 16, 22)
    assert np.array_equal(editor.get("target"), expected)
    with pytest.raises(ValueError, match="region shape"):
        writing.slice_modifiers(editor.source, {s: new}, axis, regions={s: np.ones((3, 3), bool)})


def test_redraw_region_takes_the_box_and_the_pieces_it_or_the_mask_touch():
    old = np.zeros((20, 30), bool)
    old[2:10, 2:10] = True  # crosses the box's edge: replaced whole
    old[15:18, 25:28] = True  # far away: kept
    old[12:14, 14:16] = True  # outside the box but under the new mask: replaced
    box = (5, 5, 12, 11)
    mask = np.zeros_like(old)
    mask[6:14, 6:16] = True
    region = writing.redraw_region(old, box, mask)
    assert region[5:12, 5:13].all()  # the box
    assert region[2:10, 2:10].all() and region[12:14, 14:16].all()
    assert not region[15:18, 25:28].any()
    empty = writing.redraw_region(np.zeros_like(old), box, np.zeros_like(old))
    assert empty.sum() == 7 * 8
