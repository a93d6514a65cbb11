"""CPU inference engines for the image encoder: ONNX Runtime and OpenVINO next to the torch path.

The encoder module of the loaded network (segment-anything's ViT or our TinyViT, exactly as the
weights were loaded) is exported once to ONNX with the torch.export-based exporter (static input
shape), then run by ONNX Runtime or compiled by OpenVINO. Both are optional packages
(``pip install medsam-slicer[cpu]``); nothing here imports them, torch or onnx at import time.

Before an exported encoder is used the first time it is checked against the torch path on a real
CT slice (the CT sample that slicerio ships; a synthetic slice if that cannot be read): masks for
several boxes must agree on >= 99.9% of the pixels the torch path is sure of (probability outside
0.45-0.55) and the embedding's relative error (max |difference| / max |torch|) must stay <= 1e-3.
Otherwise it is refused with one line (``BackendError``). The export and the verdict are cached on
disk, keyed by a digest of the encoder's weights, the model family, the backend and library
versions, torch's version and the CPU (model name and instruction sets); a passed verdict is not
re-checked on later loads with the same key. The folder is ``$MEDSAM_SLICER_BACKEND_CACHE``, else
``backends/`` in the weights cache.

Interrupts are coarse: checked before each slice (one backend call cannot be stopped halfway).

BF16 (``precision="bf16"``, OpenVINO only, on CPUs with bf16 units: AVX512-BF16 or AMX): the same
exported fp32 encoder compiled by OpenVINO with a bf16 inference precision. It is held to the same
guard as int8 (below) before first use, and chosen by ``auto`` when the torch path is bf16 too.
Measured on a Zen 4 (avx512_bf16): ViT-B encoder 2.7 s vs 5.4 s in fp32 on OpenVINO (torch bf16 4.8 s).

INT8 (``precision="int8"``, opt-in): the exported fp32 encoder is quantised post-training with ONNX
Runtime's static quantiser (QDQ format, int8 weights per output channel, uint8 activations with
MinMax ranges calibrated on windowed slices of the CT sample in four CT windows), then run by ONNX
Runtime or OpenVINO. Only the linear layers (Gemm, and MatMul with a weight) are quantised: on
TinyViT quantising its convolutions (their per-tensor activation ranges differ by orders of magnitude
between channels) or the attention products lost accuracy (mask agreement down to 87%). Its guard,
on the real structures of the CT sample (the expert segmentation slicerio ships: lungs, vertebral
columns, body tissue, each on its median slice with its tight box, in its window) against the fp32
torch path: masks agree on >= 99.5% of the confident pixels, and the 2D Dice against the expert's
masks drops by <= 0.005 (mean over the structures). Otherwise int8 is refused with one line that
names the measured numbers; the refusal is cached too (the same model fails the same way). The guard
is called the reduced-precision guard below: bf16 and int8 share it.

``auto``: a short calibration (each available backend exported, checked, timed on the check slice
against the torch path) picks the fastest configuration that passes; a backend must beat torch by
10% to be chosen (timings on a shared CPU are noisy), or tie with it (<= 5% slower) when starting
without torch saves more than that costs (see `auto_choice`). The verdict is cached per weights, CPU,
library versions, thread count and ISA cap in the environment, so later runs do not calibrate again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .errors import MedSAMError

BACKENDS = ("torch", "onnx", "openvino")
CHOICES = ("auto",) + BACKENDS
# backend -> the module its runtime needs (the exporter also needs onnx and onnxscript)
RUNTIME_MODULE = {"onnx": "onnxruntime", "openvino": "openvino"}
EXPORT_MODULES = ("onnx", "onnxscript")
CACHE_ENV = "MEDSAM_SLICER_BACKEND_CACHE"

# The accuracy guard (fp32): see the module docstring.
MIN_AGREEMENT = 0.999
MAX_RELATIVE_ERROR = 1e-3
CONFIDENT = (0.45, 0.55)
AUTO_MARGIN = 0.9  # auto takes a backend only if it needs <= 90% of the torch path's time ...
# ... or, since a command line whose exports are cached starts without importing torch (fast_start.py),
# one that ties with torch (<= 105% of its time) and whose start saves more than 20 slices' worth of
# its extra time: see auto_choice.
AUTO_TIE = 1.05
AUTO_BREAK_EVEN_SLICES = 20

CHECK_SLICE = 20  # CTChest4 slice with lung, mediastinum and body outline
CHECK_BOXES = ((20, 30, 60, 95), (55, 70, 75, 100), (5, 10, 120, 118), (70, 30, 110, 90))

PRECISIONS = ("fp32", "bf16", "int8")
BF16_BACKENDS = ("openvino",)  # ONNX Runtime's CPU provider has no bf16 matrix kernels
# The reduced-precision guard (bf16, int8): see the module docstring.
REDUCED_MIN_AGREEMENT = 0.995
REDUCED_MAX_DICE_DROP = 0.005
# The CT sample's expert structures and the window each is judged in (as Testing/test_real_weights.py).
GUARD_STRUCTURES = (("right lung", (1000, -500)), ("left lung", (1000, -500)),
                    ("cervical vertebral column", (1800, 400)), ("thoracic vertebral column", (1800, 400)),
                    ("lumbar vertebral column", (1800, 400)), ("tissue", (1500, -600)))
CALIBRATION_WINDOWS = ((1000, -500), (1800, 400), (1500, -600), (400, 40))
CALIBRATION_SLICES = 12


class BackendError(MedSAMError):
    """A backend that is not installed, fails to export, or fails the accuracy guard."""


def check_backend(name: Optional[str]) -> str:
    name = (name or "torch").strip().lower()
    if name not in CHOICES:
        raise BackendError(f"unknown backend '{name}': use {', '.join(CHOICES)}")
    return name


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available(name: str, precision: str = "fp32") -> bool:
    """Whether a backend can run here at a precision (torch: not int8; the others need their runtime
    and the exporter, int8 also ONNX Runtime's quantiser, bf16 OpenVINO and a CPU with bf16 units)."""
    if name == "torch":
        return precision != "int8"
    if precision == "bf16" and (name not in BF16_BACKENDS or not cpu_has_fast_bf16()):
        return False
    ok = _has(RUNTIME_MODULE[name]) and all(_has(m) for m in EXPORT_MODULES)
    return ok and (precision != "int8" or _has("onnxruntime"))


def available_backends() -> List[str]:
    return [b for b in BACKENDS if available(b)]


def library_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    package = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[name]
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


# ------------------------------------------------------------------------------------------- CPU

_FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def is_amd_x86() -> bool:
    """An AMD x86-64 CPU? (/proc/cpuinfo's vendor on Linux; Windows names it in platform.processor().)"""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return "authenticamd" in (platform.processor() + _cpuinfo_text()).lower()


def cpu_info(threads: Optional[int] = None, isa_cap: Optional[str] = None) -> Dict[str, object]:
    """The CPU's model, its instruction sets that matter here and an fp32 peak estimate.

    peak = cores used x GHz x fp32 FLOP per cycle per core, where FLOP/cycle is 2 FMA pipes x
    vector lanes x 2: 64 with AVX-512 on Intel (two 512-bit FMA units) and on AMD from Zen 5 (CPU
    family 26), 32 with AVX-512 on Zen 4 (family 25 splits 512-bit operations over its 256-bit
    units) and with AVX2 + FMA, 16 without FMA. (Measured on a 2-core EPYC of family 26, one core:
    512-bit FMAs gave 2.0x the FLOP/s of 256-bit ones, 232 against 117 GFLOP/s; Zen 5 laptop parts
    are said to split them like Zen 4, and are counted at 64 too.)
    GHz: the "@ x.xxGHz" of the model name if there is one, else /proc/cpuinfo's "cpu MHz" (the
    current or nominal clock; turbo is not counted: that EPYC's cores ran the FMAs at ~3.6 GHz
    against 2.6 listed). An estimate, good to a factor of ~1.4.
    isa_cap "avx2": as if the CPU stopped at AVX2 + FMA (the libraries capped to it): its AVX-512
    and AMX sets dropped.
    """
    text = _cpuinfo_text()
    model, mhz, flags, cpu_family = platform.processor() or platform.machine(), None, set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model in ("", platform.processor(), platform.machine()):
            model = value
        elif key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                pass
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu family" and cpu_family is None and value.isdigit():
            cpu_family = int(value)
    if isa_cap == "avx2":
        flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    ghz, ghz_source = None, "unknown"
    if "GHz" in model and "@" in model:
        try:
            ghz, ghz_source = float(model.rsplit("@", 1)[1].replace("GHz", "").strip()), "model name"
        except ValueError:
            pass
    if ghz is None and mhz:
        ghz, ghz_source = mhz / 1000.0, "cpu MHz"
    amd = is_amd_x86()
    if "avx512f" in flags:
        flop = 32 if amd and (cpu_family or 0) < 26 else 64
    elif "avx2" in flags and "fma" in flags:
        flop = 32
    else:
        flop = 16
    cores = int(threads or os.cpu_count() or 1)
    peak = cores * ghz * flop if ghz else None
    return {
        "model": model,
        "isa": [f for f in _FLAGS_SHOWN if f in flags],
        "cores": cores,
        "ghz": round(ghz, 2) if ghz else None,
        "ghz_source": ghz_source,
        "flop_per_cycle": flop,
        "peak_gflops": round(peak, 1) if peak else None,
    }


def cpu_has_fast_bf16() -> bool:
    """amx_bf16 or avx512_bf16 in /proc/cpuinfo, unless oneDNN is capped below them (e.g. to emulate
    an AVX2-only CPU with ONEDNN_MAX_CPU_ISA=AVX2)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap and cap not in ("ALL", "DEFAULT") and "BF16" not in cap and "AMX" not in cap:
        return False
    flags = _cpuinfo_text()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_key() -> str:
    info = cpu_info(1)
    return f"{info['model']}|{','.join(info['isa'])}"


# The caps on the instruction sets oneDNN, ATen and MKL use, by name: how the benchmarks emulate an
# AVX2-only CPU on this one (bench.run_capped, cli_bench --isa-cap); ISA_CAP_ENV, their variables.
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                     "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
ISA_CAP_ENV = tuple(ISA_CAPS["avx2"])


def isa_cap_key() -> str:
    """The ISA cap in effect, for the keys of timed verdicts: a calibration timed under one cap (or
    none) says nothing about another, so a capped run never reuses an uncapped verdict or vice versa."""
    return ",".join(f"{k}={os.environ.get(k, '').strip()}" for k in ISA_CAP_ENV)


# ----------------------------------------------------------------------------------------- cache


def cache_root(cache: Optional[str] = None) -> str:
    folder = cache or os.environ.get(CACHE_ENV, "").strip() or None
    if folder is None:
        from .weights import cache_dir

        folder = os.path.join(cache_dir(), "backends")
    return os.path.abspath(os.path.expanduser(str(folder)))


def weights_digest(module) -> str:
    """SHA-256 over the names, shapes and bytes of a module's tensors (parameters and buffers)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """This package's Python source. Keys what measures or runs our code: auto's timed verdicts
    (a faster torch path changes the choice) and fast_start's manifests."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()


def _key(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _judge_key(net) -> str:
    """A short digest of the prompt encoder and mask decoder: the checks judge masks, so a verdict
    holds only for the decoder it was measured with."""
    return _key([weights_digest(net.prompt_encoder), weights_digest(net.mask_decoder)])[:12]


# ---------------------------------------------------------------------------------------- export


def export_onnx(encoder, size: int, path: str) -> str:
    """Exports the encoder module (1, 3, size, size) -> (1, 256, 64, 64) to one ONNX file, atomically."""
    import torch

    if not all(_has(m) for m in EXPORT_MODULES):
        raise BackendError("exporting to ONNX needs the onnx and onnxscript packages: pip install medsam-slicer[cpu]")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(path))
    try:
        out = os.path.join(tmp, os.path.basename(path))
        x = torch.rand(1, 3, size, size)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(encoder.eval(), (x,), dynamo=True, input_names=["x"], output_names=["embedding"],
                                        optimize=True, verbose=False)
            program.save(out, external_data=False)
        os.replace(out, path)
    except BackendError:
        raise
    except Exception as exc:  # the exporter's errors are long; one line says what failed
        raise BackendError(f"could not export the image encoder to ONNX ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _onnx_runner(path: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run


def _openvino_runner(path: str, threads: int, cache_dir: Optional[str] = None,
                     precision: str = "fp32") -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    if cache_dir:
        core.set_property({"CACHE_DIR": cache_dir})  # compiled blobs: later loads skip compilation
    # Explicit: on CPUs with bf16 units OpenVINO would otherwise compute in bf16 even when asked for fp32.
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: x})[0], copy=True)

    return run


