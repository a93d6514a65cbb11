"""Clinical outputs: DICOM Segmentation (SEG) and RT Structure Set (RTSTRUCT) objects.

Both reference the DICOM series the masks were computed on, so the input must be a DICOM series
folder (the series `volume_io.read_volume` reads: the largest one in the folder).

- **DICOM SEG** is written by highdicom (`highdicom.seg.Segmentation`): BINARY, one segment per
  mask, names kept, colours as the segment's recommended display CIELab value, frames referencing
  the source images (empty frames omitted), algorithm type AUTOMATIC.
- **RTSTRUCT** is written with pydicom, one ROI per segment (name and display colour kept). The
  contour method, documented for users: on every slice of the series (axis k), the mask is traced
  with marching squares (`skimage.measure.find_contours` at level 0.5 on the mask padded by one
  background voxel), so each contour runs half-way between foreground and background voxel
  centres; exactly collinear points are dropped (`approximate_polygon`, tolerance 0), which leaves
  the shape unchanged. Each contour is CLOSED_PLANAR in patient (LPS) millimetres and references
  its image. A hole gives its own contour on that slice: readers that fill contours with the
  even-odd rule (the usual convention in planning systems) recover it; voxel centres are never on
  a contour, so rasterising the contours at voxel centres returns exactly the mask.

No torch here; pydicom, highdicom and scikit-image are imported when a file is written.
"""
from __future__ import annotations

import datetime
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError

CLINICAL_FORMATS = ("dicom-seg", "rtstruct")
FORMATS = ("auto",) + CLINICAL_FORMATS
DICOM_EXTENSION = ".dcm"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RT references studies
_SERIES_NUMBER = {"dicom-seg": 9701, "rtstruct": 9702}


def output_format(path: str, fmt: Optional[str] = None) -> str:
    """'seg.nrrd', 'labelmap', 'dicom-seg' or 'rtstruct' for an output name and a --format value.

    `.dcm` means DICOM SEG unless `fmt` says rtstruct; a clinical format needs a `.dcm` name.
    """
    from .volume_io import output_kind

    fmt = (fmt or "auto").lower()
    if fmt in ("seg.nrrd", "labelmap"):  # a kind this function returned before
        fmt = "auto"
    if fmt not in FORMATS:
        raise InputError(f"unknown output format '{fmt}': use {', '.join(FORMATS)}")
    is_dicom = os.path.basename(str(path)).lower().endswith(DICOM_EXTENSION)
    if fmt == "auto":
        return "dicom-seg" if is_dicom else output_kind(path)
    if not is_dicom:
        raise InputError(f"format {fmt} writes a DICOM file: name the output '*{DICOM_EXTENSION}', not '{path}'")
    return fmt


def require_dicom_input(input_path: str, fmt: str) -> None:
    """A clinical output references a DICOM series: refuse any other input (or missing libraries) in one line."""
    if fmt in CLINICAL_FORMATS and not os.path.isdir(os.path.expanduser(str(input_path))):
        raise InputError(f"{fmt} output needs a DICOM series folder as input, not '{input_path}'")
    if fmt in CLINICAL_FORMATS:
        import importlib.util

        needed = ("pydicom", "highdicom") if fmt == "dicom-seg" else ("pydicom",)
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise InputError(f"{fmt} output needs {' and '.join(missing)}: pip install \"medsam-slicer[dicom]\"")


def check_output(path: str, input_path: str, fmt: Optional[str] = None, overwrite: bool = False) -> str:
    """Validates an output path (and, for clinical formats, the input) before any work; returns its format."""
    from .volume_io import check_output_path, check_writable_target

    kind = output_format(path, fmt)
    if kind not in CLINICAL_FORMATS:
        return check_output_path(path, overwrite)
    require_dicom_input(input_path, kind)
    check_writable_target(path, overwrite)
    return kind


def write_segments(path: str, segments: Sequence[Tuple[str, np.ndarray]], volume, input_path: str,
                   fmt: Optional[str] = None, overwrite: bool = False, algorithm: str = "MedSAMSlicer") -> str:
    """Writes (name, bool mask [k, j, i]) pairs in the format the name and `fmt` choose, atomically.

    Non-clinical formats go to `volume_io.write_output`; returns the format written.
    """
    from .volume_io import _atomic_write, _check_masks, write_output

    kind = output_format(path, fmt)
    if kind not in CLINICAL_FORMATS:
        write_output(path, segments, volume, overwrite=overwrite)
        return kind
    check_output(path, input_path, kind, overwrite)
    segments = _check_masks(segments, volume)
    sources = series_datasets(input_path, volume)
    if kind == "dicom-seg":
        dataset = build_dicom_seg(segments, sources, algorithm)
    else:
        dataset = build_rtstruct(segments, sources, volume, algorithm)
    _atomic_write(path, overwrite, lambda tmp: dataset.save_as(tmp, enforce_file_format=True))
    return kind


# ---------------------------------------------------------------- the source series


