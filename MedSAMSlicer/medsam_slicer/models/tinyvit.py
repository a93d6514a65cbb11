"""LiteMedSAM's image encoder: a TinyViT at 256 x 256 input, written for this project.

Why our own: the official LiteMedSAM weights (``lite_medsam.pth``) need the TinyViT variant that
MobileSAM and LiteMedSAM vendor, and the packages that ship it need timm and Python >= 3.10, while
3D Slicer embeds Python 3.9. This module depends on torch alone.

What it is (the layout of the checkpoint's ``image_encoder.*`` tensors, so that
``TinyViTEncoder().load_state_dict(sd, strict=True)`` takes them as they are):

* ``patch_embed``: two 1 x 1 conv + BatchNorm with a GELU between (3 -> 32 -> 64 channels). There is
  no downsampling: the first stage runs at the full 256 x 256.
* stage 0: two MBConv blocks (1x1 expand x4, 3x3 depthwise, 1x1 project, residual, GELUs).
* stages 1-3: TinyViT blocks. Windowed self-attention with a learned bias per head and per
  (|dy|, |dx|) offset inside the window, then a 3x3 depthwise conv + BatchNorm that *replaces* the
  stream (no residual around it), then an MLP with a residual. Windows are 7, 14 and 7 tokens wide
  at 128, 64 and 64 tokens a side, so windows at the bottom and right edges are zero-padded; the
  attention's layer norm runs after that padding, so padded tokens enter attention as the norm's
  bias (this is what the weights were trained with, and the reason we pad before normalising).
* between stages: "patch merging" (1x1 conv, 3x3 depthwise conv with stride 2, or stride 1 into
  the last, 320-channel stage, then 1x1 conv; BatchNorm after each, GELU after the first two).
* ``neck``: SAM's 1x1 conv, channel LayerNorm, 3x3 conv, channel LayerNorm to 256 x 64 x 64.

Input: (B, 3, 256, 256) float32 in [0, 1] (LiteMedSAM normalises by min-max only);
output: (B, 256, 64, 64).

``prepare_fast_encoder`` builds an inference-only function of the same maths over a private copy
of the weights: BatchNorm folded into the convolutions, attention biases gathered once, the query
pre-scaled, channels-last (NHWC) activations throughout, the large intermediates computed in
cache-sized bands, and an optional reduced compute dtype with the residual stream kept in float32.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..onednn_linear import linear, pack
from .sam_net import classes

IMG_SIZE = 256
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)  # stage 0 is convolutional: its entry is unused
WINDOWS = (7, 7, 14, 7)  # likewise
MLP_RATIO = 4
MBCONV_EXPAND = 4
NECK_DIM = 256


class ConvBN(nn.Module):
    """A bias-free convolution followed by BatchNorm (checkpoint keys ``c.*`` and ``bn.*``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.c(x))

    @torch.no_grad()
    def folded(self):
        """(weight, bias) of the single convolution equal to this one in eval mode."""
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return self.c.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


