"""Reading volumes and writing results, with the input's geometry, atomically.

Geometry is SimpleITK's: LPS physical space, `origin`, `spacing` and a 3x3 `direction` whose
column n is the direction of voxel axis n (i, j, k). Arrays are indexed [k, j, i].

Choices (documented for users):
- A DICOM folder holding several series: the series with the most files is read and a note
  saying so is added to `Volume.notes`; pass `series_uid` to pick another.
- 2D images (PNG, JPEG, BMP, TIFF) become one-slice volumes; RGB(A) becomes (1, H, W, 3) uint8.
  Colour volumes with several slices, 4D volumes and other multi-component images are refused.
- Overlapping segments: a `.seg.nrrd` keeps them all (as Slicer does, on separate layers);
  label maps cannot, so there a later segment wins over an earlier one.
- `SegmentN_Extent` is the extent of the segment's layer, as Slicer itself writes it (older
  Slicer versions cropped every segment of a layer to the first segment's extent).
"""
from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError

LABELMAP_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SEG_EXTENSION = ".seg.nrrd"
_IMAGE_FORMATS = "NRRD, NIfTI, MetaImage, DICOM, PNG, JPEG, BMP or TIFF"
# Slicer's default terminology for a new segment ("Tissue"), so Slicer shows no warning.
_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^"
)


