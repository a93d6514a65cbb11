"""DICOM SEG and RTSTRUCT outputs on a DICOM CT series built from slicerio's CT sample.

The files are read back with pydicom alone (not highdicom, not our writer's code): SEG frames are
unpacked and placed by their ImagePositionPatient, RTSTRUCT contours are mapped through their
referenced image's position, orientation and spacing and filled with the even-odd rule.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from medsam_slicer.cli import main  # noqa: E402
from medsam_slicer.clinical_io import output_format, slice_contours, write_segments  # noqa: E402
from medsam_slicer.errors import InputError  # noqa: E402
from medsam_slicer.volume_io import read_volume  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_ct_series(nrrd_path: str, folder: str, seed: int = 0) -> dict:
    """The CT sample as a single-frame CT series (int16 HU), files named in shuffled order."""
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image = sitk.ReadImage(nrrd_path)
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    direction = np.reshape(image.GetDirection(), (3, 3))
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    os.makedirs(folder, exist_ok=True)
    names = [f"IM{n:04d}.dcm" for n in range(array.shape[0])]
    random.Random(seed).shuffle(names)
    for k in range(array.shape[0]):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Chest", "CTCHEST4", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 3, k + 1, "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in origin + direction[:, 2] * spacing[2] * k]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = array.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = array[k].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(os.path.join(folder, names[k]), enforce_file_format=True)
    return uids


@pytest.fixture(scope="session")
def ct_dicom(ct_path, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dicom") / "ct")
    uids = write_ct_series(ct_path, folder)
    return folder, uids


def source_by_position(folder):
    """SOPInstanceUID -> dataset, and the datasets' geometry, read with pydicom."""
    out = {}
    for name in os.listdir(folder):
        ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
        out[ds.SOPInstanceUID] = ds
    return out


def slice_index_of(volume, position):
    ijk = np.linalg.inv(volume.ijk_to_lps()) @ np.append(np.asarray(position, float), 1.0)
    assert np.allclose(ijk[:2], 0, atol=1e-3) and abs(ijk[2] - round(ijk[2])) < 1e-3
    return int(round(ijk[2]))


def read_seg_masks(path, volume):
    """name -> bool [k, j, i], from the SEG's frames and their plane positions (pydicom only)."""
    ds = pydicom.dcmread(path)
    assert ds.SegmentationType == "BINARY"
    rows, cols, frames = ds.Rows, ds.Columns, int(ds.NumberOfFrames)
    bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")[: rows * cols * frames]
    pixels = bits.reshape(frames, rows, cols).astype(bool)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    masks = {name: np.zeros(volume.shape_kji, bool) for name in names.values()}
    shared = ds.SharedFunctionalGroupsSequence[0]
    for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        identification = group if "SegmentIdentificationSequence" in group else shared  # one segment: shared
        number = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = slice_index_of(volume, group.PlanePositionSequence[0].ImagePositionPatient)
        masks[names[number]][k] |= pixels[n]
    return ds, masks


