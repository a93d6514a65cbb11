"""Checkpoint loading: architecture from shapes, safe loading, one-line errors, devices."""
from __future__ import annotations

import os

import pytest
import torch

from medsam_slicer.errors import CheckpointError, InputError
from medsam_slicer.model import resolve_device
from medsam_slicer.models.medsam import detect_architecture, load_sam
from model_factory import TINY, VIT_B, build_random_sam


def one_line(exc):
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_architecture_read_from_shapes_not_name(tmp_path):
    path = tmp_path / "medsam_vit_h_looking_name.pth"  # the name lies; the shapes decide
    torch.save(build_random_sam(TINY).state_dict(), path)
    sam, arch = load_sam(str(path))
    assert (arch.embed_dim, arch.depth, arch.num_heads, arch.global_attn_indexes) == (64, 2, 2, (1,))
    assert arch.name.startswith("custom")


def test_named_architectures_detected_from_shapes():
    sam = build_random_sam(VIT_B)
    assert detect_architecture(sam.state_dict()).name == "vit_b"


def test_training_checkpoint_with_nested_model_key_loads(tmp_path):
    sam = build_random_sam(TINY, seed=3)
    path = tmp_path / "epoch10.pth"
    torch.save({"model": sam.state_dict(), "epoch": 10}, path)
    loaded, _ = load_sam(str(path))
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(loaded.state_dict()[key], sam.state_dict()[key])


def test_loading_skips_the_random_init_it_overwrites(tmp_path, monkeypatch):
    """Building a network that a checkpoint fills draws no random weights (~0.45 s of a ViT-B load),
    for both families; every tensor is the file's, and torch's init works again afterwards."""
    from medsam_slicer.model import load_model
    from medsam_slicer.models.litemedsam import package_asset

    calls = []
    real = torch.nn.init.kaiming_uniform_

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counting)
    sam = build_random_sam(TINY, seed=5)
    assert calls, "the spy sees a network built with random init"
    path = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), path)
    files = [str(path)] + ([package_asset()] if package_asset() else [])
    for file in files:
        calls.clear()
        net, family, _ = load_model(file)
        assert calls == [], f"{family.NAME}: {len(calls)} random fills while loading"
        state = torch.load(file, map_location="cpu", weights_only=True)
        assert all(torch.equal(v, state[k].float()) for k, v in net.state_dict().items() if k in state)
    assert torch.nn.init.kaiming_uniform_ is counting
    fresh = torch.nn.Linear(16, 16)
    assert calls and fresh.weight.abs().sum() > 0


def test_gpu_saved_checkpoint_loads_on_cpu(tmp_path):
    """A checkpoint saved from CUDA tensors (storage location 'cuda:0') loads on a CPU-only machine."""
    import zipfile

    cpu_path = tmp_path / "cpu.pth"
    sam = build_random_sam(TINY)
    torch.save(sam.state_dict(), cpu_path)
    gpu_path = tmp_path / "saved_on_gpu.pth"
    with zipfile.ZipFile(cpu_path) as src, zipfile.ZipFile(gpu_path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):  # rewrite each storage's location tag as a GPU save has it
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert b"cuda:0" in data
            dst.writestr(item, data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):  # what segment-anything's own loader would hit
            torch.load(gpu_path, weights_only=True)
    loaded, _ = load_sam(str(gpu_path))
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    key = "image_encoder.patch_embed.proj.weight"
    assert torch.equal(loaded.state_dict()[key], sam.state_dict()[key])


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_sam(str(tmp_path / "nope.pth"))
    assert "no such file" in one_line(exc)


def test_truncated_checkpoint(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(build_random_sam(TINY).state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_sam(str(bad))
    assert "truncated.pth" in one_line(exc)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("these are not weights")
    with pytest.raises(CheckpointError) as exc:
        load_sam(str(bad))
    assert one_line(exc) == "checkpoint notes.pth is not a PyTorch or safetensors file"


def test_checkpoint_with_python_objects_says_how_to_keep_its_tensors(tmp_path):
    import argparse

    state = build_random_sam(TINY).state_dict()
    path = tmp_path / "trained.pth"  # as a training script saves it: weights and its arguments
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_sam(str(path))
    message = one_line(exc)
    assert message.startswith("checkpoint trained.pth holds a Python object (argparse.Namespace) besides its tensors")
    assert "torch.save only its state dict" in message
    # following the advice gives a checkpoint that loads (the weights nest under "model", as before)
    torch.save({"model": torch.load(path, weights_only=False)["model"]}, path)
    loaded, _ = load_sam(str(path))
    key = "image_encoder.patch_embed.proj.weight"
    assert torch.equal(loaded.state_dict()[key], state[key])


def test_state_dict_of_another_model(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_sam(str(path))
    assert "not a SAM/MedSAM state dict" in one_line(exc)


def test_wrong_shapes(tmp_path):
    state = build_random_sam(TINY).state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    path = tmp_path / "shapes.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        load_sam(str(path))
    assert "wrong shape for mask_decoder.iou_token.weight" in one_line(exc)


def test_missing_tensors(tmp_path):
    state = build_random_sam(TINY).state_dict()
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        load_sam(str(path))
    assert "missing" in one_line(exc)


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected, not executed."""
    path = tmp_path / "evil.pth"
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_sam(str(path))
    assert not marker.exists()


def test_devices():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        assert resolve_device("auto") != "cuda"
        with pytest.raises(InputError):
            resolve_device("cuda")
    with pytest.raises(InputError):
        resolve_device("tpu")
