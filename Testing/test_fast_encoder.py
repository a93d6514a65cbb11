"""Accuracy guard for the fast image encoder, against segment-anything's encoder in fp32 as published.

Random models get random relative-position tables (segment-anything initialises them to zero, which
would leave the rel-pos bias untested). Comparisons run on real slices of the CT sample.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam_slicer.cache import EmbeddingCache, default_budget_bytes
from medsam_slicer.engine import MedSAMEngine
from medsam_slicer.fast_encoder import (
    BIAS_BUDGET_BYTES,
    EncodeInterrupted,
    prepare_encoder,
    rel_pos_bias,
    relative_position_table,
)
from medsam_slicer.models.medsam import boxes_to_model, model_input
from medsam_slicer.windowing import choose_window
from model_factory import TINY, VIT_B, build_random_sam

# (slice, box) on CTChest4 (34 x 128 x 128): right lung, vertebra, most of the chest.
SLICES = [(17, (20, 30, 60, 95)), (10, (55, 70, 75, 100)), (25, (5, 10, 120, 118))]
TINY_WINDOWED = dict(TINY, encoder_depth=3, encoder_global_attn_indexes=[1])  # windowed, global, windowed


def randomise_rel_pos(sam, seed=0, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in sam.image_encoder.blocks:
            for table in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                table.copy_(torch.randn(table.shape, generator=gen) * std)
    return sam


@pytest.fixture(scope="module")
def tiny_sam():
    return randomise_rel_pos(build_random_sam(TINY_WINDOWED, seed=3))


@pytest.fixture(scope="module")
def ct_slices(ct_array):
    window = choose_window(ct_array)
    return [(window.apply(ct_array[k]), box) for k, box in SLICES]


def low_res_logits(sam, embedding, box, size):
    """The decoder's (256, 256) logits for one box, exactly as the published pipeline calls it."""
    with torch.inference_mode():
        box_t = torch.as_tensor(boxes_to_model([box], *size), dtype=torch.float)[:, None, :]
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_t, masks=None)
        logits, _ = sam.mask_decoder(
            image_embeddings=embedding.float(),
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    return logits[0, 0]


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_embedding(sam, grey):
    with torch.inference_mode():
        return sam.image_encoder(torch.from_numpy(np.ascontiguousarray(model_input(grey))))


def check_against_reference(sam, engine, slices, logit_tol):
    """Logits relative error and mask agreement (pixels the reference is sure about)."""
    errors, agreements = [], []
    for grey, box in slices:
        ref_emb = reference_embedding(sam, grey)
        emb = engine.encode(grey)
        assert emb.dtype == torch.float32 and emb.shape == ref_emb.shape
        errors.append(rel_err(low_res_logits(sam, emb, box, grey.shape), low_res_logits(sam, ref_emb, box, grey.shape)))
        with torch.inference_mode():
            prob, _ = engine.decode(emb, [box], grey.shape)
            ref_prob, _ = engine.decode(ref_emb, [box], grey.shape)
        confident = (ref_prob[0] < 0.45) | (ref_prob[0] > 0.55)
        assert confident.mean() > 0.5 and 0 < (ref_prob[0] > 0.5).sum() < ref_prob[0].size
        agreements.append(float(((prob[0] > 0.5) == (ref_prob[0] > 0.5))[confident].mean()))
    print("logits relative errors", errors, "mask agreement", agreements)
    assert max(errors) <= logit_tol, errors
    assert min(agreements) >= 0.995, agreements
    return errors, agreements


# ---------------------------------------------------------------------------------------------
# the relative-position bias, piece by piece


@pytest.mark.parametrize("q_size,k_size,length", [(14, 14, 27), (64, 64, 127), (14, 14, 19), (8, 16, 31)])
def test_relative_position_table_matches_segment_anything(q_size, k_size, length):
    from segment_anything.modeling.image_encoder import get_rel_pos

    table = torch.randn(length, 16, generator=torch.Generator().manual_seed(length))
    assert torch.equal(relative_position_table(q_size, k_size, table), get_rel_pos(q_size, k_size, table))


@pytest.mark.parametrize("size", [(14, 14), (64, 64)])
def test_rel_pos_bias_is_add_decomposed_rel_pos(size):
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    gen = torch.Generator().manual_seed(1)
    b, heads, c = 2, 3, 16
    length = size[0] * size[1]
    q = torch.randn(b, heads, length, c, generator=gen)
    rel_h = torch.randn(2 * size[0] - 1, c, generator=gen)
    rel_w = torch.randn(2 * size[1] - 1, c, generator=gen)
    zeros = torch.zeros(b * heads, length, length)
    expected = add_decomposed_rel_pos(zeros, q.reshape(b * heads, length, c), rel_h, rel_w, size, size)
    th, tw = relative_position_table(size[0], size[0], rel_h), relative_position_table(size[1], size[1], rel_w)
    got = rel_pos_bias(q, th, tw, size, size)
    torch.testing.assert_close(got.reshape(b * heads, length, length), expected, rtol=1e-5, atol=1e-5)
    buffer = torch.full((b * heads * length * length,), float("nan"))
    torch.testing.assert_close(rel_pos_bias(q, th, tw, size, size, out=buffer).reshape_as(expected), expected,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# whole encoder, tiny model


def test_fp32_fast_encoder_is_exact(tiny_sam, ct_slices):
    fast = prepare_encoder(tiny_sam.image_encoder, torch.float32)
    for grey, _ in ct_slices[:2]:
        x = torch.from_numpy(np.ascontiguousarray(model_input(grey)))
        with torch.inference_mode():
            assert rel_err(fast(x), tiny_sam.image_encoder(x)) < 1e-5
    # its global block's bias (2 heads x 4096^2 floats, 134 MB) ran one head at a time, in the budget
    assert fast._heads_per_bias(1, 2, 64 * 64) == 1
    assert fast._ws_local.buf.numel() * 4 <= BIAS_BUDGET_BYTES
    engine = MedSAMEngine(tiny_sam, "cpu", "fp32")
    check_against_reference(tiny_sam, engine, ct_slices, logit_tol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_within_guard(tiny_sam, ct_slices, precision):
    engine = MedSAMEngine(tiny_sam, "cpu", precision)
    errors, _ = check_against_reference(tiny_sam, engine, ct_slices, logit_tol=1e-2)
    assert max(errors) > 1e-6  # it really ran in reduced precision


def test_batch_matches_single_slices(tiny_sam, ct_slices):
    fast = prepare_encoder(tiny_sam.image_encoder, torch.bfloat16)
    xs = [torch.from_numpy(np.ascontiguousarray(model_input(g))) for g, _ in ct_slices[:2]]
    with torch.inference_mode():
        batch = fast(torch.cat(xs))
        for n, x in enumerate(xs):
            assert rel_err(batch[n : n + 1], fast(x)) < 1e-2


def test_original_weights_are_untouched(ct_slices):
    sam = randomise_rel_pos(build_random_sam(TINY_WINDOWED, seed=5))
    before = {k: v.detach().clone() for k, v in sam.image_encoder.state_dict().items()}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        fast = prepare_encoder(sam.image_encoder, dtype)
        with torch.inference_mode():
            fast(torch.from_numpy(np.ascontiguousarray(model_input(ct_slices[0][0]))))
        # weights packed for oneDNN (float32 on the CPU) live in oneDNN's own fresh buffers
        fast_ptrs = {t.data_ptr() for w in fast.blocks for t in (w.qkv_w, w.fc1_w, w.norm1[0]) if not t.is_mkldnn}
        assert not fast_ptrs & {p.data_ptr() for p in sam.image_encoder.parameters()}
    after = sam.image_encoder.state_dict()
    for key, value in before.items():
        assert after[key].dtype == torch.float32, key
        assert torch.equal(after[key], value), key
    engine = MedSAMEngine(sam, "cpu", "bf16")
    assert next(engine.sam.image_encoder.parameters()).dtype == torch.float32


def test_interrupt_stops_between_blocks(tiny_sam, ct_slices):
    fast = prepare_encoder(tiny_sam.image_encoder, torch.bfloat16)
    x = torch.from_numpy(np.ascontiguousarray(model_input(ct_slices[0][0])))
    calls = []

    def interrupt():
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(EncodeInterrupted), torch.inference_mode():
        fast(x, interrupt=interrupt)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# the real MedSAM architecture, once (one fp32 ViT-B forward per slice takes ~15-25 s here)


def test_vit_b_bf16_and_fp32_within_guard(ct_slices):
    sam = randomise_rel_pos(build_random_sam(VIT_B, seed=1), std=0.05)
    slices = ct_slices[:1]
    grey, box = slices[0]
    ref_emb = reference_embedding(sam, grey)
    results = {}
    for precision in ("bf16", "fp32"):
        engine = MedSAMEngine(sam, "cpu", precision)
        emb = engine.encode(grey)
        results[precision] = rel_err(low_res_logits(sam, emb, box, grey.shape), low_res_logits(sam, ref_emb, box, grey.shape))
        prob, _ = engine.decode(emb, [box], grey.shape)
        ref_prob, _ = engine.decode(ref_emb, [box], grey.shape)
        confident = (ref_prob[0] < 0.45) | (ref_prob[0] > 0.55)
        assert ((prob[0] > 0.5) == (ref_prob[0] > 0.5))[confident].mean() >= 0.995
    print("ViT-B logits relative error vs reference:", results)
    assert results["bf16"] <= 1e-2, results
    assert results["fp32"] <= 1e-4, results


# ---------------------------------------------------------------------------------------------
# memory: the embedding cache stays within its byte budget with real-size embeddings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_stays_within_budget_with_real_embeddings(dtype):
    one = torch.zeros(1, 256, 64, 64, dtype=dtype)
    size = one.element_size() * one.nelement()
    budget = 10 * 4 * 1024 * 1024 + 123  # ten fp32 embeddings
    cache = EmbeddingCache(budget)
    for k in range(25):
        cache.put(("vol", "k", k), one.clone())
        assert cache.used_bytes <= budget
    assert cache.used_bytes == len(cache) * size
    assert len(cache) == budget // size
    assert ("vol", "k", 24) in cache and ("vol", "k", 0) not in cache  # least recently used went first
    # the default budgets: a CPU keeps 256 fp32 slices, a GPU a 512x512x600 CT's worth of 4 MB each
    assert default_budget_bytes("cpu") // (4 * 1024 * 1024) >= 256
    assert default_budget_bytes("cuda:0") >= 600 * 4 * 1024 * 1024


@pytest.mark.parametrize("amd", [True, False])
def test_float32_linear_layers_run_on_onednn_on_amd(monkeypatch, amd):
    """On AMD x86 CPUs the encoders' float32 linear layers are packed for oneDNN (MKL takes its AVX2
    kernels there); bf16 ones stay on F.linear, and a packed product is F.linear's. Elsewhere (Intel:
    MKL is Intel's own; ARM) every weight stays as it is."""
    from medsam_slicer import onednn_linear
    from medsam_slicer.models.tinyvit import FastTinyViT, TinyViTEncoder

    monkeypatch.setattr(onednn_linear, "is_amd_x86", lambda: amd)
    monkeypatch.setattr(onednn_linear, "_WORKS", None)  # decided anew for this CPU
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 9, 96, generator=generator)[:, 1:6]  # N-D and not contiguous, as the encoders pass
    w, b = torch.randn(192, 96, generator=generator), torch.randn(192, generator=generator)
    packed = onednn_linear.pack(w)
    assert packed.is_mkldnn == amd and not onednn_linear.pack(w.bfloat16()).is_mkldnn
    expected = torch.nn.functional.linear(x, w, b)
    assert rel_err(onednn_linear.linear(x, packed, b), expected) < 1e-5
    assert rel_err(onednn_linear.linear(x, packed), torch.nn.functional.linear(x, w)) < 1e-5

    sam = build_random_sam(TINY, seed=2)
    assert prepare_encoder(sam.image_encoder, torch.float32).blocks[0].qkv_w.is_mkldnn == amd
    assert not prepare_encoder(sam.image_encoder, torch.bfloat16).blocks[0].qkv_w.is_mkldnn
    encoder = TinyViTEncoder().eval()
    fp32, bf16 = FastTinyViT(encoder, torch.float32), FastTinyViT(encoder, torch.bfloat16)
    assert fp32.stages[0][0].qkv[0].is_mkldnn == amd and fp32.neck1.is_mkldnn == amd
    assert not bf16.stages[0][0].qkv[0].is_mkldnn and bf16.embed[0][0].is_mkldnn == amd  # the embedding stays float32