def _numpy(x) -> np.ndarray:
    """float32 numpy from a numpy array or a torch tensor (converted without importing torch here)."""
    if isinstance(x, np.ndarray):
        return np.asarray(x, dtype=np.float32)
    return x.detach().cpu().float().numpy()


class BackendEncoder:
    """The encoder callable `f(x, interrupt=None) -> (B, 256, 64, 64) float32` over a backend: numpy
    in, numpy out (the torch-free start); a torch tensor in, a tensor out. One slice per backend call,
    the interrupt checked before each. model_path, verdict_path: the export and the verdict that let
    it run (what `fast_start` records)."""

    def __init__(self, name: str, run: Callable[[np.ndarray], np.ndarray], folder: str, report: Dict,
                 precision: str = "fp32", model_path: str = "", verdict_path: str = ""):
        self.name = name
        self.precision = precision
        self.run = run
        self.folder = folder
        self.report = report
        self.model_path = model_path
        self.verdict_path = verdict_path

    def __call__(self, x, interrupt=None):
        from .fast_encoder import EncodeInterrupted

        outs = []
        data = _numpy(x)
        for i in range(data.shape[0]):
            if interrupt is not None and interrupt():
                raise EncodeInterrupted()
            outs.append(self.run(np.ascontiguousarray(data[i : i + 1])))
        out = outs[0] if len(outs) == 1 else np.concatenate(outs, 0)
        if isinstance(x, np.ndarray):
            return out
        import torch

        return torch.from_numpy(out)


