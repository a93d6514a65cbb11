"""Speed benchmark (thin script over medsam_slicer.bench): prints a table and optionally JSON.

    python benchmarks/bench.py [--model medsam|litemedsam] [--checkpoint FILE] [--device auto]
                               [--precisions fp32 bf16] [--slices 8] [--json out.json]
                               [--batches 1 4 8 --peak-tflops 989] [--backends onnx openvino]
                               [--isa-cap avx2]

Without --checkpoint, medsam is a random-weight ViT-B (speed does not depend on the weights) and
litemedsam its official weights. --batches adds encoder throughput per batch size and, with
--peak-tflops (the card's dense bf16 peak), the fraction of it reached (the family's
ENCODER_GFLOPS per slice: 972 for ViT-B, about 75 for LiteMedSAM's TinyViT). --precisions fp32 int8
adds the int8 encoder on each backend. --isa-cap avx2 times the rows again in a subprocess whose
libraries are capped to AVX2 (an AVX2-only CPU emulated on this one; see medsam_slicer.bench).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "MedSAMSlicer"))

def batch_throughput(model, device, precision, batches, compile, peak_tflops):
    import torch

    from medsam_slicer.bench import _load_model
    from medsam_slicer.engine import MedSAMEngine
    from medsam_slicer.model import resolve_device

    device = resolve_device(device)
    sam, family, _ = _load_model(model, None)
    engine = MedSAMEngine(sam, device, precision, fast=True, compile=compile, family=family)
    size, gflops = family.INPUT_SIZE, family.ENCODER_GFLOPS
    rows = []
    for b in batches:
        x = torch.rand(b, 3, size, size, device=device)
        with torch.inference_mode():
            for _ in range(2):
                engine._encoder(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            n = 5
            t = time.perf_counter()
            for _ in range(n):
                engine._encoder(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        per_slice = (time.perf_counter() - t) / n / b
        row = {"batch": b, "precision": precision, "compiled": compile, "ms_per_slice": round(per_slice * 1000, 2),
               "slices_per_s": round(1 / per_slice, 1)}
        if peak_tflops:
            row["fraction_of_peak"] = round(gflops / per_slice / 1000 / peak_tflops, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--model", default=None, help="medsam or litemedsam (default: the registry's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precisions", nargs="+")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the fast encoder (GPU)")
    ap.add_argument("--json")
    ap.add_argument("--batches", type=int, nargs="+", help="encoder throughput per batch size")
    ap.add_argument("--batch-precision", default="bf16")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card, for the fraction column")
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="CPU encoder backends to add (onnx openvino; default: those installed; none: --backends)")
    ap.add_argument("--isa-cap", choices=["avx2"], help="also the rows under this instruction-set cap (emulated)")
    ap.add_argument("--capped-only", action="store_true", help="with --isa-cap: only the capped rows")
    args = ap.parse_args(argv)

    from medsam_slicer.bench import format_table, run_benchmark

    out = {}
    if not args.skip_table and args.capped_only and args.isa_cap:
        from medsam_slicer.bench import run_capped

        results = run_capped(args.isa_cap, model=args.model, checkpoint=args.checkpoint, device=args.device,
                             precisions=args.precisions, slices=args.slices, reference=not args.no_reference,
                             compile=args.compile, backends=args.backends)
        print(format_table(results), flush=True)
        out["configs"] = results
    elif not args.skip_table:
        results = run_benchmark(model=args.model, checkpoint=args.checkpoint, device=args.device, precisions=args.precisions,
                                slices=args.slices, reference=not args.no_reference, compile=args.compile,
                                backends=args.backends, isa_cap=args.isa_cap)
        print(format_table(results), flush=True)
        out["configs"] = results
    if args.batches:
        out["batches"] = batch_throughput(args.model, args.device, args.batch_precision, args.batches, args.compile, args.peak_tflops)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
