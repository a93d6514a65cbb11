"""The engine against an independent re-implementation of the published pipeline, on real CT slices."""
from __future__ import annotations

import numpy as np
import pytest

from medsam_slicer.engine import MedSAMEngine
from medsam_slicer.model import load_model
from medsam_slicer.models.medsam import load_sam
from medsam_slicer.predictor import SlicePredictor
from medsam_slicer.models.medsam import model_input
from medsam_slicer.slicing import get_slice
from medsam_slicer.windowing import choose_window
from reference_pipeline import reference_probabilities

# (axis, slice, box) on CTChest4 (128 x 128 x 34): right lung, vertebra, a box at the image edge.
CASES = [("k", 17, (20, 30, 60, 95)), ("k", 10, (55, 70, 75, 100)), ("j", 64, (0, 0, 40, 33)), ("i", 40, (10, 5, 100, 30))]


def assert_same_masks(prob_engine, prob_ref):
    confident = (prob_ref < 0.45) | (prob_ref > 0.55)
    assert confident.mean() > 0.5, "reference too uncertain to compare"
    np.testing.assert_array_equal((prob_engine > 0.5)[confident], (prob_ref > 0.5)[confident])


@pytest.mark.parametrize("axis,index,box", CASES)
def test_engine_matches_published_pipeline(tiny_checkpoint, ct_array, axis, index, box):
    sam, _ = load_sam(tiny_checkpoint)
    engine = MedSAMEngine(sam, "cpu", "fp32")
    window = choose_window(ct_array)
    grey = window.apply(get_slice(ct_array, axis, index))
    prob, _ = engine.segment(grey, [box])
    ref = reference_probabilities(sam, grey, box)
    assert_same_masks(prob[0], ref)
    assert np.abs(prob[0] - ref).max() < 1e-4
    assert 0 < (ref > 0.5).sum() < ref.size  # the comparison is not between two empty masks


def test_full_vit_b_path(vit_b_checkpoint, ct_array):
    """The real MedSAM architecture end to end, once: arch detection, encoder, decoder."""
    engine = MedSAMEngine.from_checkpoint(vit_b_checkpoint, device="cpu", precision="fp32")
    assert engine.architecture == "vit_b" and engine.family.NAME == "medsam"
    assert sum(p.numel() for p in engine.sam.parameters()) == 93_735_472
    window = choose_window(ct_array)
    grey = window.apply(ct_array[17])
    box = (20, 30, 60, 95)
    prob, score = engine.segment(grey, [box])
    net, _, _ = load_model(vit_b_checkpoint)  # the engine kept only its fast encoder's copy
    assert all(p.is_meta for p in engine.sam.image_encoder.parameters())
    ref = reference_probabilities(net, grey, box)
    assert_same_masks(prob[0], ref)
    assert np.isfinite(score).all()


def test_grey_resize_is_bit_identical_to_three_channels(ct_array):
    grey = choose_window(ct_array).apply(ct_array[17])
    ours = model_input(grey)
    from skimage.transform import resize

    rgb = resize(np.repeat(grey[:, :, None], 3, axis=-1), (1024, 1024), order=3, preserve_range=True, anti_aliasing=True)
    rgb = rgb.astype(np.uint8)
    theirs = ((rgb - rgb.min()) / np.clip(rgb.max() - rgb.min(), 1e-8, None)).astype(np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(ours[0], theirs)


def test_decoder_batches_boxes_like_single_calls(tiny_engine, ct_array):
    grey = choose_window(ct_array).apply(ct_array[17])
    boxes = [(20, 30, 60, 95), (70, 30, 110, 95), (55, 70, 75, 100)]
    embedding = tiny_engine.encode(grey)
    batched, scores = tiny_engine.decode(embedding, boxes, grey.shape)
    for n, box in enumerate(boxes):
        single, score = tiny_engine.decode(embedding, [box], grey.shape)
        np.testing.assert_allclose(batched[n], single[0], atol=1e-5)
        assert abs(scores[n] - score[0]) < 1e-5
    # Different boxes give different masks: the box really steers the decoder.
    assert ((batched[0] > 0.5) != (batched[1] > 0.5)).sum() > 100


def test_predictor_encodes_each_slice_once(tiny_engine, ct_array):
    pred = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array), "k")
    first, _ = pred(17, (20, 30, 60, 95))
    again, _ = pred(17, (20, 30, 60, 95))
    other_box, _ = pred(17, (70, 30, 110, 95))
    assert pred.encoded == 1
    np.testing.assert_array_equal(first, again)
    assert (first != other_box).any()
    pred(18, (20, 30, 60, 95))
    assert pred.encoded == 2
    # A different window is a different image: it must be encoded again.
    lung = SlicePredictor(tiny_engine, ct_array, choose_window(ct_array, preset="ct-lung"), "k", cache=pred.cache)
    lung(17, (20, 30, 60, 95))
    assert lung.encoded == 1


def test_input_volume_is_never_modified(tiny_engine, ct_array):
    before = ct_array.copy()
    SlicePredictor(tiny_engine, ct_array, choose_window(ct_array), "j")(64, (10, 5, 100, 30))
    np.testing.assert_array_equal(before, ct_array)
