"""The embedding cache: memory budget and the optional disk layer, with real embeddings of CT slices."""
from __future__ import annotations

import os

import numpy as np

from medsam_slicer.cache import EmbeddingCache, default_cache
from medsam_slicer.cli import main
from medsam_slicer.predictor import SlicePredictor
from medsam_slicer.windowing import choose_window

BOX = (20, 30, 60, 95)


def test_disk_layer_serves_a_later_run_without_encoding(tiny_engine, ct_array, tmp_path):
    window = choose_window(ct_array)
    first = SlicePredictor(tiny_engine, ct_array, window, "k", EmbeddingCache(2**30, disk_dir=str(tmp_path)))
    mask, _ = first(17, BOX)
    assert first.encoded == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    # A new cache object over the same folder stands for a new process or Slicer session.
    later = SlicePredictor(tiny_engine, ct_array, window, "k", EmbeddingCache(2**30, disk_dir=str(tmp_path)))
    again, _ = later(17, BOX)
    assert later.encoded == 0
    np.testing.assert_array_equal(mask, again)
    # Other data, window or axis never hit the stored file.
    other = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array, preset="ct-lung"), "k",
                           EmbeddingCache(2**30, disk_dir=str(tmp_path)))
    other(17, BOX)
    assert other.encoded == 1


def test_a_damaged_file_is_recomputed(tiny_engine, ct_array, tmp_path):
    window = choose_window(ct_array)
    pred = SlicePredictor(tiny_engine, ct_array, window, "k", EmbeddingCache(2**30, disk_dir=str(tmp_path)))
    mask, _ = pred(12, BOX)
    (stored,) = tmp_path.glob("*.npy")
    stored.write_bytes(stored.read_bytes()[:100])  # cut short, as by a crash mid-write elsewhere
    fresh = SlicePredictor(tiny_engine, ct_array, window, "k", EmbeddingCache(2**30, disk_dir=str(tmp_path)))
    again, _ = fresh(12, BOX)
    assert fresh.encoded == 1
    np.testing.assert_array_equal(mask, again)


def test_disk_budget_evicts_the_oldest(tiny_engine, ct_array, tmp_path):
    one = 256 * 64 * 64 * 4 + 128  # one float32 embedding file with its .npy header
    cache = EmbeddingCache(2**30, disk_dir=str(tmp_path), disk_budget_bytes=2 * one)
    pred = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array), "k", cache)
    for index in (5, 6, 7):
        pred(index, BOX)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 2 and sum(f.stat().st_size for f in files) <= 2 * one
    assert os.path.basename(cache.disk.path(pred.cache_key(5))) not in {f.name for f in files}


def test_memory_only_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDSAM_SLICER_DISK_CACHE", raising=False)
    assert default_cache("cpu").disk is None
    monkeypatch.setenv("MEDSAM_SLICER_DISK_CACHE", str(tmp_path))
    assert default_cache("cpu").disk.folder == str(tmp_path)


def test_command_line_disk_cache(capsys, tmp_path, ct_path, tiny_checkpoint):
    store = tmp_path / "embeddings"
    argv = ["segment", ct_path, "--checkpoint", tiny_checkpoint, "--precision", "fp32", "--quiet",
            "--box", "20", "30", "17", "60", "95", "17", "--disk-cache", str(store)]
    assert main(argv + ["-o", str(tmp_path / "a.nii.gz")]) == 0
    assert len(list(store.glob("*.npy"))) == 1
    assert main(argv + ["-o", str(tmp_path / "b.nii.gz")]) == 0
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