class MBConv(nn.Module):
    """Inverted residual block of stage 0 (NCHW in and out)."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = dim * MBCONV_EXPAND
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x):
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Change of width (and halving of the resolution unless stride is 1) between stages; NCHW."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x):
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def window_bias_index(window: int):
    """(L, L) index of token pair -> offset (|dy|, |dx|) in the attention_biases table, L = window².

    The checkpoint numbers offsets in order of first appearance over row-major token pairs; the
    first token (0, 0) already meets every offset, in row-major order, so index = |dy| * window + |dx|.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Multi-head attention inside one window; (N, L, C) -> (N, L, C), normalising its input first."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        self.register_buffer("bias_index", window_bias_index(window), persistent=False)

    def forward(self, x):
        n, length, dim = x.shape
        head_dim = dim // self.heads
        # The checkpoint's qkv rows are grouped per head as [q | k | v] of head_dim each.
        qkv = self.qkv(self.norm(x)).view(n, length, self.heads, 3, head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5 + self.attention_biases[:, self.bias_index]
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def to_windows(x, window: int):
    """(B, H, W, C) -> (B * nH * nW, window², C), zero-padding bottom and right edges."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    nh, nw = (h + pad_h) // window, (w + pad_w) // window
    x = x.view(b, nh, window, nw, window, c).transpose(2, 3)
    return x.reshape(b * nh * nw, window * window, c)


def from_windows(x, b: int, h: int, w: int, window: int):
    """Inverse of :func:`to_windows`, cropping the padding: -> (B, H, W, C)."""
    c = x.shape[-1]
    nh, nw = -(-h // window), -(-w // window)
    x = x.view(b, nh, nw, window, window, c).transpose(2, 3).reshape(b, nh * window, nw * window, c)
    return x[:, :h, :w]


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local conv, MLP. Works on (B, H, W, C)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = Mlp(dim, dim * MLP_RATIO)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def forward(self, x):
        b, h, w, _ = x.shape
        x = x + from_windows(self.attn(to_windows(x, self.window)), b, h, w, self.window)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class Stage(nn.Module):
    """Blocks at one resolution, then (except the last stage) the patch merging into the next."""

    def __init__(self, blocks, downsample: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


LayerNorm2d = classes()["LayerNorm2d"]  # SAM's channel layer norm: the neck is SAM's


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's image encoder: (B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64)."""

    def __init__(self):
        super().__init__()
        d = EMBED_DIMS
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(ConvBN(3, d[0] // 2), nn.GELU(), ConvBN(d[0] // 2, d[0]))
        layers = [Stage([MBConv(d[0]) for _ in range(DEPTHS[0])], PatchMerging(d[0], d[1], stride=2))]
        for i in range(1, 4):
            blocks = [TinyViTBlock(d[i], NUM_HEADS[i], WINDOWS[i]) for _ in range(DEPTHS[i])]
            # The last merging keeps 64 x 64: the stage-3 tokens already match SAM's embedding grid.
            merge = PatchMerging(d[i], d[i + 1], stride=2 if i == 1 else 1) if i < 3 else None
            layers.append(Stage(blocks, merge))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(d[3], NECK_DIM, 1, bias=False),
            LayerNorm2d(NECK_DIM),
            nn.Conv2d(NECK_DIM, NECK_DIM, 3, padding=1, bias=False),
            LayerNorm2d(NECK_DIM),
        )

    def forward(self, x):
        x = self.patch_embed.seq(x)
        for block in self.layers[0].blocks:
            x = block(x)
        x = self.layers[0].downsample(x).permute(0, 2, 3, 1)  # NHWC for the transformer stages
        for stage in self.layers[1:]:
            for block in stage.blocks:
                x = block(x)
            if stage.downsample is not None:
                x = stage.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.neck(x.permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Inference-only fast path
# ---------------------------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class _Weights:
    """A bag of tensors for one block (attributes set by the preparing code)."""


def _dwconv(x, weight, bias, stride: int = 1):
    """3x3 depthwise conv of an NHWC tensor, returned NHWC.

    The permuted view is a channels-last NCHW tensor, which oneDNN convolves in place of layout, and
    its channels-last result permutes back to a contiguous NHWC tensor: no copies either way.
    """
    return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride, 1, groups=x.shape[-1]).permute(0, 2, 3, 1)


def _gelu_(x):
    """GELU (exact, erf) in place: the large stage-0 activations are not worth a second buffer."""
    return torch.ops.aten.gelu_(x)


def _attention(q, k, v, bias):
    """softmax(q kᵀ + bias) v with q already scaled; (N, heads, L, d).

    On a 2-core CPU, for these small windows (49 or 196 tokens, 32 dims per head), one batched
    matmul, an in-place broadcast add of the (heads, L, L) bias and a softmax were as fast as or
    faster than ``scaled_dot_product_attention`` with a mask (``_sdpa``, timed by
    benchmarks/tinyvit_speed.py).
    """
    scores = torch.matmul(q, k.transpose(-2, -1)).add_(bias)
    return torch.matmul(scores.softmax(-1), v)


def _sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


class FastTinyViT:
    """LiteMedSAM's TinyViT as plain functions over folded weights; see :func:`prepare_fast_encoder`.

    Activations are NHWC (channels-last) from end to end, so that every 1x1 convolution is one
    matrix product over the pixels (``linear``: oneDNN for float32 weights on the CPU, see
    onednn_linear.py) and the transformer stages need no layout changes.
    The stream between blocks stays float32, as do layer norms, the local convs, the patch
    embedding and the patch mergings; the MBConv, attention, MLP and neck convolutions run in
    ``dtype``.
    """

    def __init__(self, encoder: TinyViTEncoder, dtype=torch.float32, device="cpu", attention=None):
        dt = _DTYPES[dtype.lower()] if isinstance(dtype, str) else dtype
        self.dtype, self.device = dt, torch.device(device)
        self.attention = attention or _attention
        self.band_rows = 16  # stage-0 rows per band: 4 MB of 256-channel float32 hidden
        self.chunk_tokens = 1024  # MLP tokens per chunk

        def cp(t, to=dt):  # a private copy: the caller's module is never aliased nor modified
            return t.detach().to(device=self.device, dtype=to, copy=True).contiguous()

        def conv(m: ConvBN, to=dt):  # folded (weight, bias); 1x1 convolutions as linear weights
            w, b = m.folded()
            if w.shape[-1] == 1 and m.c.groups == 1:
                return lin(w[:, :, 0, 0], to), cp(b, to)
            return cp(w, to), cp(b, to)

        def lin(t, to=dt):  # a weight of `linear`: float32 ones packed for oneDNN (onednn_linear.py)
            return pack(cp(t, to))

        with torch.no_grad():
            # The patch embedding and the patch mergings stay float32 whatever `dtype` is: they hold
            # under 10% of the arithmetic but, in bfloat16, half of the embedding's error (the
            # input itself is not exact in bfloat16).
            f32 = torch.float32
            seq = encoder.patch_embed.seq
            self.embed = (conv(seq[0], f32), conv(seq[2], f32))
            self.mbconv = []
            for blk in encoder.layers[0].blocks:
                self.mbconv.append((conv(blk.conv1), conv(blk.conv2), conv(blk.conv3)))
            self.merges = []
            for stage in encoder.layers[:3]:
                ds = stage.downsample
                self.merges.append((conv(ds.conv1, f32), conv(ds.conv2, f32), conv(ds.conv3, f32), ds.conv2.c.stride[0]))
            self.stages = [[self._block(blk, cp, conv, lin) for blk in stage.blocks] for stage in encoder.layers[1:]]
            neck = encoder.neck
            self.neck1 = lin(neck[0].weight[:, :, 0, 0])
            self.neck2 = cp(neck[2].weight)
            self.neck_norms = [(cp(n.weight, torch.float32), cp(n.bias, torch.float32), n.eps) for n in (neck[1], neck[3])]

    def _block(self, blk: TinyViTBlock, cp, conv, lin):
        w = _Weights()
        attn, f32 = blk.attn, torch.float32
        dim, heads = attn.qkv.in_features, attn.heads
        head_dim = dim // heads
        w.window, w.heads = blk.window, heads
        w.norm1 = (cp(attn.norm.weight, f32), cp(attn.norm.bias, f32), attn.norm.eps)
        # qkv rows: per head [q | k | v] in the checkpoint -> [all q | all k | all v], q pre-scaled
        # by head_dim^-0.5 so that attention needs no separate scaling pass.
        scale = torch.ones(heads, 3, head_dim, 1)
        scale[:, 0] = head_dim ** -0.5
        qkv_w = (attn.qkv.weight.view(heads, 3, head_dim, dim) * scale).transpose(0, 1).reshape(3 * dim, dim)
        qkv_b = (attn.qkv.bias.view(heads, 3, head_dim) * scale[..., 0]).transpose(0, 1).reshape(3 * dim)
        w.qkv = (lin(qkv_w), cp(qkv_b))
        w.proj = (lin(attn.proj.weight), cp(attn.proj.bias))
        w.bias = cp(attn.attention_biases[:, attn.bias_index])  # (heads, L, L), gathered once
        w.local = conv(blk.local_conv, f32)  # the local conv produces the float32 stream
        mlp = blk.mlp
        w.norm2 = (cp(mlp.norm.weight, f32), cp(mlp.norm.bias, f32), mlp.norm.eps)
        w.fc1 = (lin(mlp.fc1.weight), cp(mlp.fc1.bias))
        w.fc2 = (lin(mlp.fc2.weight), cp(mlp.fc2.bias))
        return w

    def _merge(self, x, weights):
        (w1, b1), (w2, b2), (w3, b3), stride = weights
        y = _gelu_(linear(x, w1, b1))  # float32, see __init__
        return linear(_gelu_(_dwconv(y, w2, b2, stride)), w3, b3)

    def _mbconv(self, x, weights):
        """One MBConv on the float32 NHWC stream, in bands of rows.

        At 256 x 256 the 256-channel hidden tensors are 64 MB each in float32: computed whole, they
        cost more in memory traffic and page faults than in arithmetic. A band of rows (plus one
        halo row each side for the 3x3 conv) keeps them in cache.
        """
        (w1, b1), (w2, b2), (w3, b3) = weights
        height = x.shape[1]
        out = torch.empty_like(x)
        for r0 in range(0, height, self.band_rows):
            r1 = min(r0 + self.band_rows, height)
            a, e = max(r0 - 1, 0), min(r1 + 1, height)
            y = _gelu_(linear(x[:, a:e].to(self.dtype), w1, b1))
            # Zero padding of the band is right at the image border, and the rows it spoils
            # inside the image are the halo rows, which are dropped.
            y = _gelu_(_dwconv(y, w2, b2)[:, r0 - a:r1 - a])
            y = linear(y, w3, b3)
            out[:, r0:r1] = _gelu_(y.add_(x[:, r0:r1]) if y.dtype == x.dtype else x[:, r0:r1] + y)
        return out

    def _window_attention_(self, x, w: _Weights):
        """x += attention over windows, one row of windows at a time (x: float32 NHWC, in place)."""
        b, h, wd, c = x.shape
        ws, heads = w.window, w.heads
        nw = -(-wd // ws)
        for r0 in range(0, h, ws):
            band = x[:, r0:r0 + ws]
            rows = band.shape[1]
            # Zero-pad, then normalise: padded tokens must enter attention as the norm's bias.
            win = F.pad(band, (0, 0, 0, nw * ws - wd, 0, ws - rows))
            win = win.view(b, ws, nw, ws, c).transpose(1, 2).reshape(b * nw, ws * ws, c)
            y = F.layer_norm(win, (c,), *w.norm1).to(self.dtype)
            qkv = linear(y, *w.qkv).view(b * nw, ws * ws, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            y = self.attention(qkv[0], qkv[1], qkv[2], w.bias).transpose(1, 2).reshape(b * nw, ws * ws, c)
            y = linear(y, *w.proj).view(b, nw, ws, ws, c).transpose(1, 2).reshape(b, ws, nw * ws, c)
            band += y[:, :rows, :wd]

    def _mlp_(self, x, w: _Weights):
        """x += MLP(norm(x)), token-wise, in chunks of tokens so the 4x wider hidden stays in cache."""
        c = x.shape[-1]
        tokens = x.view(-1, c)
        for i in range(0, tokens.shape[0], self.chunk_tokens):
            t = tokens[i:i + self.chunk_tokens]
            y = F.layer_norm(t, (c,), *w.norm2).to(self.dtype)
            t += linear(_gelu_(linear(y, *w.fc1)), *w.fc2)

    def _tinyvit_block(self, x, w: _Weights):
        """One TinyViT block; x is a float32 NHWC tensor of ours (updated in place where possible)."""
        self._window_attention_(x, w)
        x = _dwconv(x, *w.local)  # no residual around the local conv; a fresh contiguous tensor
        self._mlp_(x, w)
        return x

    def __call__(self, x, interrupt: Optional[Callable[[], bool]] = None):
        """(B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64) float32 embedding."""
        from medsam_slicer.fast_encoder import EncodeInterrupted

        def check():
            if interrupt is not None and interrupt():
                raise EncodeInterrupted()

        with torch.inference_mode():
            x = x.to(self.device, torch.float32).permute(0, 2, 3, 1)
            (w1, b1), (w2, b2) = self.embed
            x = linear(_gelu_(linear(x, w1, b1)), w2, b2)
            for weights in self.mbconv:
                check()
                x = self._mbconv(x, weights)
            x = self._merge(x, self.merges[0])
            for i, blocks in enumerate(self.stages):
                for w in blocks:
                    check()
                    x = self._tinyvit_block(x, w)
                if i + 1 < len(self.merges):
                    x = self._merge(x, self.merges[i + 1])
            check()
            (g1, c1, e1), (g2, c2, e2) = self.neck_norms
            y = F.layer_norm(linear(x.to(self.dtype), self.neck1).float(), (NECK_DIM,), g1, c1, e1)
            y = F.conv2d(y.to(self.dtype).permute(0, 3, 1, 2), self.neck2, None, 1, 1).permute(0, 2, 3, 1)
            y = F.layer_norm(y.float(), (NECK_DIM,), g2, c2, e2)
            return y.permute(0, 3, 1, 2).contiguous()


def prepare_fast_encoder(encoder: TinyViTEncoder, dtype=torch.float32, device="cpu", compile: bool = False):
    """An inference callable ``f(x, interrupt=None) -> (B, 256, 64, 64) float32`` over a copy of
    `encoder`'s weights, computing in `dtype` (torch dtype or "fp32"/"bf16"/"fp16").

    `interrupt`, if given, is called between blocks; when it returns True the call raises
    ``medsam_slicer.fast_encoder.EncodeInterrupted``. `compile=True` wraps the per-block functions
    in ``torch.compile`` (one graph per block shape, so interrupts still work between blocks).
    """
    fast = FastTinyViT(encoder, dtype, device)
    if compile:
        fast._mbconv = torch.compile(fast._mbconv, dynamic=False)
        fast._merge = torch.compile(fast._merge, dynamic=False)
        fast._tinyvit_block = torch.compile(fast._tinyvit_block, dynamic=False)
    return fast