def encoder_runner(name: str, model_path: str, threads: int, precision: str = "fp32") -> Callable:
    """The export at model_path compiled on a backend (OpenVINO keeps its compiled blobs next to it)."""
    if name == "onnx":
        return _onnx_runner(model_path, threads)
    cache_dir = os.path.join(os.path.dirname(model_path), f"openvino-cache{'-bf16' if precision == 'bf16' else ''}")
    return _openvino_runner(model_path, threads, cache_dir, precision)


# ---------------------------------------------------------------------------------------- checks


def check_slice():
    """(uint8 slice, boxes (N, 4)): a windowed slice of the CT sample, else a synthetic one."""
    try:
        import SimpleITK as sitk
        import slicerio

        from .windowing import choose_window

        path = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")
        volume = sitk.GetArrayFromImage(sitk.ReadImage(path))
        grey = choose_window(volume).apply(volume[CHECK_SLICE])
    except Exception:  # no sample: discs of different brightness on a gradient
        yy, xx = np.mgrid[0:128, 0:128]
        grey = (xx * 0.5).astype(np.float64)
        for cy, cx, r, v in ((60, 40, 25, 200), (70, 90, 18, 140), (30, 100, 10, 255)):
            grey[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = v
        grey = grey.astype(np.uint8)
    return grey, np.array(CHECK_BOXES, dtype=float)


def compare(reference_embedding, embedding, decode: Callable, boxes, size) -> Dict[str, float]:
    """Embedding relative error and the masks' agreement on the reference's confident pixels."""
    ref = reference_embedding.float().cpu().numpy()
    emb = embedding.float().cpu().numpy()
    rel = float(np.abs(emb - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    prob_ref, _ = decode(reference_embedding, boxes, size)
    prob, _ = decode(embedding, boxes, size)
    confident = (prob_ref < CONFIDENT[0]) | (prob_ref > CONFIDENT[1])
    agree = ((prob > 0.5) == (prob_ref > 0.5))[confident]
    return {"relative_error": rel, "agreement": float(agree.mean()) if agree.size else 1.0,
            "confident_fraction": float(confident.mean())}


def passes(result: Dict[str, float]) -> bool:
    return result["agreement"] >= MIN_AGREEMENT and result["relative_error"] <= MAX_RELATIVE_ERROR


# --------------------------------------------------------------------------------------- prepare


def prepare(name: str, net, family, reference: Callable, decode: Callable, threads: Optional[int] = None,
            cache: Optional[str] = None, digest: Optional[str] = None, precision: str = "fp32") -> BackendEncoder:
    """The backend's encoder for `net.image_encoder`: exported (or found in the cache), checked the
    first time against `reference` (the torch encoder in fp32) with the engine's `decode`, refused
    with a BackendError if the guard fails. precision "bf16" (OpenVINO) and "int8" (quantised) are
    held to the reduced-precision guard instead of the fp32 check."""
    import torch

    if name not in RUNTIME_MODULE:
        raise BackendError(f"unknown encoder backend '{name}': use {', '.join(RUNTIME_MODULE)}")
    if precision not in PRECISIONS:
        raise BackendError(f"backend {name} runs {' or '.join(PRECISIONS)}, not {precision}")
    if not available(name, precision):
        if precision == "bf16":
            raise BackendError(f"bf16 runs on the openvino backend on CPUs with bf16 units (avx512_bf16 or amx), "
                               f"not on {name} here: use --precision fp32")
        raise BackendError(f"backend {name} needs {RUNTIME_MODULE[name]}, onnx and onnxscript"
                           f"{' (and onnxruntime to quantise)' if precision == 'int8' else ''}: "
                           "pip install medsam-slicer[cpu]")
    threads = int(threads or torch.get_num_threads())
    digest = digest or weights_digest(net.image_encoder)
    parts = [digest, family.NAME, str(family.INPUT_SIZE), name, library_version(name), torch.__version__,
             _version("onnxscript"), cpu_key()]
    int8 = precision == "int8"
    if int8:  # the quantiser's version and its recipe are part of what the file is
        parts += ["int8", _version("onnxruntime"), str(CALIBRATION_SLICES), repr(CALIBRATION_WINDOWS)]
    key = _key(parts)
    # bf16 compiles the fp32 export (one file, one export) and keeps its own verdict and compiled blobs.
    folder = os.path.join(cache_root(cache), f"{family.NAME}-{name}{'-int8' if int8 else ''}-{key}")
    model_path = os.path.join(folder, "encoder-int8.onnx" if int8 else "encoder.onnx")
    reduced = precision != "fp32"
    verdict_name = "verdict.json"
    if reduced:  # the guard judges masks, so its verdict also depends on the prompt encoder and decoder
        verdict_name = f"verdict-{precision}-{_judge_key(net)}.json"
    verdict_path = os.path.join(folder, verdict_name)
    report = _read_json(verdict_path)
    if not os.path.isfile(model_path):
        t = time.perf_counter()
        if int8:
            fp32_path = os.path.join(folder, "encoder-fp32.onnx")
            try:
                export_onnx(net.image_encoder, int(family.INPUT_SIZE), fp32_path)
                quantize_int8(fp32_path, model_path, calibration_inputs(family))
            finally:
                with contextlib.suppress(OSError):
                    os.remove(fp32_path)
        else:
            export_onnx(net.image_encoder, int(family.INPUT_SIZE), model_path)
        report = None
        export_s = time.perf_counter() - t
    else:
        export_s = 0.0
    same_file = (report is not None and report.get("bytes") == os.path.getsize(model_path)
                 and _no_older(verdict_path, model_path))
    if reduced and same_file and report.get("passed") is False:
        raise BackendError(_reduced_refusal(name, precision, report))  # measured before on this very file
    try:
        run = encoder_runner(name, model_path, threads, precision)
    except Exception as exc:
        raise BackendError(f"backend {name} could not load the exported encoder ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    encoder = BackendEncoder(name, run, folder, report or {}, precision, model_path, verdict_path)
    if same_file and report.get("passed"):
        return encoder
    if reduced:
        report = dict(reduced_guard(reference, encoder, decode, family), backend=name, precision=precision,
                      version=library_version(name), bytes=os.path.getsize(model_path), export_s=round(export_s, 2))
        report["passed"] = (report["agreement"] >= REDUCED_MIN_AGREEMENT
                            and report["dice_drop"] <= REDUCED_MAX_DICE_DROP)
        _write_json(verdict_path, report)
        encoder.report = report
        if not report["passed"]:
            raise BackendError(_reduced_refusal(name, precision, report))
        return encoder
    grey, boxes = check_slice()
    x = torch.from_numpy(np.ascontiguousarray(family.model_input(grey)))
    with torch.inference_mode():
        expected = reference(x)
        t = time.perf_counter()
        embedding = encoder(x)
        backend_s = time.perf_counter() - t
        result = compare(expected, embedding, decode, boxes, grey.shape[:2])
    report = dict(result, passed=passes(result), backend=name, version=library_version(name),
                  bytes=os.path.getsize(model_path), export_s=round(export_s, 2), check_s=round(backend_s, 3))
    _write_json(verdict_path, report)
    encoder.report = report
    if not report["passed"]:
        raise BackendError(
            f"backend {name} failed the accuracy check against torch (mask agreement "
            f"{result['agreement']:.4%} < {MIN_AGREEMENT:.1%} or embedding error {result['relative_error']:.1e} "
            f"> {MAX_RELATIVE_ERROR:.0e}); use --backend torch")
    return encoder


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "absent"


def _no_older(verdict_path: str, model_path: str) -> bool:
    """Was the verdict written after the export it judges? (An export rewritten since is judged again.)"""
    try:
        return os.stat(verdict_path).st_mtime_ns >= os.stat(model_path).st_mtime_ns
    except OSError:
        return False


def _read_json(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, data: Dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- int8 and the guard


def _sample():
    """(CT volume [k, j, i], the expert's masks by name on its grid) of slicerio's sample."""
    try:
        import SimpleITK as sitk
        import slicerio

        from .volume_io import read_segmentation_masks, read_volume

        folder = os.path.join(os.path.dirname(slicerio.__file__), "data")
        ct = os.path.join(folder, "CTChest4.nrrd")
        volume = sitk.GetArrayFromImage(sitk.ReadImage(ct))
        masks = read_segmentation_masks(os.path.join(folder, "Segmentation.seg.nrrd"), reference=read_volume(ct))
    except Exception as exc:
        raise BackendError(f"int8 needs slicerio's CT sample to calibrate and check the model ({type(exc).__name__}); "
                           "use --precision fp32") from None
    return volume, masks


def _guard_slices(masks) -> Dict[str, int]:
    out = {}
    for name, _ in GUARD_STRUCTURES:
        ks = np.sort(np.nonzero(masks[name])[0])
        out[name] = int(ks[len(ks) // 2])  # the structure's median-voxel slice
    return out


def calibration_inputs(family, count: int = CALIBRATION_SLICES) -> List[np.ndarray]:
    """Model inputs (1, 3, S, S) of `count` slices spread over the CT sample, the CT windows taken in
    turn, leaving out the slices the guard judges."""
    from .windowing import choose_window

    volume, masks = _sample()
    judged = set(_guard_slices(masks).values())
    ks = [k for k in range(volume.shape[0]) if k not in judged]
    picks = [ks[int(i)] for i in np.linspace(0, len(ks) - 1, count)]
    return [family.model_input(choose_window(volume, window=CALIBRATION_WINDOWS[n % len(CALIBRATION_WINDOWS)])
                               .apply(volume[k])) for n, k in enumerate(picks)]


def quantize_int8(fp32_path: str, path: str, inputs: Sequence[np.ndarray]) -> str:
    """Post-training static quantisation (ONNX Runtime, QDQ) of the linear layers, atomically."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(inputs)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"x": np.ascontiguousarray(x, dtype=np.float32)}

    tmp = tempfile.mkdtemp(prefix=".quantize-", dir=os.path.dirname(path))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            pre = os.path.join(tmp, "pre.onnx")
            quant_pre_process(fp32_path, pre)
            model = onnx.load(pre)
            weights = {t.name for t in model.graph.initializer}
            linear = [n.name for n in model.graph.node
                      if n.op_type == "Gemm" or (n.op_type == "MatMul" and any(i in weights for i in n.input))]
            out = os.path.join(tmp, os.path.basename(path))
            quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_quantize=linear)
        os.replace(out, path)
    except Exception as exc:
        raise BackendError(f"could not quantise the image encoder to int8 ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def reduced_guard(reference: Callable, encoder: Callable, decode: Callable, family) -> Dict[str, object]:
    """A reduced-precision (bf16, int8) encoder against the fp32 torch one on the CT sample's structures (median slice,
    tight box, the structure's window): agreement on the confident pixels of all of them together,
    and the 2D Dice against the expert's masks, fp32 minus int8 (mean and worst structure)."""
    import torch

    from .slicing import mask_bbox
    from .windowing import choose_window

    volume, masks = _sample()
    slices = _guard_slices(masks)
    agree = confident = 0
    drops = {}
    for name, window in GUARD_STRUCTURES:
        k = slices[name]
        truth = masks[name][k]
        grey = choose_window(volume, window=window).apply(volume[k])
        x = torch.from_numpy(np.ascontiguousarray(family.model_input(grey)))
        box = np.array([mask_bbox(truth)], dtype=float)
        with torch.inference_mode():
            prob_ref = decode(reference(x), box, grey.shape[:2])[0][0]
            prob = decode(encoder(x), box, grey.shape[:2])[0][0]
        sure = (prob_ref < CONFIDENT[0]) | (prob_ref > CONFIDENT[1])
        agree += int(((prob > 0.5) == (prob_ref > 0.5))[sure].sum())
        confident += int(sure.sum())
        drops[name] = round(_dice(prob_ref > 0.5, truth) - _dice(prob > 0.5, truth), 4)
    return {"agreement": agree / max(confident, 1), "dice_drop": float(np.mean(list(drops.values()))),
            "worst_dice_drop": max(drops.values()), "dice_drops": drops}


def _dice(a, b) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / max(1, int(a.sum()) + int(b.sum())))


def _reduced_refusal(name: str, precision: str, report: Dict) -> str:
    return (f"{precision} refused on backend {name}: on the CT sample's {len(GUARD_STRUCTURES)} structures mask "
            f"agreement {report['agreement']:.2%} (needs >= {REDUCED_MIN_AGREEMENT:.1%}) and 2D Dice drop "
            f"{report['dice_drop']:.4f} (needs <= {REDUCED_MAX_DICE_DROP}; worst structure "
            f"{report['worst_dice_drop']:.4f}) against fp32; use --precision fp32")


# ------------------------------------------------------------------------------------------ auto


def _seconds(encoder: Callable, x, repeats: int = 2) -> float:
    import torch

    with torch.inference_mode():
        encoder(x)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            encoder(x)
            best = min(best, time.perf_counter() - t)
    return best


IMPORT_PROBE = "import numpy, time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def import_seconds(module: str, timeout: float = 60.0) -> Optional[float]:
    """Seconds a fresh Python process takes to import `module` after numpy (which the torch-free start
    imports anyway), or None if that cannot be measured."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(module=module)], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _ties(seconds: Dict[str, float]) -> List[str]:
    """The backends within the tie window: not AUTO_MARGIN faster than torch, at most AUTO_TIE slower."""
    torch_s = seconds["torch"]
    return [b for b, s in seconds.items() if b != "torch" and AUTO_MARGIN * torch_s < s <= AUTO_TIE * torch_s]


def auto_choice(seconds: Dict[str, float], import_s: Optional[Dict[str, Optional[float]]] = None) -> str:
    """`auto`'s rule (fp32 and bf16) on the calibration's seconds per slice (torch and each backend
    that passed) and the seconds a fresh process takes to import torch and each backend's runtime.

    The fastest backend is taken if it needs <= AUTO_MARGIN (90%) of torch's time: one calibration's
    backend/torch ratio varies by up to ~10% between repeats on a shared CPU, so this margin keeps
    a backend that is in fact slower per slice from being chosen by chance. A backend in the tie window (90-105%
    of torch's time) is still worth taking in a command line: with its exports cached, `segment` then
    starts without importing torch (fast_start.py). Measured on a 2-core Zen 4 (avx512_bf16), 3 runs each:
    importing torch 1.46-1.55 s, OpenVINO 0.11-0.14 s, ONNX Runtime 0.03-0.04 s after numpy; under the
    AVX2 cap LiteMedSAM's encoder took 0.59-0.66 s per slice on torch, ONNX Runtime 0.91-1.06x and
    OpenVINO 0.92-1.24x that; whole `segment` runs of 3 slices 3.2 s on OpenVINO without torch against
    4.2 s on torch. So the fastest backend in the tie window is taken when the import it saves (torch's minus
    its runtime's) pays for AUTO_BREAK_EVEN_SLICES slices at its extra time per slice, if any: for
    LiteMedSAM (0.6 s per slice) 5% slower costs 0.6 s over 20 slices against ~1.4 s saved; for ViT-B
    (~7 s per slice) only an exact tie qualifies. Never a backend more than 5% slower per slice, so a
    long-lived process (Slicer, the server), which gains no import, loses at most that. Without
    import times (not measured) the tie goes to torch, as before."""
    best = min(seconds, key=seconds.get)
    torch_s = seconds["torch"]
    if best != "torch" and seconds[best] <= AUTO_MARGIN * torch_s:
        return best
    import_s = import_s or {}
    for name in sorted(_ties(seconds), key=seconds.get):
        torch_import, runtime_import = import_s.get("torch"), import_s.get(RUNTIME_MODULE.get(name, name))
        if torch_import is None or runtime_import is None:
            continue
        saved = torch_import - runtime_import
        if saved > 0 and saved >= AUTO_BREAK_EVEN_SLICES * max(0.0, seconds[name] - torch_s):
            return name
    return "torch"


def choose(net, family, torch_encoder: Callable, reference: Callable, decode: Callable, threads: Optional[int] = None,
           cache: Optional[str] = None, candidates: Optional[Sequence[str]] = None, log=None, tag: str = "",
           precision: str = "fp32"):
    """`auto`: (backend name, encoder) of the fastest configuration that passes its guard, from a
    calibration (each candidate timed on the check slice, best of 2 after a warm-up) cached per
    weights, CPU, library versions, threads, ISA cap (`isa_cap_key`) and this package's source.
    `torch_encoder` is the engine's own torch path (maybe bf16, under its own guard), `reference`
    the fp32 torch encoder the backends are checked against,
    `tag` names the torch path's configuration in the cache key. precision "fp32": ("torch",
    torch_encoder) unless a backend is at least 10% faster, or ties with torch and saves its import
    (`auto_choice`; the imports are timed in fresh processes only when a backend ties); "bf16" (the torch path is bf16): as fp32,
    but a backend that runs bf16 (OpenVINO on a CPU with bf16 units) competes in bf16; "int8"
    (opt-in): the fastest backend whose int8 model passes the guard, a BackendError naming each
    refusal if none does. The chosen encoder's `.precision` says what it computes in."""
    import torch

    int8 = precision == "int8"
    threads = int(threads or torch.get_num_threads())

    def runs(name: str) -> Optional[str]:  # the precision a backend competes in, None if it cannot run
        wanted = [precision] if precision != "bf16" else ["bf16", "fp32"]
        return next((p for p in wanted if available(name, p)), None)

    pairs = {b: runs(b) for b in (candidates or RUNTIME_MODULE)}
    pairs = {b: p for b, p in pairs.items() if p is not None}
    if not pairs:
        if int8:
            raise BackendError("int8 runs on the onnx or openvino backend, neither is installed: "
                               "pip install medsam-slicer[cpu]")
        return "torch", torch_encoder
    digest = weights_digest(net.image_encoder)
    rule = "" if int8 else f"margin={AUTO_MARGIN},tie={AUTO_TIE},slices={AUTO_BREAK_EVEN_SLICES}"
    key = _key([digest, _judge_key(net), family.NAME, torch.__version__, cpu_key(), isa_cap_key(), str(threads), tag,
                precision, rule, source_digest()]
               + [f"{b}={library_version(b)}:{p}" for b, p in pairs.items()] + ([_version("onnxruntime")] if int8 else []))
    path = os.path.join(cache_root(cache), f"auto-{family.NAME}{'-int8' if int8 else ''}-{key}.json")
    verdict = _read_json(path)
    if verdict is None:
        grey, _ = check_slice()
        x = torch.from_numpy(np.ascontiguousarray(family.model_input(grey)))
        timings = {} if int8 else {"torch": _seconds(torch_encoder, x)}
        failures = {}
        for name, p in pairs.items():
            try:
                encoder = prepare(name, net, family, reference, decode, threads, cache, digest, p)
            except BackendError as exc:
                failures[name] = str(exc)
                continue
            timings[name] = _seconds(encoder, x)
        imports = None
        if int8:
            best = min(timings, key=timings.get) if timings else None
        else:
            if _ties(timings):  # only then do the imports matter (~2 s to measure)
                imports = {m: import_seconds(m) for m in ["torch"] + [RUNTIME_MODULE[b] for b in _ties(timings)]}
            best = auto_choice(timings, imports)
        verdict = {"choice": best, "precision": pairs.get(best, precision),
                   "seconds": {k: round(v, 4) for k, v in timings.items()}, "failed": failures}
        if imports is not None:
            verdict["import_s"] = {k: None if v is None else round(v, 3) for k, v in imports.items()}
        _write_json(path, verdict)
        if log is not None:
            log(f"backend auto ({precision}): {best} ({', '.join(f'{k} {v:.2f} s' for k, v in timings.items())})")
    best = verdict.get("choice")
    if int8 and best not in pairs:
        reasons = "; ".join(verdict.get("failed", {}).values()) or "no backend could run it"
        raise BackendError(reasons)
    if best is None or best == "torch" or best not in pairs:
        return "torch", torch_encoder
    encoder = prepare(best, net, family, reference, decode, threads, cache, digest, pairs[best])
    encoder.auto_verdict_path = path  # the choice a torch-free start re-reads (fast_start)
    return best, encoder


# --------------------------------------------------------------------------------------- decoder


def _decoder_module(net):
    """Prompt encoder + mask decoder for ONE box without a mask prompt: (embedding (1, 256, 64, 64),
    box (1, 1, 4) in model pixels) -> (low-res logits (1, 1, h, w), IoU estimate (1, 1))."""
    import torch

    class BoxDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prompt_encoder = net.prompt_encoder
            self.mask_decoder = net.mask_decoder

        def forward(self, embedding, box):
            sparse, dense = self.prompt_encoder(points=None, boxes=box, masks=None)
            return self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)

    return BoxDecoder().eval()


class BackendDecoder:
    """`f(embedding (1, 256, 64, 64) numpy or torch, boxes (N, 4) model pixels) -> (logits numpy
    (N, 1, h, w), iou numpy (N, 1))`, one backend call per box. model_path, verdict_path: as
    BackendEncoder's."""

    def __init__(self, name: str, session, folder: str, report: Dict, model_path: str = "",
                 verdict_path: str = ""):
        self.name, self.session, self.folder, self.report = name, session, folder, report
        self.model_path, self.verdict_path = model_path, verdict_path

    def __call__(self, embedding, boxes_model):
        emb = np.ascontiguousarray(_numpy(embedding))
        logits, ious = [], []
        for box in np.asarray(boxes_model, dtype=np.float32).reshape(-1, 4):
            out = self.session([emb, box.reshape(1, 1, 4)])
            logits.append(out[0])
            ious.append(out[1])
        return np.concatenate(logits, 0), np.concatenate(ious, 0)


def decoder_session(name: str, model_path: str, threads: int):
    """The decoder's export compiled on a backend (OpenVINO's blobs cached next to it)."""
    return _session(name, model_path, threads, os.path.join(os.path.dirname(model_path), "openvino-cache"))


def _session(name: str, path: str, threads: int, cache_dir: Optional[str]):
    """A callable list of inputs -> list of outputs over ONNX Runtime or OpenVINO."""
    if name == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda inputs: session.run(None, dict(zip(names, inputs)))
    import openvino as ov

    core = ov.Core()
    if cache_dir:
        core.set_property({"CACHE_DIR": cache_dir})
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()

    def run(inputs):
        result = request.infer(inputs)
        return [np.array(result[i], copy=True) for i in range(len(compiled.outputs))]

    return run


def prepare_decoder(name: str, net, family, threads: Optional[int] = None, cache: Optional[str] = None,
                    embedding=None) -> BackendDecoder:
    """The prompt encoder and mask decoder on a backend (re-prompts cost the decoder alone), exported
    at first use, cached like the encoder and checked against torch: low-res logits on an embedding
    (the check slice's, or random) for the check boxes agree on >= 99.9% of the confident pixels and
    differ by <= 1e-3 of their range."""
    import torch

    if not available(name) or name not in RUNTIME_MODULE:
        raise BackendError(f"backend {name} is not available here: pip install medsam-slicer[cpu]")
    threads = int(threads or torch.get_num_threads())
    module = _decoder_module(net)
    key = _key([weights_digest(module), family.NAME, str(family.INPUT_SIZE), name, library_version(name),
                torch.__version__, _version("onnxscript"), cpu_key(), "decoder"])
    folder = os.path.join(cache_root(cache), f"{family.NAME}-{name}-decoder-{key}")
    path = os.path.join(folder, "decoder.onnx")
    verdict_path = os.path.join(folder, "verdict.json")
    report = _read_json(verdict_path) if _no_older(verdict_path, path) else None
    if embedding is None:
        embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    embedding = embedding[:1].detach().to("cpu", torch.float32)
    box = torch.tensor([[[10.0, 12.0, 40.0, 44.0]]]) * (family.INPUT_SIZE / 64.0)
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=folder)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(module, (embedding, box), dynamo=True, input_names=["embedding", "box"],
                                            output_names=["logits", "iou"], optimize=True, verbose=False)
                program.save(os.path.join(tmp, "decoder.onnx"), external_data=False)
            os.replace(os.path.join(tmp, "decoder.onnx"), path)
        except Exception as exc:
            raise BackendError(f"could not export the mask decoder to ONNX ({type(exc).__name__})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report = None
    decoder = BackendDecoder(name, decoder_session(name, path, threads), folder, report or {}, path, verdict_path)
    if report is None or not report.get("passed"):
        boxes = np.array(CHECK_BOXES, dtype=np.float32) * (family.INPUT_SIZE / 128.0)
        with torch.inference_mode():
            ref_logits = torch.cat([module(embedding, torch.from_numpy(b.reshape(1, 1, 4)))[0] for b in boxes]).numpy()
        logits = decoder(embedding, boxes)[0]
        prob_ref, prob = 1 / (1 + np.exp(-ref_logits)), 1 / (1 + np.exp(-logits))
        confident = (prob_ref < CONFIDENT[0]) | (prob_ref > CONFIDENT[1])
        agreement = float(((prob > 0.5) == (prob_ref > 0.5))[confident].mean()) if confident.any() else 1.0
        rel = float(np.abs(logits - ref_logits).max() / max(float(np.ptp(ref_logits)), 1e-12))
        report = {"agreement": agreement, "relative_error": rel, "backend": name, "version": library_version(name),
                  "passed": agreement >= MIN_AGREEMENT and rel <= MAX_RELATIVE_ERROR}
        _write_json(verdict_path, report)
        decoder.report = report
        if not report["passed"]:
            raise BackendError(f"backend {name}'s mask decoder failed the accuracy check against torch "
                               f"(agreement {agreement:.4%}, error {rel:.1e}); use --backend torch")
    return decoder
