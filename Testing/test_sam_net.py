"""`models/sam_net.py` (the engine's SAM networks) against segment-anything's own modules.

The engine no longer imports segment-anything (its package import pulls torchvision and
torch._dynamo: 1.5-2 s of every command's start-up), so these tests hold our networks to it:
the same state-dict names and shapes (checkpoints load strictly either way), the same random
weights under the same seed, and the same outputs on real CT inputs (<= 1e-6 relative in fp32; in
practice bit for bit, the operations being the same). The last test checks, in a fresh process,
that loading both models and segmenting leaves segment_anything, torchvision and torch._dynamo
unimported.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from model_factory import TINY, VIT_B

from medsam_slicer.errors import WeightsError
from medsam_slicer.models import litemedsam, medsam, sam_net
from medsam_slicer.windowing import choose_window

build_sam = pytest.importorskip("segment_anything.build_sam")

RTOL = 1e-6
# ViT-B's widths (768 channels, 12 heads of 64) in two blocks, one windowed and one global: every
# code path of ViT-B's encoder at a sixth of its cost.
VIT_B_TWO_BLOCKS = dict(encoder_embed_dim=768, encoder_depth=2, encoder_num_heads=12, encoder_global_attn_indexes=[1])
BOX = (20, 30, 60, 95)  # right lung on CTChest4
SLICE = 15


def reference(config, seed: int = 0):
    torch.manual_seed(seed)
    return build_sam._build_sam(checkpoint=None, **config).eval()


def ours(config, seed: int = 0):
    torch.manual_seed(seed)
    return sam_net.build_sam_vit(config["encoder_embed_dim"], config["encoder_depth"], config["encoder_num_heads"],
                                 config["encoder_global_attn_indexes"])


def assert_same(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = float(expected.abs().max()) or 1.0
    assert float((got - expected).abs().max()) <= RTOL * scale


@pytest.fixture(scope="module")
def grey(ct_array):
    return choose_window(ct_array).apply(ct_array[SLICE])


@pytest.fixture(scope="module")
def medsam_input(grey):
    return torch.from_numpy(np.ascontiguousarray(medsam.model_input(grey)))


@pytest.fixture(scope="module")
def tiny_pair():
    ref = reference(TINY, seed=3)
    net = ours(TINY, seed=4)  # other random weights, then the reference's loaded: strict
    medsam.load_into(net, ref.state_dict(), "tiny", "SAM")
    return ref, net


@pytest.fixture(scope="module")
def lite_pair():
    """(segment-anything's prompt encoder and mask decoder, our LiteMedSAM network), the real weights."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    from medsam_slicer.model import read_state_dict

    try:
        path = litemedsam.ensure_weights(None, download=False)
    except WeightsError:
        pytest.skip("LiteMedSAM weights not available here")
    state = read_state_dict(path)
    net, _ = litemedsam.build(state, "lite_medsam.pth")
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    for name, module in (("prompt_encoder", prompt), ("mask_decoder", decoder)):
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        module.eval()
    return prompt, decoder, net


# ---------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_names_and_shapes_are_segment_anythings(arch):
    dim, depth, heads, glob = medsam.NAMED_ARCHITECTURES[arch]
    with torch.device("meta"):  # names and shapes only: no memory for ViT-H's weights
        expected = build_sam._build_sam(dim, depth, heads, list(glob)).state_dict()
        got = medsam.build_sam(medsam.Architecture(dim, depth, heads, glob)).state_dict()
    assert list(got) == list(expected)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_same_seed_draws_the_same_random_weights():
    expected, got = reference(TINY, seed=7).state_dict(), ours(TINY, seed=7).state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_segment_anything_checkpoint_loads_and_detects(vit_b_checkpoint):
    from medsam_slicer.model import load_model

    net, family, arch = load_model(vit_b_checkpoint)
    assert family is medsam and arch == "vit_b" and isinstance(net, sam_net.SamNet)
    saved = torch.load(vit_b_checkpoint, map_location="cpu", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    assert not net.training and net.mask_threshold == 0.0


def test_classes_are_module_attributes_and_pickle(tiny_pair):
    _, net = tiny_pair
    assert type(net) is sam_net.SamNet and type(net.image_encoder) is sam_net.ImageEncoderViT
    assert type(net.mask_decoder.transformer) is sam_net.TwoWayTransformer
    copy = pickle.loads(pickle.dumps(net))
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), net.state_dict().values()))
    with pytest.raises(AttributeError):
        sam_net.NoSuchClass  # noqa: B018


def test_importing_sam_net_does_not_import_torch():
    code = "import sys, medsam_slicer.models.sam_net as m; print('torch' in sys.modules, m.PROMPT_DIM)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "256"]


# ------------------------------------------------------------------------------ the same numbers


@pytest.mark.parametrize("config", [TINY, VIT_B_TWO_BLOCKS], ids=["tiny", "vit_b_widths_two_blocks"])
def test_vit_encoder_matches_on_a_real_ct_slice(config, medsam_input):
    ref = reference(config, seed=5)
    net = ours(config, seed=6)
    medsam.load_into(net, ref.state_dict(), "random", "SAM")
    with torch.no_grad():
        assert_same(net.image_encoder(medsam_input), ref.image_encoder(medsam_input))


