"""Speed benchmark: the published reference pipeline against the engine's configurations.

`run_benchmark()` times, per configuration, on slices of the CT sample with one box:
encoder s/slice, decoder ms/box, first mask on a new slice, re-prompt on a cached slice, and
propagation s/slice over `slices` consecutive slices (PrefetchingPredictor: the next slices encode
in the background while the current one is decoded). Configurations:

* ``reference-fp32``: segment-anything's encoder called as published (``sam.image_encoder(x)``),
* ``engine-<precision>``: the engine's fast encoder (SDPA, private weights in that precision),
* ``onnx-fp32``, ``openvino-fp32``: the encoder and decoder exported to ONNX Runtime / OpenVINO
  (`backends.py`; included when installed, first export and check not timed),
* ``openvino-bf16`` when "bf16" is among the precisions and the CPU has bf16 units, ``onnx-int8``,
  ``openvino-int8`` when "int8" is: the reduced-precision encoder (a row with its one-line reason
  if its accuracy guard refuses it).

``isa_cap="avx2"`` times the rows again in a subprocess whose libraries are capped to AVX2 + FMA
(oneDNN: ONEDNN_MAX_CPU_ISA, ATen: ATEN_CPU_CAPABILITY, MKL: MKL_ENABLE_INSTRUCTIONS), emulating
an AVX2-only CPU on one with AVX-512; rows say "[avx2 cap]". ONNX Runtime has no such cap (its MLAS
kernels follow CPUID), so its rows are left out there; OpenVINO's oneDNN primitives honour the cap
but its own kernels (element-wise ops, MLAS matrix products) do not, so its rows say "partial".

Each row also gives the encoder's fraction of the CPU's fp32 peak (`backends.cpu_info`: threads x
GHz x FLOP/cycle from the instruction sets; the family's ENCODER_GFLOPS per slice), and the table
names the CPU's instruction sets.

With ``checkpoint=None`` the model is a random-weight ViT-B (`models/sam_net.py`, seeded: the
weights segment-anything's builder draws): speed does not depend on the weights' values. The
reference row of SAM's ViT runs segment-anything's own ``Sam`` loaded with the same weights.
Ratios are only meaningful within one run.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .backends import ISA_CAPS

BOX = (20, 30, 60, 95)  # right lung on CTChest4, slices 10..27
CAP_ENV = "MEDSAM_SLICER_ISA_CAP"  # set in the capped subprocess: which cap its libraries run under


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def time_command(command: Sequence[str], repeat: int = 1, env: Optional[dict] = None) -> float:
    """Wall seconds of a whole subprocess run (best of `repeat`), e.g. a `medsam-slicer` command line."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        subprocess.run(list(command), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def _sample_volume():
    import SimpleITK as sitk
    import slicerio

    path = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _load_model(model: Optional[str], checkpoint: Optional[str]):
    """(network, family, label): the checkpoint's model, else random ViT-B weights for medsam (speed
    does not depend on values; the real ones may not be downloadable) or LiteMedSAM's own weights."""
    from .models import get_family

    if checkpoint:
        from .model import load_model

        net, family, _ = load_model(checkpoint, model)
        return net, family, os.path.basename(checkpoint)
    family = get_family(model)
    if family.NAME != "medsam":
        from .model import load_model

        path = family.ensure_weights(None)
        net, family, _ = load_model(path, family.NAME)
        return net, family, f"{family.TITLE} ({os.path.basename(path)})"
    import torch

    from .models.medsam import NAMED_ARCHITECTURES, Architecture, random_sam

    return random_sam(Architecture(*NAMED_ARCHITECTURES["vit_b"])), family, "random ViT-B"


