"""volume_io: reading keeps physical (LPS) geometry; writers round-trip through independent readers.

Test files are written with writers other than the one under test where it matters (a hand-made
NIfTI header, pynrrd, Pillow, per-slice DICOM), so a geometry mistake cannot cancel itself out.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from medsam_slicer import volume_io as vio
from medsam_slicer.errors import InputError

sitk = pytest.importorskip("SimpleITK")
nrrd = pytest.importorskip("nrrd")
slicerio = pytest.importorskip("slicerio")

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---------------------------------------------------------------- test-data helpers


def write_nifti(path, data_kji: np.ndarray, affine_ras: np.ndarray) -> None:
    """A NIfTI-1 file built byte by byte (int16, sform only), independent of SimpleITK."""
    nk, nj, ni = data_kji.shape
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, ni, nj, nk, 1, 1, 1, 1)  # dim
    struct.pack_into("<hh", header, 70, 4, 16)  # datatype int16, bitpix
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    struct.pack_into("<8f", header, 76, 1.0, *spacing, 1.0, 1.0, 1.0, 1.0)  # pixdim
    struct.pack_into("<fff", header, 108, 352.0, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    header[123] = 2  # xyzt_units: millimetres
    struct.pack_into("<hh", header, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    struct.pack_into("<12f", header, 280, *affine_ras[:3, :].ravel())  # srow_x, srow_y, srow_z
    header[344:348] = b"n+1\0"
    with open(path, "wb") as handle:
        handle.write(bytes(header) + b"\0\0\0\0")
        handle.write(np.ascontiguousarray(data_kji, dtype="<i2").tobytes())  # i fastest


def write_dicom_series(folder, volume_kji: np.ndarray, spacing, origin, direction, series_uid, order):
    """One DICOM file per slice with position/orientation tags; files named in `order`."""
    os.makedirs(folder, exist_ok=True)
    image = sitk.GetImageFromArray(volume_kji.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    cosines = np.asarray(direction, float)[:, :2].T.ravel()  # row then column direction
    for n, k in enumerate(order):
        piece = image[:, :, int(k)]
        position = image.TransformIndexToPhysicalPoint((0, 0, int(k)))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(int(k) + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in cosines),
            "0018|0050": str(spacing[2]),
        }
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(os.path.join(folder, f"img{n:03d}_{series_uid[-1]}.dcm"))
        writer.Execute(piece)


def physical_points(path, mask_kji: np.ndarray) -> np.ndarray:
    """LPS points of a mask's voxels, using SimpleITK's own index-to-physical mapping on `path`."""
    image = sitk.ReadImage(path)
    k, j, i = np.nonzero(mask_kji)
    return np.array([image.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for a, b, c in zip(i, j, k)])


def sorted_rows(points: np.ndarray) -> np.ndarray:
    points = np.round(points, 3)
    return points[np.lexsort(points.T[::-1])]


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------- reading


def test_ct_sample_geometry_matches_simpleitk(ct_path, ct_array):
    volume = vio.read_volume(ct_path)
    image = sitk.ReadImage(ct_path)
    np.testing.assert_array_equal(volume.array, ct_array)
    assert volume.shape_kji == (34, 128, 128) and not volume.is_rgb and volume.notes == ()
    for ijk in [(0, 0, 0), (127, 0, 5), (3, 99, 33), (64, 64, 17)]:
        expected = image.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose((volume.ijk_to_lps() @ [*ijk, 1])[:3], expected, atol=1e-4)


def test_nifti_ras_affine_becomes_lps(tmp_path, ct_array):
    # Left-handed, permuted, anisotropic: i runs superior, j runs left, k runs anterior.
    affine = np.array([[0.0, -0.8, 0.0, 30.0],
                       [0.0, 0.0, 1.2, -40.0],
                       [2.0, 0.0, 0.0, 12.5],
                       [0.0, 0.0, 0.0, 1.0]])
    data = ct_array[10:16, 20:60, 30:80].astype(np.int16).copy()
    data[2, 7, 11] = 3071  # a marker voxel at (i, j, k) = (11, 7, 2)
    path = tmp_path / "ras.nii"
    write_nifti(path, data, affine)

    volume = vio.read_volume(str(path))
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.spacing, [2.0, 0.8, 1.2], atol=1e-6)
    for ijk in [(11, 7, 2), (0, 0, 0), (49, 39, 5)]:
        expected = (LPS_FROM_RAS @ affine @ [*ijk, 1])[:3]
        np.testing.assert_allclose((volume.ijk_to_lps() @ [*ijk, 1])[:3], expected, atol=1e-4)
    assert volume.array[2, 7, 11] == 3071
    # The marker's LPS point: RAS (30 - 0.8*7, -40 + 1.2*2, 12.5 + 2*11) -> flip x and y.
    np.testing.assert_allclose((volume.ijk_to_lps() @ [11, 7, 2, 1])[:3], [-24.4, 37.6, 34.5], atol=1e-4)


@pytest.mark.parametrize("space", ["right-anterior-superior", "left-posterior-superior"])
def test_nrrd_permuted_flipped_directions(tmp_path, ct_array, space):
    data_kji = ct_array[5:12, 0:30, 40:90].copy()
    directions = np.array([[0.0, 0.0, -3.5],   # i: toward -z, 3.5 mm
                           [0.9, 0.0, 0.0],    # j: toward +x, 0.9 mm
                           [0.0, -0.6, 0.0]])  # k: toward -y, 0.6 mm   (rows = axes, as NRRD)
    origin = np.array([-12.0, 80.0, 5.0])
    path = tmp_path / "permuted.nrrd"
    nrrd.write(str(path), data_kji.transpose(2, 1, 0),
               {"space": space, "space directions": directions, "space origin": origin,
                "kinds": ["domain"] * 3})
    to_lps = LPS_FROM_RAS[:3, :3] if space.startswith("right") else np.eye(3)

    volume = vio.read_volume(str(path))
    np.testing.assert_array_equal(volume.array, data_kji)
    np.testing.assert_allclose(volume.spacing, [3.5, 0.9, 0.6], atol=1e-6)
    for ijk in [(0, 0, 0), (49, 29, 6), (13, 2, 4)]:
        expected = to_lps @ (origin + np.asarray(ijk) @ directions)
        np.testing.assert_allclose((volume.ijk_to_lps() @ [*ijk, 1])[:3], expected, atol=1e-4)


def test_dicom_series_folder_sorted_by_position(tmp_path, ct_array):
    # Coronal slices: rows along +x, columns along -z, slices along +y; files named out of order.
    direction = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    spacing, origin = (0.7, 0.9, 2.5), (-20.0, 10.0, 55.0)
    data = ct_array[8:16, 30:62, 40:88].copy()
    folder = tmp_path / "dicom"
    write_dicom_series(folder, data, spacing, origin, direction, "1.2.826.0.1.3680043.2.1125.7",
                       order=[3, 0, 7, 5, 1, 6, 2, 4])
    write_dicom_series(folder, ct_array[:3, :32, :48], spacing, (0.0, 0.0, 0.0), np.eye(3),
                       "1.2.826.0.1.3680043.2.1125.9", order=[0, 1, 2])  # a small "scout"

    volume = vio.read_volume(str(folder))
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.spacing, spacing, atol=1e-4)
    np.testing.assert_allclose(volume.direction, direction, atol=1e-5)
    np.testing.assert_allclose((volume.ijk_to_lps() @ [47, 31, 7, 1])[:3],
                               np.asarray(origin) + direction @ (np.array([47, 31, 7]) * spacing), atol=1e-3)
    assert len(volume.notes) == 1 and "2 DICOM series" in volume.notes[0] and "1125.9" in volume.notes[0]

    scout = vio.read_volume(str(folder), series_uid="1.2.826.0.1.3680043.2.1125.9")
    np.testing.assert_array_equal(scout.array, ct_array[:3, :32, :48])
    with pytest.raises(InputError, match="no DICOM series 9.9"):
        vio.read_volume(str(folder), series_uid="9.9")


def test_png_grey_and_rgba(tmp_path, ct_array):
    from PIL import Image

    grey = np.clip(ct_array[17] // 8 + 128, 0, 255).astype(np.uint8)[:100, :90]
    grey[5, 17] = 255
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    volume = vio.read_volume(str(tmp_path / "grey.png"))
    assert volume.array.shape == (1, 100, 90) and not volume.is_rgb
    np.testing.assert_array_equal(volume.array[0], grey)
    np.testing.assert_allclose(volume.spacing, [1, 1, 1])
    np.testing.assert_allclose((volume.ijk_to_lps() @ [17, 5, 0, 1])[:3], [17, 5, 0])  # x = column

    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, np.arange(60)[None], 7, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "colour.png")
    colour = vio.read_volume(str(tmp_path / "colour.png"))
    assert colour.is_rgb and colour.array.dtype == np.uint8 and colour.shape_kji == (1, 40, 60)
    np.testing.assert_array_equal(colour.array[0], rgba[..., :3])


def test_tiff_16_bit_grey(tmp_path, ct_array):
    from PIL import Image

    values = (ct_array[20, :50, :70] + 1024).clip(0, 4095).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "slice.tif")
    volume = vio.read_volume(str(tmp_path / "slice.tif"))
    np.testing.assert_array_equal(volume.array, values[None])


# ---------------------------------------------------------------- refusals on reading


def test_refuses_4d_volume(tmp_path):
    path = tmp_path / "time.nrrd"
    nrrd.write(str(path), np.zeros((4, 5, 6, 3), np.int16))
    with pytest.raises(InputError, match="4D image") as error:
        vio.read_volume(str(path))
    assert str(path) in one_line(error)


def test_refuses_multicomponent_non_rgb(tmp_path):
    path = tmp_path / "vectors.nrrd"
    nrrd.write(str(path), np.zeros((2, 5, 6, 3), np.float32),
               {"kinds": ["vector", "domain", "domain", "domain"]})
    with pytest.raises(InputError, match="2 values per voxel") as error:
        vio.read_volume(str(path))
    one_line(error)


def test_refuses_colour_volume_with_several_slices(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((3, 8, 9, 3), np.uint8), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb3d.mha"))
    with pytest.raises(InputError, match="colour volume with several slices"):
        vio.read_volume(str(tmp_path / "rgb3d.mha"))


def test_refuses_missing_and_non_image_files(tmp_path):
    with pytest.raises(InputError, match="input not found") as error:
        vio.read_volume(str(tmp_path / "nothing.nrrd"))
    one_line(error)
    fake = tmp_path / "notes.nrrd"
    fake.write_text("this is not an image\n")
    with pytest.raises(InputError, match="not an image file") as error:
        vio.read_volume(str(fake))
    assert str(fake) in one_line(error)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no DICOM series"):
        vio.read_volume(str(tmp_path / "empty"))


# ---------------------------------------------------------------- segmentations


def test_expert_segments_lie_on_the_right_anatomy(ct_path, expert_seg_path):
    ct = vio.read_volume(ct_path)
    masks = vio.read_segmentation_masks(expert_seg_path, ct)
    assert set(masks) == {"ribs", "cervical vertebral column", "thoracic vertebral column",
                          "lumbar vertebral column", "right lung", "left lung", "tissue"}
    lung = masks["right lung"]
    assert lung.shape == ct.shape_kji and lung.sum() > 10000
    assert np.median(ct.array[lung]) < -500 and np.mean(ct.array[lung] < -500) > 0.85
    assert np.median(ct.array[masks["ribs"]]) > 100  # bone
    # Patient's right is LPS -x: the right lung's centroid lies at smaller x than the left's.
    def centroid_x(mask):
        k, j, i = np.nonzero(mask)
        return (ct.ijk_to_lps() @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[0]
    assert centroid_x(masks["right lung"]) < centroid_x(masks["left lung"]) - 50


def test_cropped_seg_file_lands_at_its_offset(tmp_path, ct_path, expert_seg_path):
    ct = vio.read_volume(ct_path)
    full = vio.read_segmentation_masks(expert_seg_path, ct)
    seg = slicerio.read_segmentation(expert_seg_path)
    lo = np.array([5, 9, 2])  # i, j, k offset, as Slicer writes a segmentation cropped to its content
    seg["voxels"] = seg["voxels"][lo[0]:120, lo[1]:125, lo[2]:34].copy()
    seg["ijkToLPS"] = seg["ijkToLPS"].copy()
    seg["ijkToLPS"][:3, 3] = (seg["ijkToLPS"] @ [*lo, 1])[:3]
    seg["referenceImageExtentOffset"] = lo.tolist()
    cropped = tmp_path / "cropped.seg.nrrd"
    slicerio.write_segmentation(str(cropped), seg)

    own_grid = vio.read_segmentation_masks(str(cropped))
    assert own_grid["right lung"].shape == (32, 116, 115)
    placed = vio.read_segmentation_masks(str(cropped), ct)
    inside = np.zeros(ct.shape_kji, bool)
    inside[2:34, 9:125, 5:120] = True
    for name in ("right lung", "ribs"):
        np.testing.assert_array_equal(placed[name], full[name] & inside)


def _test_masks(ct_array):
    """Three segments from real CT intensities; the third overlaps the first."""
    lung = ct_array < -500
    lung[:, :, 64:] = False  # one side only
    lung[:10] = False
    bone = ct_array > 300
    box = np.zeros(ct_array.shape, bool)
    box[12:18, 40:70, 30:60] = True
    return [("lung side", lung), ("bone", bone), ("overlapping box", box)]


def test_seg_nrrd_maps_voxels_to_the_same_physical_points(tmp_path, ct_path, ct_array, expert_seg_path):
    reference = vio.read_volume(ct_path)
    segments = _test_masks(ct_array)
    kept = [m.copy() for _, m in segments]
    out = tmp_path / "result.seg.nrrd"
    assert vio.write_output(str(out), segments, reference) == "seg.nrrd"
    for (_, mask), copy in zip(segments, kept):
        np.testing.assert_array_equal(mask, copy)  # inputs untouched

    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["lung side", "bone", "overlapping box"]
    assert seg["voxels"].ndim == 4  # the overlap needs a second layer
    assert seg["segments"][2]["layer"] != seg["segments"][0]["layer"]
    colours = [tuple(s["color"]) for s in seg["segments"]]
    assert len(set(colours)) == 3
    for segment, (_, mask) in zip(seg["segments"], segments):
        ijk = np.argwhere(seg["voxels"][segment["layer"]] == segment["labelValue"])  # (i, j, k) rows
        found = (seg["ijkToLPS"] @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
        expected = physical_points(ct_path, mask)
        np.testing.assert_allclose(sorted_rows(found), sorted_rows(expected), atol=1e-3)
        lo, hi = ijk.min(axis=0), ijk.max(axis=0)
        extent = segment["extent"]
        assert extent[0] <= lo[0] and hi[0] <= extent[1] and extent[2] <= lo[1] and hi[1] <= extent[3]
        assert extent[4] <= lo[2] and hi[2] <= extent[5]
        assert segment["status"] == "inprogress" and segment["terminology"]["type"][1] == "85756007"

    # Same header fields as the segmentation Slicer wrote for slicerio's sample.
    ours, expert = nrrd.read_header(str(out)), nrrd.read_header(expert_seg_path)
    def fields(header, prefix):
        return {key.split("_", 1)[1] for key in header if key.startswith(prefix)}
    assert fields(ours, "Segment0_") == fields(expert, "Segment0_")
    assert fields(ours, "Segmentation_") == fields(expert, "Segmentation_")
    assert ours["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert ours["Segmentation_ContainedRepresentationNames"].startswith("Binary labelmap")
    assert ours["space"] == "left-posterior-superior"
    geometry = ours["Segmentation_ConversionParameters"].split("|")[1].split(";")
    expert_geometry = expert["Segmentation_ConversionParameters"].split("Reference image geometry|")[1]
    np.testing.assert_allclose([float(v) for v in geometry[:22]],
                               [float(v) for v in expert_geometry.split("|")[0].split(";")[:22]], atol=1e-4)

    back = vio.read_segmentation_masks(str(out), reference)
    for name, mask in segments:
        np.testing.assert_array_equal(back[name], mask)


def test_seg_nrrd_on_permuted_geometry(tmp_path, ct_array):
    reference = vio.Volume(ct_array[:6, :20, :30].copy(), np.array([0.5, 1.5, 4.0]), np.array([3.0, -7.0, 11.0]),
                           np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), "memory")
    image_path = tmp_path / "reference.nrrd"
    sitk.WriteImage(reference.to_sitk(), str(image_path))
    mask = np.zeros(reference.shape_kji, bool)
    mask[1:4, 5:9, 20:27] = True
    mask[5, 0, 0] = True
    out = tmp_path / "permuted.seg.nrrd"
    vio.write_output(str(out), [("target", mask)], reference)
    seg = slicerio.read_segmentation(str(out))
    assert seg["voxels"].ndim == 3
    ijk = np.argwhere(seg["voxels"] == seg["segments"][0]["labelValue"])
    found = (seg["ijkToLPS"] @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    np.testing.assert_allclose(sorted_rows(found), sorted_rows(physical_points(str(image_path), mask)), atol=1e-3)
    assert seg["segments"][0]["extent"] == [0, 26, 0, 8, 1, 5]


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii", "labels.nrrd", "labels.mha", "labels.mhd"])
def test_labelmap_round_trip(tmp_path, ct_path, ct_array, name):
    reference = vio.read_volume(ct_path)
    segments = _test_masks(ct_array)
    out = tmp_path / name
    assert vio.write_output(str(out), segments, reference) == "labelmap"
    image = sitk.ReadImage(str(out))
    labels = sitk.GetArrayFromImage(image)
    assert labels.dtype == np.uint8
    expected = np.zeros(ct_array.shape, np.uint8)
    expected[segments[0][1]] = 1
    expected[segments[1][1]] = 2
    expected[segments[2][1]] = 3  # the later segment wins where they overlap
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(image.GetSpacing(), reference.spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), reference.direction, atol=1e-6)
    masks = vio.read_segmentation_masks(str(out), reference)
    np.testing.assert_array_equal(masks["label 3"], segments[2][1])
    leftovers = sorted(os.listdir(tmp_path))
    assert leftovers == ([name, "labels.zraw"] if name.endswith(".mhd") else [name])  # no scratch folders


def test_probabilities_round_trip(tmp_path, ct_path, ct_array):
    reference = vio.read_volume(ct_path)
    rng = np.random.default_rng(3)
    prob = np.zeros(ct_array.shape, np.float32)
    prob[10:20, 30:90, 20:70] = rng.random((10, 60, 50), dtype=np.float32)
    out = tmp_path / "prob.nii.gz"
    vio.write_probabilities(str(out), prob, reference)
    image = sitk.ReadImage(str(out))
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), prob)
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((20, 30, 10)),
                               (reference.ijk_to_lps() @ [20, 30, 10, 1])[:3], atol=1e-3)
    with pytest.raises(InputError, match="cannot be written as .seg.nrrd"):
        vio.write_probabilities(str(tmp_path / "p.seg.nrrd"), prob, reference)


def test_png_input_writes_one_slice_outputs(tmp_path):
    from PIL import Image

    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[5:12, 8:20] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    volume = vio.read_volume(str(tmp_path / "photo.png"))
    mask = (volume.array[..., 0] > 128)
    vio.write_output(str(tmp_path / "photo.seg.nrrd"), [("red", mask)], volume)
    back = vio.read_segmentation_masks(str(tmp_path / "photo.seg.nrrd"), volume)
    assert back["red"].shape == (1, 30, 40) and back["red"][0, 5:12, 8:20].all() and back["red"].sum() == 84


# ---------------------------------------------------------------- refusals on writing


def test_output_kind_and_checks(tmp_path):
    assert vio.output_kind("a/b.SEG.NRRD") == "seg.nrrd"
    assert vio.output_kind("x.nii.gz") == vio.output_kind("x.mhd") == "labelmap"
    with pytest.raises(InputError, match="cannot tell the output format"):
        vio.output_kind("mask.png")
    with pytest.raises(InputError, match="output folder does not exist") as error:
        vio.check_output_path(str(tmp_path / "missing" / "out.seg.nrrd"), overwrite=True)
    one_line(error)
    assert vio.check_output_path(str(tmp_path / "out.nii.gz")) == "labelmap"


def test_existing_output_needs_overwrite(tmp_path, ct_path, ct_array):
    reference = vio.read_volume(ct_path)
    out = tmp_path / "done.nrrd"
    out.write_bytes(b"earlier result")
    segments = _test_masks(ct_array)[:1]
    with pytest.raises(InputError, match="--force"):
        vio.write_output(str(out), segments, reference)
    assert out.read_bytes() == b"earlier result"
    vio.write_output(str(out), segments, reference, overwrite=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), segments[0][1].astype(np.uint8))


def test_mismatched_mask_is_refused(tmp_path, ct_path):
    reference = vio.read_volume(ct_path)
    with pytest.raises(InputError, match="has shape"):
        vio.write_output(str(tmp_path / "x.seg.nrrd"), [("small", np.ones((2, 2, 2), bool))], reference)
    assert os.listdir(tmp_path) == []


def _half_then_fail(path, *args, **kwargs):
    with open(path, "wb") as handle:
        handle.write(b"NRRD0004\npartial")
    raise OSError(28, "No space left on device")


def test_failed_seg_write_leaves_nothing(tmp_path, ct_path, ct_array, monkeypatch):
    reference = vio.read_volume(ct_path)
    monkeypatch.setattr(slicerio, "write_segmentation", _half_then_fail)
    with pytest.raises(InputError, match="No space left on device") as error:
        vio.write_output(str(tmp_path / "out.seg.nrrd"), _test_masks(ct_array), reference)
    one_line(error)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, ct_path, ct_array, monkeypatch):
    reference = vio.read_volume(ct_path)
    out = tmp_path / "labels.nii.gz"
    out.write_bytes(b"old labels")
    monkeypatch.setattr(sitk, "WriteImage", lambda image, path, *rest: _half_then_fail(path))
    with pytest.raises(InputError, match="cannot write"):
        vio.write_output(str(out), _test_masks(ct_array), reference, overwrite=True)
    assert os.listdir(tmp_path) == ["labels.nii.gz"] and out.read_bytes() == b"old labels"


def test_slicer_reads_the_seg_nrrd(tmp_path, ct_path, ct_array):
    """3D Slicer's own storage node (slicer-core) loads the file: names, colours, voxels in RAS."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLSegmentationStorageNode"):
        pytest.skip("slicer-core (Slicer's MRML libraries) is not installed")
    from vtk.util import numpy_support

    reference = vio.read_volume(ct_path)
    segments = _test_masks(ct_array)
    out = tmp_path / "for_slicer.seg.nrrd"
    vio.write_output(str(out), segments, reference)

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(out))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    for n, (name, mask) in enumerate(segments):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == name
        np.testing.assert_allclose(segment.GetColor(), vio.segment_color(n), atol=1e-5)
        labelmap = segment.GetRepresentation("Binary labelmap")
        extent = labelmap.GetExtent()
        dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in (2, 1, 0)]
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims)
        ijk = np.argwhere(values == segment.GetLabelValue())[:, ::-1] + [extent[0], extent[2], extent[4]]
        world = vtk_matrix(labelmap)
        ras = (world @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
        lps = ras * [-1, -1, 1]
        np.testing.assert_allclose(sorted_rows(lps), sorted_rows(physical_points(ct_path, mask)), atol=1e-3)


def vtk_matrix(oriented_image) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    oriented_image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_empty_segment_keeps_its_own_label(tmp_path, ct_path, ct_array):
    reference = vio.read_volume(ct_path)
    lung, bone = _test_masks(ct_array)[:2]
    segments = [lung, ("nothing yet", np.zeros(ct_array.shape, bool)), bone]
    out = tmp_path / "with_empty.seg.nrrd"
    vio.write_output(str(out), segments, reference)
    seg = slicerio.read_segmentation(str(out))
    assert len({(s["layer"], s["labelValue"]) for s in seg["segments"]}) == 3
    back = vio.read_segmentation_masks(str(out), reference)
    assert not back["nothing yet"].any()
    np.testing.assert_array_equal(back["bone"], bone[1])


def test_segmentation_of_another_volume_is_refused(tmp_path, ct_path, expert_seg_path):
    ct = vio.read_volume(ct_path)
    elsewhere = vio.Volume(ct.array, ct.spacing, ct.origin + [0.0, 0.0, 5000.0], ct.direction, "shifted")
    with pytest.raises(InputError, match="does not overlap"):
        vio.read_segmentation_masks(expert_seg_path, elsewhere)
