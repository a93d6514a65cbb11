"""The published MedSAM inference as a command line, for whole-process speed comparisons.

Loads a checkpoint with segment-anything's own `vit_b` builder (as MedSAM's inference script
does), windows the CT at 400/40 and runs every slice of a box's range through the published
pipeline in fp32 (Testing/reference_pipeline.py), then writes a NIfTI label map.

    python benchmarks/reference_segment.py CT.nrrd CHECKPOINT OUT.nii.gz I0 J0 K0 I1 J1 K1
"""
from __future__ import annotations

import os
import sys

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Testing"))
from reference_pipeline import reference_probabilities  # noqa: E402


def main(argv):
    ct_path, checkpoint, out_path = argv[:3]
    i0, j0, k0, i1, j1, k1 = (int(v) for v in argv[3:9])
    from segment_anything import sam_model_registry

    sam = sam_model_registry["vit_b"](checkpoint=checkpoint).eval()
    image = sitk.ReadImage(ct_path)
    volume = sitk.GetArrayFromImage(image)
    grey = ((np.clip(volume, -160, 240) + 160) / 400.0 * 255.0).astype(np.uint8)
    labels = np.zeros(volume.shape, np.uint8)
    for k in range(k0, k1 + 1):
        labels[k] = reference_probabilities(sam, grey[k], (i0, j0, i1, j1)) > 0.5
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    sitk.WriteImage(out, out_path)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(sys.argv[1:])