@dataclass
class Volume:
    array: np.ndarray  # [k, j, i], or (1, H, W, 3) uint8 for a colour image
    spacing: np.ndarray  # (3,) mm along i, j, k
    origin: np.ndarray  # (3,) LPS mm of voxel (0, 0, 0)
    direction: np.ndarray  # (3, 3); column n = LPS direction of voxel axis n
    path: str = ""
    notes: Tuple[str, ...] = field(default_factory=tuple)  # things a front end should tell the user

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4

    @property
    def shape_kji(self) -> Tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[:3])

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix taking homogeneous voxel indices (i, j, k, 1) to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction, float) * np.asarray(self.spacing, float)
        matrix[:3, 3] = self.origin
        return matrix

    def to_sitk(self, array: Optional[np.ndarray] = None):
        """A SimpleITK image of `array` ([k, j, i], default: the volume's own) with this geometry."""
        import SimpleITK as sitk

        data = self.array if array is None else np.asarray(array)
        if data.shape[:3] != self.array.shape[:3]:
            raise InputError(f"array of shape {data.shape[:3]} does not match the volume {self.array.shape[:3]}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=data.ndim == 4)
        image.SetSpacing([float(v) for v in self.spacing])
        image.SetOrigin([float(v) for v in self.origin])
        image.SetDirection([float(v) for v in np.asarray(self.direction, float).ravel()])
        return image


# ---------------------------------------------------------------- reading


def read_volume(path: str, series_uid: Optional[str] = None) -> Volume:
    """Reads an image file or a DICOM series folder into a 3D Volume (never a traceback)."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise InputError(f"input not found: '{path}'")
    notes: Tuple[str, ...] = ()
    if os.path.isdir(path):
        image, notes = _read_dicom_folder(path, series_uid)
    else:
        image = _read_file(path)
    return _to_volume(image, path, notes)


def _sitk_reason(error: Exception) -> str:
    """The last line of a SimpleITK error, without its source-file prefix."""
    line = str(error).strip().splitlines()[-1]
    return line.replace("sitk::ERROR: ", "").strip()


def _read_file(path: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        return reader.Execute()
    except RuntimeError as error:
        reason = _sitk_reason(error)
        if "Unable to determine ImageIO" in reason:
            raise InputError(f"cannot read '{path}': not an image file ({_IMAGE_FORMATS})") from None
        raise InputError(f"cannot read '{path}': {reason}") from None


def _read_dicom_folder(folder: str, series_uid: Optional[str]):
    import SimpleITK as sitk

    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ())
    if not uids:
        raise InputError(f"folder '{folder}' holds no DICOM series")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid) for uid in uids}
    notes: Tuple[str, ...] = ()
    if series_uid is not None:
        if series_uid not in files:
            raise InputError(f"folder '{folder}' has no DICOM series {series_uid}; it has {', '.join(uids)}")
        chosen = series_uid
    else:
        chosen = max(uids, key=lambda uid: len(files[uid]))
        if len(uids) > 1:
            others = ", ".join(f"{uid} ({len(files[uid])} files)" for uid in uids if uid != chosen)
            notes = (f"folder holds {len(uids)} DICOM series; read the largest, {chosen} "
                     f"({len(files[chosen])} files); others: {others}",)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    try:
        return reader.Execute(), notes
    except RuntimeError as error:
        raise InputError(f"cannot read DICOM series {chosen} in '{folder}': {_sitk_reason(error)}") from None


def _to_volume(image, path: str, notes: Tuple[str, ...]) -> Volume:
    import SimpleITK as sitk

    dim = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if dim not in (2, 3):
        raise InputError(f"'{path}' is a {dim}D image; only 2D images and 3D volumes are supported")
    array = sitk.GetArrayFromImage(image)
    if components > 1:
        if components not in (3, 4) or (dim == 3 and array.shape[0] > 1):
            kind = "a colour volume with several slices" if components in (3, 4) else f"{components} values per voxel"
            raise InputError(f"'{path}' has {kind}; only grey volumes and 2D colour images are supported")
        array = _to_rgb8(array[..., :3], path)
    if dim == 2:
        array = array[np.newaxis]
        spacing = list(image.GetSpacing()) + [1.0]
        origin = list(image.GetOrigin()) + [0.0]
        direction = np.eye(3)
        direction[:2, :2] = np.reshape(image.GetDirection(), (2, 2))
    else:
        spacing, origin = image.GetSpacing(), image.GetOrigin()
        direction = np.reshape(image.GetDirection(), (3, 3))
    return Volume(array, np.array(spacing, float), np.array(origin, float), np.array(direction, float), path, notes)


def _to_rgb8(rgb: np.ndarray, path: str) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype == np.uint16:  # 16-bit colour PNG/TIFF: keep the top 8 bits
        return (rgb >> 8).astype(np.uint8)
    raise InputError(f"'{path}' is a colour image of type {rgb.dtype}; only 8- or 16-bit colour is supported")


# ---------------------------------------------------------------- output paths


def output_kind(path: str) -> str:
    """'seg.nrrd' or 'labelmap', from the file name; anything else is refused."""
    name = os.path.basename(str(path)).lower()
    if name.endswith(SEG_EXTENSION):
        return "seg.nrrd"
    if name.endswith(LABELMAP_EXTENSIONS):
        return "labelmap"
    raise InputError(
        f"cannot tell the output format of '{path}': use {SEG_EXTENSION} or a label map "
        f"({', '.join(LABELMAP_EXTENSIONS)})"
    )


def check_output_path(path: str, overwrite: bool = False) -> str:
    """Validates an output path before any work is done; returns its kind (see output_kind)."""
    kind = output_kind(os.path.expanduser(str(path)))
    check_writable_target(path, overwrite)
    return kind


def check_writable_target(path: str, overwrite: bool = False) -> None:
    """The output's folder exists and is writable, the path is no folder, and no file is replaced
    without `overwrite`: one-line InputErrors, before any work is done."""
    path = os.path.expanduser(str(path))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"output folder does not exist: '{folder}'")
    if os.path.isdir(path):
        raise InputError(f"output '{path}' is a folder")
    if os.path.exists(path) and not overwrite:
        raise InputError(f"output '{path}' already exists (use --force to overwrite it)")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: '{folder}'")


def _atomic_write(path: str, overwrite: bool, write) -> None:
    """Calls write(temporary path) in a scratch folder beside `path`, then moves the results in.

    A scratch folder (not just a scratch file) because MetaImage .mhd writes a second data file
    named after the header. On any failure nothing new is left in the destination folder.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    folder, name = os.path.split(path)
    try:
        scratch = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise InputError(f"cannot write in '{folder}': {error.strerror or error}") from None
    moved: List[str] = []
    try:
        try:
            write(os.path.join(scratch, name))
        except (OSError, RuntimeError) as error:
            reason = _sitk_reason(error) if isinstance(error, RuntimeError) else error.strerror or str(error)
            raise InputError(f"cannot write '{path}': {reason}") from None
        produced = sorted(os.listdir(scratch), key=lambda n: n == name)  # the named file last
        for entry in produced:
            target = os.path.join(folder, entry)
            if os.path.exists(target) and not overwrite:
                raise InputError(f"output '{target}' already exists (use --force to overwrite it)")
        for entry in produced:
            os.replace(os.path.join(scratch, entry), os.path.join(folder, entry))
            moved.append(os.path.join(folder, entry))
    except BaseException:
        for target in moved:
            if os.path.exists(target):
                os.remove(target)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------- writing


def _check_masks(segments: Sequence[Tuple[str, np.ndarray]], reference: Volume) -> List[Tuple[str, np.ndarray]]:
    if not segments:
        raise InputError("nothing to write: no segments")
    checked = []
    for name, mask in segments:
        mask = np.asarray(mask)
        if mask.shape != reference.shape_kji:
            raise InputError(f"segment '{name}' has shape {mask.shape}, the volume {reference.shape_kji}")
        checked.append((str(name), mask.astype(bool, copy=False)))
    return checked


def write_output(path: str, segments: Sequence[Tuple[str, np.ndarray]], reference: Volume,
                 overwrite: bool = False) -> str:
    """Writes (name, bool mask [k, j, i]) pairs as a .seg.nrrd or a label map; returns the kind."""
    kind = check_output_path(path, overwrite)
    segments = _check_masks(segments, reference)
    if kind == "seg.nrrd":
        _atomic_write(path, overwrite, lambda tmp: _write_seg_nrrd(tmp, segments, reference))
    else:
        labels = labelmap_from_masks(segments)
        _atomic_write(path, overwrite, lambda tmp: _write_sitk(tmp, labels, reference))
    return kind


def labelmap_from_masks(segments: Sequence[Tuple[str, np.ndarray]]) -> np.ndarray:
    """Label n (1-based) for segment n; where segments overlap the later one wins."""
    if len(segments) > np.iinfo(np.uint16).max:
        raise InputError(f"too many segments for a label map ({len(segments)})")
    dtype = np.uint8 if len(segments) <= np.iinfo(np.uint8).max else np.uint16
    labels = np.zeros(segments[0][1].shape, dtype)
    for value, (_, mask) in enumerate(segments, start=1):
        labels[mask] = value
    return labels


def write_probabilities(path: str, prob: np.ndarray, reference: Volume, overwrite: bool = False) -> None:
    """Writes a float32 probability map [k, j, i] (0 where nothing was segmented) as a plain image."""
    if check_output_path(path, overwrite) != "labelmap":
        raise InputError(f"probabilities cannot be written as {SEG_EXTENSION}: use {', '.join(LABELMAP_EXTENSIONS)}")
    prob = np.asarray(prob, dtype=np.float32)
    if prob.shape != reference.shape_kji:
        raise InputError(f"probabilities have shape {prob.shape}, the volume {reference.shape_kji}")
    _atomic_write(path, overwrite, lambda tmp: _write_sitk(tmp, prob, reference))


def _write_sitk(path: str, array: np.ndarray, reference: Volume) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(reference.to_sitk(array), path, True)  # compressed where the format allows


def segment_color(index: int) -> Tuple[float, float, float]:
    """Distinct colours: hues a golden-ratio step apart, saturated and bright enough to see on CT."""
    hue = (0.08 + index * 0.618033988749895) % 1.0
    return tuple(round(c, 6) for c in colorsys.hsv_to_rgb(hue, 0.7, 0.95))


def _assign_layers(masks: Sequence[np.ndarray]) -> List[int]:
    """First layer where a segment overlaps no earlier one, as Slicer shares labelmaps."""
    layers: List[np.ndarray] = []
    chosen = []
    for mask in masks:
        for n, used in enumerate(layers):
            if not np.any(used & mask):
                used |= mask
                chosen.append(n)
                break
        else:
            layers.append(mask.copy())
            chosen.append(len(layers) - 1)
    return chosen


def _extent_ijk(mask_kji: np.ndarray) -> List[int]:
    """Inclusive [i0, i1, j0, j1, k0, k1] of the foreground; Slicer's empty extent when none."""
    if not mask_kji.any():
        return [0, -1, 0, -1, 0, -1]
    extent = []
    for dim in (2, 1, 0):
        other = tuple(d for d in range(3) if d != dim)
        hits = np.flatnonzero(mask_kji.any(axis=other))
        extent += [int(hits[0]), int(hits[-1])]
    return extent


def _reference_geometry_string(reference: Volume) -> str:
    """Slicer's 'Reference image geometry': IJK-to-RAS row by row, then the extent, ';'-separated."""
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ reference.ijk_to_lps()
    k, j, i = reference.shape_kji
    values = [f"{v:.17g}" for v in ijk_to_ras.ravel()] + [str(v) for v in (0, i - 1, 0, j - 1, 0, k - 1)]
    return ";".join(values) + ";"


def _write_seg_nrrd(path: str, segments: Sequence[Tuple[str, np.ndarray]], reference: Volume) -> None:
    import slicerio

    if len(segments) > np.iinfo(np.uint8).max:
        raise InputError(f"too many segments for one .seg.nrrd ({len(segments)})")
    layer_of = _assign_layers([mask for _, mask in segments])
    n_layers = max(layer_of) + 1
    voxels = np.zeros((n_layers,) + reference.shape_kji, np.uint8)
    labels, used_in_layer = [], [0] * n_layers
    for (_, mask), layer in zip(segments, layer_of):
        used_in_layer[layer] += 1  # counted, not read from voxels: an empty segment still gets its own value
        labels.append(used_in_layer[layer])
        voxels[layer][mask] = labels[-1]
    layer_extents = [_extent_ijk(voxels[n] > 0) for n in range(n_layers)]
    described = []
    for n, ((name, _), layer, label) in enumerate(zip(segments, layer_of, labels)):
        described.append({
            "id": f"Segment_{n + 1}",
            "name": name,
            "nameAutoGenerated": False,
            "color": list(segment_color(n)),
            "colorAutoGenerated": False,
            "labelValue": label,
            "layer": layer,
            "extent": layer_extents[layer],
            "status": "inprogress",  # a model's result: to be reviewed
            "terminology": slicerio.segmentation.terminology_entry_from_string(_TERMINOLOGY),
        })
    # slicerio writes (i, j, k) arrays in Fortran order: the transpose of [k, j, i] is free.
    ijk_voxels = voxels[0].transpose(2, 1, 0) if n_layers == 1 else voxels.transpose(0, 3, 2, 1)
    segmentation = {
        "voxels": ijk_voxels,
        "ijkToLPS": reference.ijk_to_lps(),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [{
            "name": "Reference image geometry",
            "value": _reference_geometry_string(reference),
            "description": "Image geometry description string determining the geometry of the labelmap"
                           " that is created in course of conversion.",
        }],
        "segments": described,
    }
    slicerio.write_segmentation(path, segmentation, compression_level=6)


# ---------------------------------------------------------------- reading segmentations


def read_segmentation_masks(path: str, reference: Optional[Volume] = None) -> Dict[str, np.ndarray]:
    """Segment name -> bool mask [k, j, i].

    Without a reference the masks are in the file's own voxel grid; with one they are resampled
    (nearest neighbour, by physical position) onto the reference's grid, which handles files
    Slicer cropped to the segments' extent. A plain label map gives names 'label N'.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise InputError(f"segmentation not found: '{path}'")
    if os.path.basename(path).lower().endswith(SEG_EXTENSION):
        layers, geometry, segments = _read_seg_layers(path)
    else:
        labelmap = read_volume(path)
        if labelmap.is_rgb or not np.issubdtype(labelmap.array.dtype, np.integer):
            raise InputError(f"'{path}' is not a label map (integer voxels expected)")
        layers, geometry = [labelmap.array], labelmap
        values = [int(v) for v in np.unique(labelmap.array) if v != 0]
        segments = [(f"label {v}", 0, v) for v in values]
    if reference is not None:
        had_voxels = any(layer.any() for layer in layers)
        layers = [_resample_nearest(layer, geometry, reference) for layer in layers]
        if had_voxels and not any(layer.any() for layer in layers):
            raise InputError(f"segmentation '{path}' does not overlap the volume it was given with")
    return {name: layers[layer] == value for name, layer, value in segments}


def _read_seg_layers(path: str):
    """Layers as [k, j, i] arrays, their geometry, and (name, layer, label value) per segment."""
    import slicerio

    try:
        seg = slicerio.read_segmentation(path)
    except Exception as error:  # slicerio/pynrrd raise several kinds on a malformed file
        raise InputError(f"cannot read segmentation '{path}': {error}") from None
    voxels = seg["voxels"]
    if voxels.ndim == 3:
        layers = [voxels.transpose(2, 1, 0)]
    elif voxels.ndim == 4:
        layers = [voxels[n].transpose(2, 1, 0) for n in range(voxels.shape[0])]
    else:
        raise InputError(f"segmentation '{path}' has {voxels.ndim} dimensions, expected 3 or 4")
    matrix = np.asarray(seg["ijkToLPS"], float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    geometry = Volume(layers[0], spacing, matrix[:3, 3].copy(), matrix[:3, :3] / spacing, path)
    segments = [
        (s.get("name", s["id"]), s.get("layer", 0), s.get("labelValue", 1)) for s in seg["segments"]
    ]
    return layers, geometry, segments


def _same_grid(a: Volume, b: Volume) -> bool:
    return (a.shape_kji == b.shape_kji and np.allclose(a.spacing, b.spacing, atol=1e-4)
            and np.allclose(a.origin, b.origin, atol=1e-3) and np.allclose(a.direction, b.direction, atol=1e-5))


def _resample_nearest(layer: np.ndarray, geometry: Volume, reference: Volume) -> np.ndarray:
    import SimpleITK as sitk

    source = Volume(layer, geometry.spacing, geometry.origin, geometry.direction)
    if _same_grid(source, reference):
        return layer
    target = Volume(np.zeros(reference.shape_kji, np.uint8), reference.spacing, reference.origin,
                    reference.direction)
    resampled = sitk.Resample(source.to_sitk(), target.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled)
