"""Whole-process speed of the command line against the published pipeline as a command line.

Both segment the same slices of slicerio's CT sample with the same random-weight ViT-B checkpoint
(speed does not depend on the weights' values), start to finish: Python start-up, imports, model
loading, reading, every slice, writing. Prints a table and, with --json, writes the numbers.

    python benchmarks/cli_bench.py [--slices 4] [--json out.json]
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
BOX_IJ = (20, 30, 60, 95)  # right lung on CTChest4
FIRST_SLICE = 14


def timed(command) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import slicerio
    import torch
    from segment_anything.build_sam import build_sam_vit_b

    ct = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")
    box = [BOX_IJ[0], BOX_IJ[1], FIRST_SLICE, BOX_IJ[2], BOX_IJ[3], FIRST_SLICE + args.slices - 1]
    cli = os.path.join(os.path.dirname(sys.executable), "medsam-slicer")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "vit_b_random.pth")
        torch.manual_seed(0)
        torch.save(build_sam_vit_b().state_dict(), checkpoint)
        box_args = [str(v) for v in box]
        runs = [
            ("reference (published pipeline, fp32)",
             [sys.executable, os.path.join(HERE, "reference_segment.py"), ct, checkpoint, os.path.join(tmp, "ref.nii.gz")]
             + box_args),
        ]
        for precision in ("fp32", "auto"):
            runs.append((f"medsam-slicer segment --precision {precision}",
                         [cli, "segment", ct, "-o", os.path.join(tmp, f"{precision}.nii.gz"), "--box", *box_args,
                          "--checkpoint", checkpoint, "--precision", precision, "--quiet", "--force"]))
        for name, command in runs:
            rows.append({"command": name, "seconds": timed(command), "slices": args.slices})
    base = rows[0]["seconds"]
    print(f"{'command':<42} {'total s':>8} {'s/slice':>8} {'speed-up':>9}")
    for row in rows:
        row["speedup"] = base / row["seconds"]
        print(f"{row['command']:<42} {row['seconds']:8.1f} {row['seconds'] / row['slices']:8.2f} {row['speedup']:8.2f}x")
    print(f"{args.slices} slices of CTChest4, random ViT-B, torch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
