"""Labelled volumes for the accuracy evaluation, each as (case, volume file, {structure: truth mask}).

ctchest    slicerio's CT chest sample and its expert segmentation (12 structures; installed with the
           test extra).
tumours    pyradiomics' five test cases (BSD licence): two brain MR (6.5 mm slices), one breast MR,
           two lung CT (5 mm slices), each with one tumour label. They ship only in the project's
           source archive on PyPI (34 MB), which is downloaded once from the registry, checked
           against its pinned SHA-256 and unpacked into the cache.
brain      an MR organ set: the Colin27 T1 brain (MRIcron's ch2 template, Debian's mricron-data
           package, fetched with `apt-get download`) with the AAL atlas regions that were drawn on
           this very brain (caudate, putamen, thalamus, hippocampus, left and right) and the brain
           itself (the skull-stripped ch2bet > 0). Every third 1 mm axial slice is kept: a 3 mm
           axial series, as clinical MR is often acquired.
abdomen    an abdominal CT (3 mm voxels, 30 slices) and an abdominal MR (3 mm, 20 slices) with seven
           organs each (spleen, kidneys, gallbladder, liver, stomach, pancreas): TotalSegmentator's test
           cases (Apache-2.0), from its source archive on PyPI (38 MB, fetched with pip, SHA-256
           pinned). Their labels are TotalSegmentator's own output, not an expert's: a strong model's
           contours, good on large organs, coarser on the pancreas and where organs touch.
           The CT also holds both lungs' bases (its lung labels lie on soft tissue, so they are
           not used): each is taken as a 3D component of air below -400 HU inside the body that
           lies wholly in the upper half of the volume (bowel gas reaches its lower slices), which
           is where a lung base ends as a thin crescent around the liver's or the spleen's dome.
files      your own: any volume the engine reads (NRRD, NIfTI, MHA, a DICOM folder) with its labels, a
           Slicer .seg.nrrd (segment names kept) or an integer label map (named "label N", or as
           `names` says), resampled onto the volume's grid by physical position (`files_case`).
"""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import tarfile
import tempfile
import urllib.request
from typing import Dict, Iterator, Tuple

import numpy as np

PYRADIOMICS_SDIST = (
    "https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/"
    "pyradiomics-3.1.0.tar.gz"
)
PYRADIOMICS_SHA256 = "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4"
TUMOUR_CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")
# AAL atlas values (aal.nii.txt) of regions with a visible boundary on T1
AAL_REGIONS = {"caudate": (71, 72), "putamen": (73, 74), "thalamus": (77, 78), "hippocampus": (37, 38)}
BRAIN_SLICE_STEP = 3
TOTALSEG_SDIST = "totalsegmentator==2.18.0"
TOTALSEG_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
# TotalSegmentator's label values (its class map, tasks "total" and "total_mr": the same numbers)
ABDOMEN_ORGANS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "liver", 6: "stomach",
                  7: "pancreas"}
