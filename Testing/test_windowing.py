"""Intensity windowing on the real CT sample and on synthetic MR-like data."""
from __future__ import annotations

import numpy as np
import pytest

from medsam_slicer.errors import InputError
from medsam_slicer.windowing import CT_PRESETS, choose_window, from_width_level, looks_like_hounsfield


def test_explicit_window_formula(ct_array):
    before = ct_array.copy()
    out = choose_window(ct_array, window=(400, 40)).apply(ct_array)
    np.testing.assert_array_equal(ct_array, before)  # input untouched
    assert out.dtype == np.uint8
    expected = ((np.clip(ct_array, -160, 240) + 160) / 400.0 * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out[ct_array <= -160].max() == 0 and out[ct_array >= 240].min() == 255


@pytest.mark.parametrize("name", sorted(CT_PRESETS))
def test_presets(name, ct_array):
    width, level = CT_PRESETS[name]
    w = choose_window(ct_array, preset=name)
    assert (w.low, w.high) == (level - width / 2, level + width / 2)


def test_auto_picks_ct_abdomen_for_hounsfield(ct_array):
    assert looks_like_hounsfield(ct_array)
    assert choose_window(ct_array).name == "ct-abdomen"


def test_mr_recipe():
    rng = np.random.default_rng(0)
    vol = np.zeros((4, 32, 32), np.float32)
    vol[:, 8:24, 8:24] = rng.gamma(2.0, 100.0, size=(4, 16, 16)) + 1
    w = choose_window(vol)
    assert w.name == "mr" and w.keep_zero
    positive = vol[vol > 0]
    assert (w.low, w.high) == pytest.approx(tuple(np.percentile(positive, [0.5, 99.5])))
    out = w.apply(vol)
    assert (out[vol == 0] == 0).all()
    assert out.max() == 255
    inside = out[vol > 0]
    assert (inside == 0).mean() < 0.01  # only voxels below the 0.5th percentile map to 0


def test_bad_windows(ct_array):
    with pytest.raises(InputError):
        from_width_level(0, 40)
    with pytest.raises(InputError):
        choose_window(ct_array, preset="ct-liver")
    with pytest.raises(InputError):
        choose_window(ct_array, window=(400, 40), preset="ct-lung")