def series_datasets(folder: str, volume) -> list:
    """The source series' headers (pydicom, no pixel data) in slice order k = 0, 1, ...

    The series is the one `read_volume` picks (the largest in the folder). Each image's position
    is matched to a slice of `volume` through its geometry, so file names and order do not matter;
    an image off the volume's grid is refused rather than guessed.
    """
    import pydicom
    import SimpleITK as sitk

    folder = os.path.expanduser(str(folder))
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ())
    if not uids:
        raise InputError(f"folder '{folder}' holds no DICOM series")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid) for uid in uids}
    chosen = max(uids, key=lambda uid: len(files[uid]))  # read_volume's rule
    n_slices = volume.shape_kji[0]
    if len(files[chosen]) != n_slices:
        raise InputError(f"DICOM series in '{folder}' has {len(files[chosen])} images for {n_slices} slices: "
                         "clinical outputs need one image per slice")
    lps_to_ijk = np.linalg.inv(volume.ijk_to_lps())
    by_slice: List[Optional[object]] = [None] * n_slices
    for name in files[chosen]:
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient] + [1.0])
        i, j, k = (lps_to_ijk @ position)[:3]
        index = int(round(k))
        if abs(i) > 1e-2 or abs(j) > 1e-2 or abs(k - index) > 1e-2 or not 0 <= index < n_slices:
            raise InputError(f"DICOM image '{name}' is not on a slice of the volume read from '{folder}'")
        if by_slice[index] is not None:
            raise InputError(f"two DICOM images of '{folder}' lie on slice {index}")
        by_slice[index] = ds
    return by_slice


# ---------------------------------------------------------------- DICOM SEG


def _display_rgb(index: int) -> Tuple[int, int, int]:
    from .volume_io import segment_color

    return tuple(int(round(255 * c)) for c in segment_color(index))


def _software_version() -> str:
    from . import __version__

    return __version__


def build_dicom_seg(segments: Sequence[Tuple[str, np.ndarray]], sources: list, algorithm: str):
    """A highdicom Segmentation (BINARY) of the masks over the source images, one segment each."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=_software_version())
    descriptions = []
    for n, (name, _) in enumerate(segments):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n + 1,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,  # Slicer's default terminology for a new segment
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*_display_rgb(n)),
        ))
    stacked = np.stack([mask for _, mask in segments], axis=-1).astype(np.uint8)  # (k, rows, cols, segments)
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stacked,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBER["dicom-seg"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MedSAMSlicer",
        manufacturer_model_name=algorithm,
        software_versions=_software_version(),
        device_serial_number="none",
        content_label="MEDSAM",
        content_description=f"{algorithm} segmentation",
        omit_empty_frames=bool(stacked.any()),  # a SEG needs at least one frame
    )


# ---------------------------------------------------------------- RTSTRUCT


def slice_contours(mask2d: np.ndarray) -> List[np.ndarray]:
    """Closed contours of one slice's mask as (N, 2) arrays of (row, column) voxel coordinates.

    Marching squares at level 0.5 on the mask padded with background, so every contour is closed;
    the repeated closing point and exactly collinear points are dropped.
    """
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(np.asarray(mask2d, bool), 1).astype(np.float32)
    contours = []
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour, tolerance=0) - 1.0
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour) >= 3:
            contours.append(contour)
    return contours


def _copy(target, source, keywords: Sequence[str]) -> None:
    for keyword in keywords:
        setattr(target, keyword, getattr(source, keyword, None) or "")


def build_rtstruct(segments: Sequence[Tuple[str, np.ndarray]], sources: list, volume, algorithm: str):
    """An RT Structure Set: one ROI per segment, CLOSED_PLANAR contours in LPS mm per slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    first = sources[0]
    now = datetime.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    _copy(ds, first, ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                      "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                      "AccessionNumber", "StudyDescription"))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = _SERIES_NUMBER["rtstruct"]
    ds.SeriesDescription = f"{algorithm} contours"
    ds.InstanceNumber = 1
    ds.OperatorsName = ""
    ds.Manufacturer = "MedSAMSlicer"
    ds.ManufacturerModelName = algorithm
    ds.SoftwareVersions = _software_version()
    ds.StructureSetLabel = algorithm[:16]
    ds.StructureSetName = f"{algorithm} contours"[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime

    def image_reference(source):
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        return item

    frame_of_reference = first.FrameOfReferenceUID
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence([image_reference(s) for s in sources])
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_COMPONENT_SOP_CLASS
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    reference = Dataset()
    reference.FrameOfReferenceUID = frame_of_reference
    reference.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([reference])

    ijk_to_lps = volume.ijk_to_lps()
    rois, roi_contours, observations = [], [], []
    for n, (name, mask) in enumerate(segments):
        number = n + 1
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        roi.ROIName = name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm}, marching squares at half-voxel boundaries"[:64]
        rois.append(roi)
        contours = []
        for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
            for contour in slice_contours(mask[k]):
                rows, cols = contour[:, 0], contour[:, 1]
                ijk = np.stack([cols, rows, np.full_like(rows, float(k)), np.ones_like(rows)])
                points = (ijk_to_lps @ ijk)[:3].T
                item = Dataset()
                item.ContourImageSequence = DicomSequence([image_reference(sources[int(k)])])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(points)
                item.ContourData = [float(f"{v:.4f}") for v in points.ravel()]
                contours.append(item)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(_display_rgb(n))
        roi_contour.ReferencedROINumber = number
        if contours:
            roi_contour.ContourSequence = DicomSequence(contours)
        roi_contours.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = ""
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return ds