ABDOMEN_CASES = {"abdomen-ct": ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
                 "abdomen-mr": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz")}
DATASETS = ("ctchest", "tumours", "brain", "abdomen")


def _unpack(archive: str, sha256: str, out: str, keep) -> None:
    """Checks `archive` against its pinned SHA-256 and unpacks the files whose member path `keep`
    accepts, flat, into `out` (all or nothing: staged beside it, then moved into place)."""
    with open(archive, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{os.path.basename(archive)} has SHA-256 {digest}, expected {sha256}")
    staging = os.path.join(os.path.dirname(archive), "data")
    os.makedirs(staging)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and keep(member.name):
                with tar.extractfile(member) as src, open(os.path.join(staging, os.path.basename(member.name)), "wb") as dst:
                    dst.write(src.read())
    os.replace(staging, out)


def tumour_dir(cache_dir: str) -> str:
    """The unpacked pyradiomics test cases, downloaded on first use."""
    out = os.path.join(cache_dir, "pyradiomics-3.1.0-data")
    if all(os.path.exists(os.path.join(out, f"{c}_label.nrrd")) for c in TUMOUR_CASES):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        archive = os.path.join(tmp, "sdist.tar.gz")
        urllib.request.urlretrieve(PYRADIOMICS_SDIST, archive)
        _unpack(archive, PYRADIOMICS_SHA256, out, lambda path: path.split("/")[-2:-1] == ["data"] and path.endswith(".nrrd"))
    return out


def brain_dir(cache_dir: str) -> str:
    """MRIcron's templates folder, unpacked from Debian's mricron-data package on first use."""
    out = os.path.join(cache_dir, "mricron-data")
    templates = os.path.join(out, "usr", "share", "mricron", "templates")
    if os.path.exists(os.path.join(templates, "aal.nii.gz")):
        return templates
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        subprocess.run(["apt-get", "download", "mricron-data"], cwd=tmp, check=True, capture_output=True)
        (deb,) = glob.glob(os.path.join(tmp, "mricron-data_*.deb"))
        staging = os.path.join(tmp, "x")
        subprocess.run(["dpkg-deb", "-x", deb, staging], check=True)
        os.replace(staging, out)
    return templates


def abdomen_dir(cache_dir: str) -> str:
    """TotalSegmentator's test images and labels, unpacked from its source archive on first use."""
    import sys

    out = os.path.join(cache_dir, "totalsegmentator-2.18.0-data")
    wanted = [name for pair in ABDOMEN_CASES.values() for name in pair]
    if all(os.path.exists(os.path.join(out, name)) for name in wanted):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", tmp, TOTALSEG_SDIST], check=True, capture_output=True)
        (archive,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        _unpack(archive, TOTALSEG_SHA256, out, lambda path: path.endswith(tuple(f"/tests/reference_files/{n}" for n in wanted)))
    return out


def _brain_case(cache_dir: str):
    import SimpleITK as sitk

    from medsam_slicer.volume_io import Volume

    folder = brain_dir(cache_dir)
    step = BRAIN_SLICE_STEP

    def read(name: str):
        return sitk.ReadImage(os.path.join(folder, name))

    image = read("ch2.nii.gz")
    array = sitk.GetArrayFromImage(image)[::step].astype(np.int16)
    spacing = tuple(image.GetSpacing()[:2]) + (image.GetSpacing()[2] * step,)
    volume = Volume(array=array, spacing=np.asarray(spacing), origin=np.asarray(image.GetOrigin()),
                    direction=np.asarray(image.GetDirection()).reshape(3, 3), path="ch2.nii.gz")
    atlas = sitk.GetArrayFromImage(read("aal.nii.gz"))[::step]
    truths = {}
    for region, (left, right) in AAL_REGIONS.items():
        truths[f"left {region}"] = atlas == left
        truths[f"right {region}"] = atlas == right
    truths["brain"] = sitk.GetArrayFromImage(read("ch2bet.nii.gz"))[::step] > 0
    return volume, truths


def _air_inside_body(array: np.ndarray, air_hu: float, body_hu: float):
    """(labels, count) of the 3D components of air (< air_hu) inside the body (each slice's filled
    outline above body_hu)."""
    from scipy import ndimage

    body = np.stack([ndimage.binary_fill_holes(ndimage.binary_opening(s > body_hu)) for s in array])
    return ndimage.label((array < air_hu) & body)


def lung_bases(volume, air_hu: float = -400.0, body_hu: float = -300.0, min_voxels: int = 500) -> Dict[str, np.ndarray]:
    """{"right lung base", "left lung base": mask} of an abdominal CT: the 3D components of air
    (< air_hu) inside the body (each slice's filled outline above body_hu) of at least min_voxels
    that lie wholly in the volume's upper half (k increasing towards the head), named by side."""
    labels, count = _air_inside_body(volume.array, air_hu, body_hu)
    half = volume.array.shape[0] // 2
    found = []
    for c in range(1, count + 1):
        part = labels == c
        ks = np.flatnonzero(part.any(axis=(1, 2)))
        if part.sum() >= min_voxels and ks[0] >= half:
            i_mean = np.nonzero(part)[2].mean()
            found.append((float(np.asarray(volume.direction)[0, 0]) * i_mean, part))  # LPS x: smaller is right
    if len(found) != 2:
        raise RuntimeError(f"expected both lung bases in the abdominal CT, found {len(found)} air components")
    (_, right), (_, left) = sorted(found, key=lambda item: item[0])
    return {"right lung base": right, "left lung base": left}


def air_lungs(volume, air_hu: float = -400.0, body_hu: float = -300.0) -> Dict[str, np.ndarray]:
    """{"right lung", "left lung": mask} of a chest CT: the largest component of air inside the body
    (the lungs joined by the airways), split at the volume's middle column, holes filled per slice
    (vessels). Not an expert's label: the split cuts the trachea and partial-volume lung at the bases
    is left out, but the lungs' lower ends are where the air ends."""
    from scipy import ndimage

    labels, count = _air_inside_body(volume.array, air_hu, body_hu)
    if count == 0:
        raise RuntimeError("no air inside the body")
    lungs = labels == (1 + int(np.argmax(np.bincount(labels.ravel())[1:])))
    sign, columns = float(np.asarray(volume.direction)[0, 0]), np.arange(volume.array.shape[2])
    right = (sign * columns < sign * (columns[-1] / 2.0))[None, None, :]  # LPS x: smaller is right
    return {name: np.stack([ndimage.binary_fill_holes(s) for s in lungs & side])
            for name, side in (("right lung", right), ("left lung", ~right))}


def without_airway(lung: np.ndarray, spacing, max_mm2: float = 800.0, middle: float = 0.06) -> np.ndarray:
    """A lung of `air_lungs` with the trachea and main bronchi left out: on each slice, the pieces
    smaller than `max_mm2` (a trachea's cross-section is about 300-500 mm2) whose centre lies within
    `middle` of the slice's width from its middle column (the split at the midline halves the
    trachea there). spacing: (i, j, k) mm. So a lung's apex is a free end, with the trachea above it."""
    from scipy import ndimage

    out = np.array(lung, dtype=bool, copy=True)
    pixel_mm2 = float(spacing[0]) * float(spacing[1])
    width = out.shape[2]
    for k in range(out.shape[0]):
        labels, count = ndimage.label(out[k])
        for c in range(1, count + 1):
            part = labels == c
            if part.sum() * pixel_mm2 < max_mm2 and abs(np.nonzero(part)[1].mean() - width / 2.0) < middle * width:
                out[k][part] = False
    return out


def parse_label_names(text: str) -> Dict[int, str]:
    """"1=liver,2=spleen" -> {1: "liver", 2: "spleen"}."""
    names = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        value, sep, name = item.partition("=")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"label name {item.strip()!r} is not VALUE=NAME (e.g. 1=liver)")
        names[int(value)] = name.strip()
    return names


def files_case(image: str, labels: str, names: Dict[int, str] = None) -> Tuple[str, object, Dict[str, np.ndarray]]:
    """(case name, Volume, {structure: mask}) of a volume file and its labels (module docstring:
    files); a label map's value N is named names[N] where given. Missing or unreadable files raise
    the engine's InputError (one line)."""
    from medsam_slicer.errors import InputError
    from medsam_slicer.volume_io import LABELMAP_EXTENSIONS, read_segmentation_masks, read_volume

    volume = read_volume(image)
    masks = read_segmentation_masks(labels, volume)
    names = names or {}
    values = {name: int(name[len("label "):]) for name in masks if name.startswith("label ")}  # a label map's names
    unknown = sorted(set(names) - set(values.values()))
    if unknown:
        raise InputError(f"'{labels}' has no label value {', '.join(map(str, unknown))}")
    renamed = {names.get(values.get(name), name): mask for name, mask in masks.items()}
    case = os.path.basename(os.path.normpath(image))
    suffix = next((s for s in LABELMAP_EXTENSIONS if case.lower().endswith(s)), "")
    return case[: len(case) - len(suffix)], volume, renamed


def cases(dataset: str, cache_dir: str) -> Iterator[Tuple[str, object, Dict[str, np.ndarray]]]:
    """Yields (case name, Volume, {structure: boolean mask in k, j, i order})."""
    from medsam_slicer.volume_io import read_segmentation_masks, read_volume

    if dataset == "ctchest":
        from medsam_slicer.demo import sample_paths

        ct, seg = sample_paths()
        volume = read_volume(ct)
        yield "ctchest", volume, read_segmentation_masks(seg, volume)
    elif dataset == "tumours":
        import SimpleITK as sitk

        folder = tumour_dir(cache_dir)
        for case in TUMOUR_CASES:
            volume = read_volume(os.path.join(folder, f"{case}_image.nrrd"))
            label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, f"{case}_label.nrrd")))
            if label.shape != volume.array.shape:
                raise RuntimeError(f"{case}: label grid {label.shape} differs from the image's {volume.array.shape}")
            yield case, volume, {f"{case} tumour": label > 0}
    elif dataset == "brain":
        volume, truths = _brain_case(cache_dir)
        yield "brain", volume, truths
    elif dataset == "abdomen":
        import SimpleITK as sitk

        folder = abdomen_dir(cache_dir)
        for case, (image, labels) in ABDOMEN_CASES.items():
            volume = read_volume(os.path.join(folder, image))
            label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, labels)))
            if label.shape != volume.array.shape:
                raise RuntimeError(f"{case}: label grid {label.shape} differs from the image's {volume.array.shape}")
            truths = {name: label == value for value, name in ABDOMEN_ORGANS.items()}
            if case == "abdomen-ct":
                truths.update(lung_bases(volume))
            yield case, volume, truths
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