def _reference_network(net, family):
    """The network the reference row runs: for SAM's ViT family, segment-anything's own ``Sam`` with
    the same weights (the published code; the engine's networks are `models/sam_net.py`), imported
    here only, so that importing the engine never pays for it. Other families, or without the
    segment-anything package: `net` itself (the same operations in the same order, tested)."""
    if family.NAME != "medsam":
        return net
    try:
        from segment_anything.build_sam import _build_sam
    except ImportError:
        return net

    from .models.medsam import detect_architecture

    state = net.state_dict()
    arch = detect_architecture(state, "bench")
    ref = _build_sam(encoder_embed_dim=arch.embed_dim, encoder_depth=arch.depth, encoder_num_heads=arch.num_heads,
                     encoder_global_attn_indexes=list(arch.global_attn_indexes), checkpoint=None)
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _bench_config(name, engine, volume, window, slices: int, start: int, repeats: int) -> Dict:
    import torch

    from .cache import EmbeddingCache
    from .predictor import SlicePredictor
    from .prefetch import PrefetchingPredictor

    device = engine.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    grey = window.apply(volume[start])
    engine.encode(grey)  # warm-up (allocations, kernels, compile)
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        emb = engine.encode(grey)
        _sync(device)
        times.append(time.perf_counter() - t)
    encoder_s = min(times)
    boxes = np.array([BOX, (55, 70, 75, 100), (5, 10, 120, 118), (30, 40, 50, 60)], dtype=float)
    engine.decode(emb, boxes[:1], grey.shape)
    t = time.perf_counter()
    for _ in range(3):
        engine.decode(emb, boxes, grey.shape)
    decoder_ms_box = (time.perf_counter() - t) / 3 / len(boxes) * 1000

    cache = EmbeddingCache(8 * 1024 ** 3)
    pred = SlicePredictor(engine, volume, window, "k", cache, key=f"bench-{name}")
    t = time.perf_counter()
    pred(start + 1, BOX)
    first_mask_s = time.perf_counter() - t
    reprompts = []
    for n in range(5):
        t = time.perf_counter()
        pred(start + 1, (BOX[0] + n, BOX[1], BOX[2], BOX[3]))
        reprompts.append(time.perf_counter() - t)
    reprompt_ms = float(np.median(reprompts)) * 1000

    lookahead = max(2, getattr(engine, "max_batch", 1))
    fresh = SlicePredictor(engine, volume, window, "k", EmbeddingCache(8 * 1024 ** 3), key=f"bench-prop-{name}")
    first = start + 2
    indices = list(range(first, min(first + slices, volume.shape[0])))
    with PrefetchingPredictor(fresh) as wrapped:
        t = time.perf_counter()
        for pos, k in enumerate(indices):
            wrapped.prefetch(indices[pos + 1 : pos + 1 + lookahead])
            wrapped(k, BOX)
        _sync(device)
        propagation_s = (time.perf_counter() - t) / len(indices)
        wrapped.cancel()
    result = {
        "config": name,
        "device": device,
        "precision": engine.precision,
        "encoder_s_per_slice": round(encoder_s, 3),
        "decoder_ms_per_box": round(decoder_ms_box, 1),
        "first_mask_s": round(first_mask_s, 3),
        "reprompt_ms": round(reprompt_ms, 1),
        "propagation_s_per_slice": round(propagation_s, 3),
        "propagated_slices": len(indices),
        "peak_rss_mb": round(peak_rss_mb(), 0),
    }
    if device.startswith("cuda"):
        result["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 0)
    return result


def run_benchmark(checkpoint: Optional[str] = None, model: Optional[str] = None, device: str = "auto", precisions: Optional[Sequence[str]] = None,
                  slices: int = 8, json_path: Optional[str] = None, reference: bool = True, repeats: int = 2,
                  compile: bool = False, threads: Optional[int] = None,
                  backends: Optional[Sequence[str]] = None, isa_cap: Optional[str] = None) -> List[Dict]:
    """Times the reference and the engine's configurations; returns one dict per configuration.

    precisions: default fp32 plus the device's reduced precision (bf16 on CUDA and bf16-capable
    CPUs, fp16 on MPS; fp32 alone under an ISA cap). Ratios against ``reference-fp32`` are added
    as ``*_speedup``. isa_cap: also the same rows under that cap (see the module docstring).
    """
    options = dict(checkpoint=checkpoint, model=model, device=device, precisions=precisions, slices=slices,
                   reference=reference, repeats=repeats, compile=compile, threads=threads, backends=backends)
    results = _run(**options)
    if isa_cap:
        results += run_capped(isa_cap, **options)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results


def run_capped(isa: str, **options) -> List[Dict]:
    """The benchmark's rows in a subprocess with the libraries capped to `isa` (ISA_CAPS), labelled."""
    import tempfile

    if isa not in ISA_CAPS:
        raise ValueError(f"unknown ISA cap {isa}: use {', '.join(ISA_CAPS)}")
    if options.get("backends") is None:
        from . import backends as cpu_backends

        options["backends"] = [b for b in cpu_backends.available_backends() if b != "torch"]
    options["backends"] = [b for b in options["backends"] if b != "onnx"]  # ONNX Runtime cannot be capped
    env = dict(os.environ, **ISA_CAPS[isa], **{CAP_ENV: isa})
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "capped.json")
        code = ("import json, sys; from medsam_slicer.bench import _run; "
                "json.dump(_run(**json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
        subprocess.run([sys.executable, "-c", code, json.dumps(options), out], check=True, env=env)
        with open(out) as f:
            rows = json.load(f)
    for row in rows:
        partial = row.get("backend") == "openvino" or row["config"].startswith("openvino")
        row["config"] = f"{row['config']} [{isa} cap{', partial' if partial else ''}]"
        row["isa_cap"] = isa
    return rows


def _run(checkpoint: Optional[str] = None, model: Optional[str] = None, device: str = "auto",
         precisions: Optional[Sequence[str]] = None, slices: int = 8, reference: bool = True, repeats: int = 2,
         compile: bool = False, threads: Optional[int] = None, backends: Optional[Sequence[str]] = None) -> List[Dict]:
    import torch

    from .engine import MedSAMEngine, resolve_precision
    from .model import resolve_device
    from .windowing import choose_window

    torch.set_num_threads(int(threads or os.cpu_count() or 1))
    device = resolve_device(device)
    cap = os.environ.get(CAP_ENV) or None
    if not precisions:
        auto = "fp32" if cap else resolve_precision("auto", device)
        precisions = ["fp32"] + ([auto] if auto != "fp32" else [])
    if cap:  # the capped CPU has no bf16/fp16 units: those rows would time an emulation
        precisions = [p for p in precisions if p not in ("bf16", "fp16")]
    sam, family, label = _load_model(model, checkpoint)
    volume = _sample_volume()
    window = choose_window(volume)
    start = 10
    configs = []
    if reference:
        configs.append(("reference-fp32", dict(precision="fp32", fast=False)))
    for p in [p for p in precisions if p != "int8"]:
        configs.append((f"engine-{p}" + ("-compiled" if compile else ""), dict(precision=p, fast=True, compile=compile)))
    from . import backends as cpu_backends

    if backends is None:
        backends = [b for b in cpu_backends.available_backends() if b != "torch"] if device == "cpu" else []
    for b in backends:
        for p in ("fp32", "bf16", "int8"):
            if p == "fp32" or (p in precisions and cpu_backends.available(b, p)):
                configs.append((f"{b}-{p}", dict(precision=p, fast=True, backend=b)))
    info = cpu_backends.cpu_info(torch.get_num_threads(), isa_cap=cap)
    results = []
    for name, options in configs:
        try:
            network = _reference_network(sam, family) if name == "reference-fp32" else sam
            engine = MedSAMEngine(network, device, model_id="bench", family=family, **options)
        except cpu_backends.BackendError as exc:
            results.append({"config": name, "device": device, "error": str(exc)})
            continue
        res = _bench_config(name, engine, volume, window, slices, start, repeats)
        res.update(model=label, cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                   aten_isa=torch.backends.cpu.get_cpu_capability(),
                   isa=" ".join(info["isa"]), peak_gflops=info["peak_gflops"], peak_estimate=(
                       f"{info['cores']} threads x {info['ghz']} GHz ({info['ghz_source']}) x "
                       f"{info['flop_per_cycle']} FLOP/cycle"))
        if device == "cpu" and info["peak_gflops"]:
            gflops_per_s = float(family.ENCODER_GFLOPS) / res["encoder_s_per_slice"]
            res["fraction_of_peak"] = round(gflops_per_s / info["peak_gflops"], 2)
        res["backend"] = engine.backend
        if device.startswith("cuda"):
            res["gpu"] = torch.cuda.get_device_name()
        results.append(res)
        del engine, network
    ref = next((r for r in results if r["config"] == "reference-fp32"), None)
    if ref is not None:
        for r in results:
            for key in ("encoder_s_per_slice", "first_mask_s", "propagation_s_per_slice"):
                if key in r:
                    r[key.split("_")[0] + "_speedup"] = round(ref[key] / r[key], 2) if r[key] else None
    return results


COLUMNS = [
    ("config", "config"), ("encoder_s_per_slice", "encoder s/slice"), ("decoder_ms_per_box", "decoder ms/box"),
    ("first_mask_s", "first mask s"), ("reprompt_ms", "re-prompt ms"), ("propagation_s_per_slice", "propag. s/slice"),
    ("encoder_speedup", "enc x"), ("first_speedup", "first x"), ("propagation_speedup", "propag. x"),
    ("fraction_of_peak", "of fp32 peak"),
    ("peak_rss_mb", "peak RSS MB"), ("cuda_max_allocated_mb", "CUDA MB"),
]


def format_table(results: List[Dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in results)]
    rows = [[str(r.get(k, "")) for k, _ in cols] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (_, h) in enumerate(cols)]
    lines = [" | ".join(h.ljust(w) for (_, h), w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines += [f"{r['config']}: {r['error']}" for r in results if "error" in r]
    timed = [r for r in results if "error" not in r]
    if timed:
        r = timed[0]
        extra = f"; GPU {r['gpu']}" if "gpu" in r else ""
        lines.append(f"model: {r['model']}; device {r['device']}; CPU {r['cpu']}, {r['threads']} threads; torch {r['torch']}{extra}")
        lines.append(f"CPU instruction sets: {r.get('isa') or 'none of avx2/avx512f/avx512_bf16/amx'}; fp32 peak "
                     f"~{r.get('peak_gflops')} GFLOP/s = {r.get('peak_estimate')} (an estimate)")
        capped = next((c for c in timed if c.get("isa_cap")), None)
        if capped:
            lines.append(f"[{capped['isa_cap']} cap]: EMULATED on this CPU by capping the libraries (oneDNN, ATen "
                         f"{capped.get('aten_isa')}, MKL) to {capped.get('isa')}: fp32 peak ~{capped.get('peak_gflops')} "
                         "GFLOP/s; 'partial': OpenVINO's own kernels are not capped; ONNX Runtime cannot be capped")
    return "\n".join(lines)
