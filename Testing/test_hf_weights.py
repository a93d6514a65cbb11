"""Hugging Face transformers-format MedSAM weights load into segment-anything's Sam and compute the same.

A random transformers `SamModel` (tiny and real ViT-B configurations) is saved the way the published
`wanglab/medsam-vit-base` files are (`save_pretrained` -> model.safetensors; torch.save -> .bin), loaded
through `medsam_slicer.models.medsam.load_sam`, and compared with transformers' own forward pass.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_factory import HYPERNET_SCALE, build_random_sam  # noqa: E402

from medsam_slicer import hf_weights  # noqa: E402
from medsam_slicer.models import medsam as model  # noqa: E402
from medsam_slicer.errors import CheckpointError  # noqa: E402

# Shrunken ViT-B: 1024 input, patch 16, window 14, a global block between windowed ones.
SMALL_VISION = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, global_attn_indexes=[1],
                    window_size=14, mlp_dim=384)
# Max |difference| relative to max(1, max |reference|). The conversion itself is exact; the one known
# implementation difference is the eps of the mask decoder's two-way-attention layer norms: 1e-5 in
# segment-anything, 1e-6 in transformers' SamMaskDecoderConfig (and the published config.json). Models
# built with segment-anything's eps must agree to TIGHT; with transformers' default eps to TOL.
TIGHT = 1e-5
TOL = 1e-4
SAM_DECODER_EPS = 1e-5


def build_hf_sam(vision=None, seed=0, decoder_eps=SAM_DECODER_EPS):
    """A random transformers SamModel whose every tensor is distinct and non-constant.

    transformers initialises layer norms to 1/0 and relative/absolute position tables to 0; a converter
    that swapped two of those would go unnoticed, so constant tensors get noise. The hypernetworks'
    last layer is scaled (as in model_factory) so mask logits are not all near 0.
    """
    from transformers import SamConfig, SamModel

    torch.manual_seed(seed)
    config = SamConfig(vision_config=vision) if vision else SamConfig()
    if decoder_eps is not None:
        config.mask_decoder_config.layer_norm_eps = decoder_eps
    hf = SamModel(config).eval()
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.numel() > 1 and float(p.max()) == float(p.min()):
                p.add_(0.1 * torch.randn_like(p))
        for mlp in hf.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(HYPERNET_SCALE)
            mlp.proj_out.bias.mul_(HYPERNET_SCALE)
    return hf


def rel_diff(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def save_safetensors(hf, folder) -> str:
    """As transformers publishes it: save_pretrained writes model.safetensors (tied copy deduplicated)."""
    hf.save_pretrained(str(folder))
    path = os.path.join(str(folder), "model.safetensors")
    assert os.path.isfile(path)
    return path


def save_bin(hf, folder) -> str:
    """pytorch_model.bin: the plain state dict, with both names of the tied positional embedding."""
    path = os.path.join(str(folder), "pytorch_model.bin")
    torch.save(hf.state_dict(), path)
    return path


def compare(hf, sam, boxes, seed=0):
    """Returns (embedding, logits, iou) relative differences of SAM vs transformers on one input."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, 3, 1024, 1024, generator=g)  # min-max normalised input, no mean/std
    box = torch.tensor(boxes, dtype=torch.float32)
    with torch.no_grad():
        emb_hf = hf.get_image_embeddings(pixels)
        emb_sam = sam.image_encoder(pixels)
        out = hf(image_embeddings=emb_hf, input_boxes=box[None], multimask_output=False)
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        logits, iou = sam.mask_decoder(
            image_embeddings=emb_sam,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    n = len(boxes)
    assert emb_sam.shape == (1, 256, 64, 64)
    assert logits.shape == (n, 1, 256, 256) and out.pred_masks.shape == (1, n, 1, 256, 256)
    # The comparison must not be trivially satisfied by masks that are all one sign or all ~0.
    assert float(logits.abs().max()) > 1.0 and bool((logits > 0).any()) and bool((logits < 0).any())
    return (
        rel_diff(emb_sam, emb_hf),
        rel_diff(logits, out.pred_masks[0]),
        rel_diff(iou, out.iou_scores[0]),
    )


@pytest.fixture(scope="module")
def small_hf():
    return build_hf_sam(SMALL_VISION, seed=3)


@pytest.fixture(scope="module")
def small_files(small_hf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_small")
    return {"safetensors": save_safetensors(small_hf, folder), "bin": save_bin(small_hf, folder)}


def test_looks_like_hf(small_hf):
    assert hf_weights.looks_like_hf(small_hf.state_dict())
    assert not hf_weights.looks_like_hf(build_random_sam().state_dict())
    assert not hf_weights.looks_like_hf({})
    assert hf_weights.looks_like_hf({"vision_encoder.layers.0.attn.qkv.weight": torch.zeros(3, 1)})


def test_converted_keys_are_exactly_sams(small_hf):
    state = small_hf.state_dict()
    out = hf_weights.convert_hf_to_sam(state)
    arch = model.detect_architecture(out)
    assert arch == model.Architecture(96, 3, 3, (1,))
    expected = model.build_sam(arch).state_dict()
    assert sorted(out) == sorted(expected)
    assert all(tuple(out[k].shape) == tuple(expected[k].shape) for k in expected)
    # Hand-written spot checks of the map (the same tensor objects: re-keying only, no copies).
    pairs = {
        "image_encoder.patch_embed.proj.weight": "vision_encoder.patch_embed.projection.weight",
        "image_encoder.blocks.2.norm2.bias": "vision_encoder.layers.2.layer_norm2.bias",
        "image_encoder.blocks.1.attn.rel_pos_w": "vision_encoder.layers.1.attn.rel_pos_w",
        "image_encoder.neck.1.weight": "vision_encoder.neck.layer_norm1.weight",
        "image_encoder.neck.2.weight": "vision_encoder.neck.conv2.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": "shared_image_embedding.positional_embedding",
        "prompt_encoder.point_embeddings.3.weight": "prompt_encoder.point_embed.3.weight",
        "prompt_encoder.mask_downscaling.4.weight": "prompt_encoder.mask_embed.layer_norm2.weight",
        "prompt_encoder.mask_downscaling.6.bias": "prompt_encoder.mask_embed.conv3.bias",
        "mask_decoder.transformer.layers.1.norm4.weight": "mask_decoder.transformer.layers.1.layer_norm4.weight",
        "mask_decoder.transformer.norm_final_attn.bias": "mask_decoder.transformer.layer_norm_final_attn.bias",
        "mask_decoder.output_upscaling.3.weight": "mask_decoder.upscale_conv2.weight",
        "mask_decoder.output_upscaling.1.bias": "mask_decoder.upscale_layer_norm.bias",
        "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight": "mask_decoder.output_hypernetworks_mlps.2.proj_in.weight",
        "mask_decoder.output_hypernetworks_mlps.2.layers.1.weight": "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
        "mask_decoder.output_hypernetworks_mlps.2.layers.2.bias": "mask_decoder.output_hypernetworks_mlps.2.proj_out.bias",
        "mask_decoder.iou_prediction_head.layers.2.weight": "mask_decoder.iou_prediction_head.proj_out.weight",
    }
    # Box prompts never use point embeddings 0/1, not-a-point or the mask convs: check those by name.
    pairs.update({f"prompt_encoder.point_embeddings.{i}.weight": f"prompt_encoder.point_embed.{i}.weight"
                  for i in range(4)})
    pairs.update({f"prompt_encoder.mask_downscaling.{s}.{w}": f"prompt_encoder.mask_embed.{h}.{w}"
                  for s, h in (("0", "conv1"), ("1", "layer_norm1"), ("3", "conv2"), ("4", "layer_norm2"), ("6", "conv3"))
                  for w in ("weight", "bias")})
    for name in ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.no_mask_embed.weight"):
        pairs[name] = name
    for sam_key, hf_key in pairs.items():
        assert out[sam_key] is state[hf_key], sam_key


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_checkpoint_gives_same_outputs(small_hf, small_files, fmt):
    sam, arch = model.load_sam(small_files[fmt])
    assert arch == model.Architecture(96, 3, 3, (1,))
    boxes = [[100.0, 220.5, 600.0, 700.0], [0.0, 0.0, 1023.0, 1023.0]]
    d_emb, d_logits, d_iou = compare(small_hf, sam, boxes, seed=1)
    print(f"\n{fmt}: max rel diff embedding {d_emb:.2e}, logits {d_logits:.2e}, iou {d_iou:.2e}")
    assert d_emb < TIGHT and d_logits < TIGHT and d_iou < TIGHT


def test_safetensors_file_holds_one_copy_of_the_tied_embedding(small_files):
    from safetensors.torch import load_file

    names = set(load_file(small_files["safetensors"]))
    present = [n for n in hf_weights._POS_NAMES if n in names]
    assert len(present) == 1  # save_pretrained drops the tied duplicate; conversion must cope


def test_tied_embedding_under_either_name(small_hf):
    state = small_hf.state_dict()
    pe = state["shared_image_embedding.positional_embedding"]
    only_prompt = {k: v for k, v in state.items() if k != "shared_image_embedding.positional_embedding"}
    out = hf_weights.convert_hf_to_sam(only_prompt)
    assert out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] is only_prompt[
        "prompt_encoder.shared_embedding.positional_embedding"]
    assert torch.equal(out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"], pe)
    differing = dict(state)
    differing["prompt_encoder.shared_embedding.positional_embedding"] = pe + 1.0
    with pytest.raises(CheckpointError, match="differ"):
        hf_weights.convert_hf_to_sam(differing, "x.bin")


def test_vit_b_config(tmp_path):
    """The real ViT-B sizes (hidden 768, 12 layers, 12 heads, global 2,5,8,11, window 14): build, save, one forward."""
    hf = build_hf_sam(None, seed=5, decoder_eps=None)  # transformers' defaults, as published
    assert hf.config.mask_decoder_config.layer_norm_eps == 1e-6
    vc = hf.config.vision_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, list(vc.global_attn_indexes),
            vc.window_size) == (768, 12, 12, [2, 5, 8, 11], 14)
    path = save_safetensors(hf, tmp_path)
    sam, arch = model.load_sam(path)
    assert arch.name == "vit_b"
    assert sum(p.numel() for p in sam.parameters()) == 93_735_472  # the published MedSAM ViT-B count
    d_emb, d_logits, d_iou = compare(hf, sam, [[300.0, 410.0, 720.0, 655.0]], seed=2)
    print(f"\nViT-B: max rel diff embedding {d_emb:.2e}, logits {d_logits:.2e}, iou {d_iou:.2e}")
    assert d_emb < TOL and d_logits < TOL and d_iou < TOL


def test_missing_tensor_is_a_one_line_checkpoint_error(small_hf, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in small_hf.state_dict().items()
             if k not in ("prompt_encoder.shared_embedding.positional_embedding",
                          "mask_decoder.output_hypernetworks_mlps.1.proj_out.bias")}
    path = str(tmp_path / "broken.safetensors")
    save_file(state, path)
    with pytest.raises(CheckpointError) as err:
        model.load_sam(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "mask_decoder.output_hypernetworks_mlps.1.proj_out.bias" in msg and "lacks 1 tensor" in msg
    with pytest.raises(CheckpointError, match=r"^checkpoint broken\.safetensors \(Hugging Face"):
        hf_weights.convert_hf_to_sam(state, "broken.safetensors")


def test_whole_missing_layer_and_positional_embedding_are_reported(small_hf):
    state = small_hf.state_dict()
    no_layer = {k: v for k, v in state.items() if not k.startswith("vision_encoder.layers.1.")}
    with pytest.raises(CheckpointError, match=r"lacks 14 tensor\(s\) \(e\.g\. vision_encoder\.layers\.1\."):
        hf_weights.convert_hf_to_sam(no_layer)
    no_pe = {k: v for k, v in state.items() if k not in hf_weights._POS_NAMES}
    with pytest.raises(CheckpointError, match="shared_image_embedding.positional_embedding"):
        hf_weights.convert_hf_to_sam(no_pe)
    encoder_only = {k: v for k, v in state.items() if k.startswith("vision_encoder.")}
    with pytest.raises(CheckpointError, match="lacks"):
        hf_weights.convert_hf_to_sam(encoder_only)


def test_unknown_key_is_a_checkpoint_error(small_hf, tmp_path):
    state = dict(small_hf.state_dict())
    state["vision_encoder.layers.0.attn.extra.weight"] = torch.zeros(2)
    path = str(tmp_path / "odd.bin")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"vision_encoder\.layers\.0\.attn\.extra\.weight") as err:
        model.load_sam(path)
    assert "\n" not in str(err.value)


def test_sam_state_dict_is_untouched(tmp_path, monkeypatch):
    sam_ref = build_random_sam(seed=4)
    state = sam_ref.state_dict()
    path = str(tmp_path / "medsam_tiny.pth")
    torch.save(state, path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("SAM-format weights went through the HF converter")

    monkeypatch.setattr(hf_weights, "convert_hf_to_sam", must_not_run)
    assert model.to_sam_layout(state, "x") == state
    assert all(model.to_sam_layout(state, "x")[k] is v for k, v in state.items())
    sam, _ = model.load_sam(path)
    loaded = sam.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_hf_weights_imports_neither_torch_nor_transformers():
    code = ("import sys, medsam_slicer.hf_weights; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(hf_weights.__file__)))
    env = dict(os.environ, PYTHONPATH=pkg)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
