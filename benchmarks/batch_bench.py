"""Cases per minute of `medsam-slicer batch`: one local process, local worker processes, and Ray.

    python benchmarks/batch_bench.py [--cases 4] [--slices 2] [--workers 2] [--modes local processes ray]
                                     [--model litemedsam | --checkpoint FILE] [--json FILE]

Every case is slicerio's CT sample with its own small intensity offset (so no case reuses another's
cached embeddings) and one 3D box over --slices slices. Each mode runs the same manifest from scratch
(--force) through the real command line, timed from start to summary: model loading, Ray start-up
and actor creation included, since that is what a user waits for. Rows: mode, wall seconds, cases
per minute, models loaded (from the command's own summary line). `ray` starts a local Ray limited
to --workers CPUs (`ray.init(num_cpus=workers)`) with one actor per worker.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "MedSAMSlicer"))


def make_cases(folder: str, cases: int, slices: int) -> str:
    import numpy as np
    import SimpleITK as sitk
    import slicerio

    ct = sitk.ReadImage(os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd"))
    lines = []
    for n in range(cases):
        image = sitk.GetImageFromArray(sitk.GetArrayFromImage(ct) + np.int32(n))
        image.CopyInformation(ct)
        sitk.WriteImage(image, os.path.join(folder, f"ct{n}.nrrd"))
        first = 20 - slices // 2
        lines.append(json.dumps({"input": f"ct{n}.nrrd", "output": f"out/case{n}.seg.nrrd", "preset": "ct-lung",
                                 "segments": [{"name": "right lung",
                                               "box": [56, 38, first, 104, 96, first + slices - 1]}]}))
    manifest = os.path.join(folder, "cases.jsonl")
    with open(manifest, "w") as f:
        f.write("\n".join(lines) + "\n")
    return manifest


def run_mode(mode: str, manifest: str, engine_args, workers: int) -> dict:
    from medsam_slicer.cli import main

    argv = ["batch", manifest, "--force", "--quiet", *engine_args]
    if mode == "processes":
        argv += ["--workers", str(workers)]
    ray = None
    if mode == "ray":
        import ray

        argv += ["--ray", "--workers", str(workers)]
    out = io.StringIO()
    start = time.perf_counter()
    if ray is not None:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        if ray is not None:
            ray.shutdown()
    wall = time.perf_counter() - start
    summary = out.getvalue().strip().splitlines()[-1]
    done = int(re.search(r"(\d+) done", summary).group(1))
    loads = int(re.search(r"model loaded (\d+) time", summary).group(1))
    return {"mode": mode, "exit": code, "wall_s": round(wall, 1), "done": done,
            "cases_per_min": round(done / wall * 60, 2), "model_loads": loads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["local", "processes", "ray"],
                        choices=["local", "processes", "ray"])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--checkpoint")
    parser.add_argument("--json")
    args = parser.parse_args()
    engine_args = ["--device", "cpu"] + (["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        manifest = make_cases(folder, args.cases, args.slices)
        for mode in args.modes:
            rows.append(run_mode(mode, manifest, engine_args, args.workers))
            print(rows[-1], flush=True)
    print(f"\n{args.cases} cases x {args.slices} slices, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{'mode':10s} {'wall s':>7s} {'cases/min':>9s} {'models':>6s}")
    for row in rows:
        print(f"{row['mode']:10s} {row['wall_s']:7.1f} {row['cases_per_min']:9.2f} {row['model_loads']:6d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