def read_rtstruct_masks(path, sources, volume):
    """name -> bool [k, j, i]: each contour mapped through its referenced image, filled even-odd."""
    from skimage.draw import polygon

    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    masks, colours = {}, {}
    for roi in ds.ROIContourSequence:
        name = names[int(roi.ReferencedROINumber)]
        colours[name] = [int(v) for v in roi.ROIDisplayColor]
        mask = masks.setdefault(name, np.zeros(volume.shape_kji, bool))
        for contour in getattr(roi, "ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            image = sources[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
            assert len(points) == int(contour.NumberOfContourPoints)
            row_dir, col_dir = np.asarray(image.ImageOrientationPatient[:3]), np.asarray(image.ImageOrientationPatient[3:])
            offset = points - np.asarray(image.ImagePositionPatient, float)
            assert np.allclose(offset @ np.cross(row_dir, col_dir), 0, atol=1e-3)  # on the image's plane
            col = offset @ row_dir / float(image.PixelSpacing[1])
            row = offset @ col_dir / float(image.PixelSpacing[0])
            k = slice_index_of(volume, image.ImagePositionPatient)
            rr, cc = polygon(row, col, shape=volume.shape_kji[1:])
            fill = np.zeros(volume.shape_kji[1:], bool)
            fill[rr, cc] = True
            mask[k] ^= fill  # even-odd: a hole's contour removes what its outline filled
    return ds, masks, colours


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def synthetic_masks(shape):
    """A blob with a hole and an island in the hole, and an overlapping box segment."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ring = ((j - 60) ** 2 + (i - 50) ** 2 < 30 ** 2) & (abs(k - 17) <= 6)
    hole = (j - 60) ** 2 + (i - 50) ** 2 < 10 ** 2
    island = (j - 60) ** 2 + (i - 50) ** 2 < 3 ** 2
    blob = (ring & ~hole) | (ring & island)
    blob[17, 5, 5] = blob[17, 6, 6] = True  # two voxels touching diagonally, on the edge area
    box = np.zeros(shape, bool)
    box[10:13, 40:90, 70:120] = True
    return [("tumour ring", blob), ("liver", box)]


def test_output_format_rules():
    assert output_format("a.dcm") == "dicom-seg"
    assert output_format("a.DCM", "rtstruct") == "rtstruct"
    assert output_format("a.seg.nrrd") == "seg.nrrd" and output_format("a.nii.gz", "auto") == "labelmap"
    with pytest.raises(InputError, match="name the output"):
        output_format("a.seg.nrrd", "rtstruct")
    with pytest.raises(InputError, match="unknown output format"):
        output_format("a.dcm", "rt")


def test_contours_rasterise_back_exactly():
    from skimage.draw import polygon

    _, masks = zip(*synthetic_masks((34, 128, 128)))
    mask = masks[0][17]
    fill = np.zeros(mask.shape, bool)
    for contour in slice_contours(mask):
        rr, cc = polygon(contour[:, 0], contour[:, 1], shape=mask.shape)
        part = np.zeros(mask.shape, bool)
        part[rr, cc] = True
        fill ^= part
    np.testing.assert_array_equal(fill, mask)


def test_dicom_seg_round_trip(ct_dicom, tmp_path):
    folder, uids = ct_dicom
    volume = read_volume(folder)
    segments = synthetic_masks(volume.shape_kji)
    out = str(tmp_path / "seg.dcm")
    assert write_segments(out, segments, volume, folder) == "dicom-seg"
    assert os.listdir(tmp_path) == ["seg.dcm"]  # atomic: no scratch left
    ds, masks = read_seg_masks(out, volume)
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == uids["study"]
    assert ds.FrameOfReferenceUID == uids["frame"] and ds.PatientID == "CTCHEST4"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    assert ds.SeriesInstanceUID != uids["series"]
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], volume.spacing[[1, 0]])
    assert np.allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                       np.concatenate([volume.direction[:, 0], volume.direction[:, 1]]), atol=1e-6)
    # Each frame's source image is the image at the frame's position.
    sources = source_by_position(folder)
    for group in ds.PerFrameFunctionalGroupsSequence:
        ref = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose([float(v) for v in sources[ref].ImagePositionPatient],
                           [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
    assert list(masks) == ["tumour ring", "liver"]
    for name, mask in segments:
        assert dice(masks[name], mask) >= 0.95
        np.testing.assert_array_equal(masks[name], mask)
    with pytest.raises(InputError, match="already exists"):
        write_segments(out, segments, volume, folder)


def test_rtstruct_round_trip(ct_dicom, tmp_path):
    folder, uids = ct_dicom
    volume = read_volume(folder)
    segments = synthetic_masks(volume.shape_kji)
    out = str(tmp_path / "rt.dcm")
    assert write_segments(out, segments, volume, folder, fmt="rtstruct") == "rtstruct"
    sources = source_by_position(folder)
    ds, masks, colours = read_rtstruct_masks(out, sources, volume)
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert ds.StudyInstanceUID == uids["study"] and ds.PatientID == "CTCHEST4"
    reference = ds.ReferencedFrameOfReferenceSequence[0]
    assert reference.FrameOfReferenceUID == uids["frame"]
    series = reference.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == uids["series"]
    assert {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence} == set(sources)
    assert all(r.ReferencedFrameOfReferenceUID == uids["frame"] for r in ds.StructureSetROISequence)
    assert list(masks) == ["tumour ring", "liver"]
    assert colours["tumour ring"] != colours["liver"]
    for name, mask in segments:
        assert dice(masks[name], mask) >= 0.95
        np.testing.assert_array_equal(masks[name], mask)


def test_clinical_output_needs_a_dicom_series(capsys, tmp_path, ct_path, tiny_checkpoint):
    code = main(["segment", ct_path, "-o", str(tmp_path / "x.dcm"), "--box", "20", "30", "17", "60", "95", "17",
                 "--checkpoint", tiny_checkpoint, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a DICOM series folder" in err and len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_segment_command_writes_rtstruct_and_seg(capsys, ct_dicom, tmp_path, tiny_checkpoint):
    folder, uids = ct_dicom
    volume = read_volume(folder)
    common = ["--box", "20", "30", "17", "60", "95", "17", "--name", "lung", "--checkpoint", tiny_checkpoint,
              "--precision", "fp32", "--quiet"]
    seg_out, rt_out, nrrd_out = tmp_path / "lung.dcm", tmp_path / "lung_rt.dcm", tmp_path / "lung.seg.nrrd"
    assert main(["segment", folder, "-o", str(nrrd_out), *common]) == 0
    assert main(["segment", folder, "-o", str(seg_out), *common]) == 0
    assert main(["segment", folder, "-o", str(rt_out), "--format", "rtstruct", *common]) == 0
    capsys.readouterr()
    from medsam_slicer.volume_io import read_segmentation_masks

    expected = read_segmentation_masks(str(nrrd_out), reference=volume)["lung"]
    assert expected[17].any()
    _, seg_masks = read_seg_masks(str(seg_out), volume)
    _, rt_masks, _ = read_rtstruct_masks(str(rt_out), source_by_position(folder), volume)
    np.testing.assert_array_equal(seg_masks["lung"], expected)
    np.testing.assert_array_equal(rt_masks["lung"], expected)