def _boxes(family, grey):
    h, w = grey.shape
    boxes = [BOX, (5, 10, w - 8, h - 10), (30, 40, 31, 41)]
    return torch.as_tensor(family.boxes_to_model(boxes, h, w), dtype=torch.float)[:, None, :]


def _prompts(boxes, size):
    """Box, point and mask prompts in the model frame of an input `size` pixels wide."""
    g = torch.Generator().manual_seed(0)
    points = torch.rand(boxes.shape[0], 3, 2, generator=g) * size
    labels = torch.tensor([[1, 0, -1], [0, 1, 1], [-1, 0, 1]])
    return [dict(points=None, boxes=boxes, masks=None), dict(points=(points, labels), boxes=None, masks=None),
            dict(points=(points, labels), boxes=boxes, masks=None)]


def _compare_prompt_side(ref_prompt, ref_decoder, net, embedding, boxes, size):
    with torch.no_grad():
        assert_same(net.prompt_encoder.get_dense_pe(), ref_prompt.get_dense_pe())
        low_res = None
        for i, prompts in enumerate(_prompts(boxes, size)):
            expected = ref_prompt(**prompts)
            got = net.prompt_encoder(**prompts)
            for a, b in zip(got, expected):
                assert_same(a, b)
            for multimask in (False, True) if i == 0 else (False,):  # the engine's box prompts: both outputs
                ref_out = ref_decoder(image_embeddings=embedding, image_pe=ref_prompt.get_dense_pe(),
                                      sparse_prompt_embeddings=expected[0], dense_prompt_embeddings=expected[1],
                                      multimask_output=multimask)
                out = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=got[0], dense_prompt_embeddings=got[1],
                                       multimask_output=multimask)
                assert_same(out[0], ref_out[0])  # logits
                assert_same(out[1], ref_out[1])  # IoU estimates
                low_res = ref_out[0] if not multimask else low_res
        # a mask prompt: the previous masks' low-res logits, as SAM's iterative refinement feeds them
        masks = dict(points=None, boxes=boxes, masks=low_res)
        for a, b in zip(net.prompt_encoder(**masks), ref_prompt(**masks)):
            assert_same(a, b)


def test_medsam_prompt_encoder_and_decoder_match(tiny_pair, medsam_input, grey):
    ref, net = tiny_pair
    with torch.no_grad():
        embedding = ref.image_encoder(medsam_input)
    _compare_prompt_side(ref.prompt_encoder, ref.mask_decoder, net, embedding, _boxes(medsam, grey), medsam.INPUT_SIZE)


def test_litemedsam_prompt_encoder_and_decoder_match_with_the_real_weights(lite_pair, grey):
    prompt, decoder, net = lite_pair
    x = torch.from_numpy(litemedsam.model_input(grey))
    with torch.no_grad():
        embedding = net.image_encoder(x)
    _compare_prompt_side(prompt, decoder, net, embedding, _boxes(litemedsam, grey), litemedsam.INPUT_SIZE)


def test_the_benchmarks_reference_row_runs_segment_anythings_own_sam(tiny_pair):
    from medsam_slicer import bench

    _, net = tiny_pair
    ref = bench._reference_network(net, medsam)
    assert type(ref).__module__.startswith("segment_anything.") and not ref.training
    expected = net.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in ref.state_dict().items())
    assert bench._reference_network(net, litemedsam) is net  # other families: their own network


# ----------------------------------------------------------------------------------- start-up cost


def test_the_engine_never_imports_segment_anything_torchvision_or_dynamo(vit_b_checkpoint, ct_path, tmp_path):
    """In a fresh process: import medsam_slicer, load a ViT-B checkpoint (segment-anything's builder
    made it) and decode with its engine, and segment 3 slices with LiteMedSAM's real weights."""
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import medsam_slicer
        import medsam_slicer.bench
        from medsam_slicer.engine import MedSAMEngine
        from medsam_slicer.errors import WeightsError
        from medsam_slicer.model import load_model
        from medsam_slicer.models import litemedsam

        net, family, arch = load_model({vit_b_checkpoint!r})
        assert arch == "vit_b", arch
        engine = MedSAMEngine(net, "cpu", family=family)
        import torch
        prob, iou = engine.decode(torch.zeros(1, 256, 64, 64), np.array([[20, 30, 60, 95]]), (128, 128))
        assert prob.shape == (1, 128, 128), prob.shape
        try:
            litemedsam.ensure_weights(None, download=False)
            lite = True
        except WeightsError:
            lite = False
        if lite:
            from medsam_slicer.cli import main
            rc = main(["segment", {ct_path!r}, "-o", {str(tmp_path / "out.nii.gz")!r}, "--box", "20", "30", "14",
                       "60", "95", "16", "--model", "litemedsam", "--window", "400", "40", "--force", "--quiet"])
            assert rc == 0, rc
        print("lite" if lite else "no-lite")
        print(" ".join(m for m in ("segment_anything", "torchvision", "torch._dynamo") if m in sys.modules) or "none")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "none", f"imported: {lines[-1]}"
    if lines[-2] != "lite":
        pytest.skip("checked ViT-B only: LiteMedSAM weights not available here")
