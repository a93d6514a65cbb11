"""The fast mask decoder (`fast_decoder.py`) against the network's own prompt encoder and mask decoder
(`sam_net`, itself tested against segment-anything), on embeddings of real CT slices: LiteMedSAM's
real weights and a random MedSAM (the decoder's output layers scaled, so masks follow the image)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam_slicer.engine import MedSAMEngine
from medsam_slicer.fast_decoder import FastBoxDecoder
from medsam_slicer.model import load_model
from medsam_slicer.windowing import choose_window

# (slice, boxes) on CTChest4 (34 x 128 x 128): right lung, a vertebra, most of the chest, left lung.
SLICES = [(17, [(20, 30, 60, 95), (55, 70, 75, 100), (5, 10, 120, 118)]), (10, [(70, 30, 110, 90)])]


@pytest.fixture(scope="module", params=["litemedsam", "medsam"])
def engine(request, tiny_checkpoint):
    if request.param == "litemedsam":
        return MedSAMEngine.load("litemedsam", device="cpu", precision="fp32")
    return MedSAMEngine.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def embeddings(engine, ct_array):
    """[(embedding, boxes in the model's input pixels)] for SLICES under a lung window."""
    window = choose_window(ct_array, window=(1000, -500))
    out = []
    for k, boxes in SLICES:
        grey = window.apply(ct_array[k])
        out.append((engine.encode(grey), engine.family.boxes_to_model(np.array(boxes, float), *grey.shape)))
    return out


def published(engine, embedding, boxes_model):
    """Logits (N, 1, h, w) and IoU (N, 1) as segment-anything's predictor runs the two modules."""
    sam = engine.sam
    with torch.inference_mode():
        box_t = torch.as_tensor(boxes_model, dtype=torch.float)[:, None, :]
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_t, masks=None)
        logits, iou = sam.mask_decoder(image_embeddings=torch.as_tensor(embedding).float(),
                                       image_pe=sam.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
    return logits.numpy(), iou.numpy()


def assert_same(got, want):
    (logits, iou), (ref_logits, ref_iou) = got, want
    assert logits.shape == ref_logits.shape and iou.shape == ref_iou.shape
    assert np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits) < 1e-5
    assert np.abs(iou - ref_iou).max() < 1e-5
    sure = np.abs(ref_logits) > 1e-2
    assert ((logits > 0) == (ref_logits > 0))[sure].all()


def test_fast_decoder_matches_the_published_decoder(engine, embeddings):
    fast = FastBoxDecoder(engine.sam.prompt_encoder, engine.sam.mask_decoder)
    for embedding, boxes in embeddings:
        want = published(engine, embedding, boxes)
        assert_same(fast(embedding, boxes), want)  # all boxes in one call
        for n in range(len(boxes)):  # and one by one, reusing the embedding's kept work
            got = fast(embedding, boxes[n : n + 1])
            assert_same(got, (want[0][n : n + 1], want[1][n : n + 1]))
        # the masks differ between boxes: the test would see boxes mixed up
        if len(boxes) > 1:
            assert ((want[0][0] > 0) != (want[0][1] > 0)).mean() > 0.01


def test_kept_work_follows_the_embedding_it_was_made_for(engine, embeddings):
    """Alternating slices, the same values in a new object, and a numpy copy (the disk cache's form)
    each give their own embedding's result, never another slice's kept work."""
    fast = FastBoxDecoder(engine.sam.prompt_encoder, engine.sam.mask_decoder)
    (a, boxes), (b, _) = embeddings
    box = boxes[:1]
    want_a, want_b = published(engine, a, box), published(engine, b, box)
    assert np.abs(want_a[0] - want_b[0]).max() > 1.0  # different slices answer differently
    for embedding, want in ((a, want_a), (b, want_b), (a, want_a), (a.clone(), want_a),
                            (b.numpy().copy(), want_b), (b, want_b), (a, want_a)):
        assert_same(fast(embedding, box), want)


def test_engine_decodes_through_the_fast_decoder_only_when_fast(engine, ct_array):
    grey = choose_window(ct_array, window=(1000, -500)).apply(ct_array[17])
    boxes = np.array(SLICES[0][1], float)
    net, _, _ = load_model(engine.checkpoint)  # the engine freed its network's own image encoder
    slow = MedSAMEngine(net, fast=False, family=engine.family, model_id="slow")
    assert engine._fast_decoder is not None and slow._fast_decoder is None
    embedding = engine.encode(grey)
    prob, iou = engine.decode(embedding, boxes, grey.shape)
    prob_ref, iou_ref = slow.decode(embedding, boxes, grey.shape)
    assert np.abs(prob - prob_ref).max() < 1e-4 and np.abs(iou - iou_ref).max() < 1e-5
    assert ((prob > 0.5) == (prob_ref > 0.5)).mean() > 0.9999
