"""A faster SAM ViT image encoder: same maths as segment-anything's ImageEncoderViT, run differently.

What changes (and what does not):

* Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` in the windowed and
  the global blocks. SAM's decomposed relative-position bias is computed as segment-anything's
  ``add_decomposed_rel_pos`` computes it (the same lookup tables, the same ``q·R`` products with the
  unscaled query) and handed to SDPA as an additive attention mask. The lookup tables ``R_h, R_w``
  depend on the weights alone, so they are gathered once when the encoder is prepared. On the CPU
  the bias is built in a reused buffer of at most BIAS_BUDGET_BYTES, the heads in groups that fit:
  ViT-B's global blocks then take 64 MB, not 805 MB (`segment`'s peak 2.5 GB -> 1.8 GB, as fast).
* The weights are copied once into a separate set of tensors in the compute dtype (bfloat16 on
  CUDA and on CPUs with AVX512-BF16/AMX, float16 on Apple MPS, or float32). The caller's encoder is
  never touched: its parameters keep their values, dtype and device, so the fp32 model stays usable.
* The residual stream and the layer norms stay in float32 (as autocast would keep them), only the
  matrix products, attention and GELU run in the reduced dtype; the output is float32.
* On the CPU the float32 linear layers run on oneDNN, not MKL (``onednn_linear.py``: MKL takes its
  AVX2 kernels on AMD CPUs); their results differ by ~1e-6 relative.
* Optionally, on GPUs, ``torch.compile`` of the whole forward.

``prepare_encoder(encoder, dtype, device=None, compile=False)`` returns a :class:`FastImageEncoder`,
callable ``x (B, 3, 1024, 1024) -> embedding (B, 256, 64, 64) float32``. Its forward also accepts an
``interrupt`` callable, checked between transformer blocks: when it returns True the forward stops
with :class:`EncodeInterrupted` (background prefetch uses this to yield the model to a user request).
"""
from __future__ import annotations

import threading
from typing import Callable, List, Optional, Tuple


class EncodeInterrupted(Exception):
    """Raised inside a forward whose `interrupt` callable asked it to stop (the result is discarded)."""


def _dtype_of(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    return names[str(dtype).lower()]


def relative_position_table(q_size: int, k_size: int, rel_pos):
    """segment-anything's ``get_rel_pos``: the (q_size, k_size, C) table of relative embeddings.

    The table is resized with linear interpolation when its length is not 2*max(q, k)-1 and the
    coordinates are scaled when q and k differ, exactly as the reference does.
    """
    import torch
    import torch.nn.functional as F

    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        table = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear")
        table = table.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        table = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[coords.long()]


def rel_pos_bias(q, table_h, table_w, q_hw: Tuple[int, int], k_hw: Tuple[int, int], out=None):
    """The additive attention bias of ``add_decomposed_rel_pos`` as a (B, heads, Lq, Lk) mask.

    q: (B, heads, q_h * q_w, C), unscaled. bias[.., (y, x), (ky, kx)] = q·R_h[y, ky] + q·R_w[x, kx].
    `out`: an optional reusable buffer of B*heads*Lq*Lk elements (a fresh 400 MB buffer per global
    block costs more in page faults than the additions themselves on a CPU).
    """
    import torch

    q_h, q_w = q_hw
    k_h, k_w = k_hw
    b, heads, _, c = q.shape
    r_q = q.reshape(b, heads, q_h, q_w, c)  # a view (q is a strided slice of the qkv product): one copy each below
    # rel_h[n, y, x, ky] = sum_c r_q[n, y, x, c] * R_h[y, ky, c] (a batched matmul over y)
    rel_h = (r_q.permute(2, 0, 1, 3, 4).reshape(q_h, -1, c) @ table_h.transpose(1, 2))
    rel_h = rel_h.reshape(q_h, b * heads, q_w, k_h).permute(1, 0, 2, 3)
    # rel_w[n, y, x, kx] = sum_c r_q[n, y, x, c] * R_w[x, kx, c] (batched over x)
    rel_w = (r_q.permute(3, 0, 1, 2, 4).reshape(q_w, -1, c) @ table_w.transpose(1, 2))
    rel_w = rel_w.reshape(q_w, b * heads, q_h, k_w).permute(1, 2, 0, 3)
    shape = (b * heads, q_h, q_w, k_h, k_w)
    if out is not None:
        bias = torch.add(rel_h[:, :, :, :, None], rel_w[:, :, :, None, :], out=out.view(shape))
    else:
        bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(b, heads, q_h * q_w, k_h * k_w)


# The most memory one CPU bias buffer (`rel_pos_bias`'s `out`) takes; heads beyond it run in groups.
BIAS_BUDGET_BYTES = 64 << 20


class _BlockWeights:
    __slots__ = ("norm1", "norm2", "qkv_w", "qkv_b", "proj_w", "proj_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b",
                 "table_h", "table_w", "window", "heads", "use_rel_pos", "eps1", "eps2")


def _fast_base():
    import torch

    from .onednn_linear import linear, pack

    class FastImageEncoder(torch.nn.Module):
        """A functional re-implementation of ImageEncoderViT over a private copy of its weights."""

        def __init__(self, encoder, dtype, device=None, residual_fp32: bool = True):
            super().__init__()
            dtype = _dtype_of(dtype)
            if device is None:
                device = next(encoder.parameters()).device
            self.dtype = dtype
            self.device = torch.device(device)
            self.interrupt: Optional[Callable[[], bool]] = None
            self.keep_workspace = True
            self.compiled_blocks = None
            self.supports_interrupt = True
            self.residual_dtype = torch.float32 if residual_fp32 else dtype
            self._ws_local = threading.local()

            def cp(t, dt=dtype):  # private, detached copy: nothing shared with the caller's module
                return t.detach().to(device=self.device, dtype=dt, copy=True).contiguous()

            def lin(t):  # a weight of `linear`: float32 ones packed for oneDNN (onednn_linear.py)
                return pack(cp(t))

            f32 = torch.float32
            with torch.no_grad():
                proj = encoder.patch_embed.proj
                self.patch_stride = tuple(proj.stride)
                self.patch_padding = tuple(proj.padding)
                self.patch_w = cp(proj.weight)
                rdt = f32 if residual_fp32 else dtype
                self.patch_b = cp(proj.bias, rdt)
                self.pos_embed = cp(encoder.pos_embed, rdt) if encoder.pos_embed is not None else None
                self.blocks: List[_BlockWeights] = []
                for blk in encoder.blocks:
                    w = _BlockWeights()
                    w.norm1 = (cp(blk.norm1.weight, rdt), cp(blk.norm1.bias, rdt))
                    w.eps1 = blk.norm1.eps
                    w.norm2 = (cp(blk.norm2.weight, rdt), cp(blk.norm2.bias, rdt))
                    w.eps2 = blk.norm2.eps
                    attn = blk.attn
                    w.qkv_w, w.qkv_b = lin(attn.qkv.weight), (cp(attn.qkv.bias) if attn.qkv.bias is not None else None)
                    w.proj_w, w.proj_b = lin(attn.proj.weight), cp(attn.proj.bias)
                    w.fc1_w, w.fc1_b = lin(blk.mlp.lin1.weight), cp(blk.mlp.lin1.bias)
                    w.fc2_w, w.fc2_b = lin(blk.mlp.lin2.weight), cp(blk.mlp.lin2.bias)
                    w.window = int(blk.window_size)
                    w.heads = int(attn.num_heads)
                    w.use_rel_pos = bool(attn.use_rel_pos)
                    w.table_h = w.table_w = None
                    if w.use_rel_pos:
                        if w.window > 0:
                            size = (w.window, w.window)
                        else:
                            grid = encoder.img_size // self.patch_stride[0]
                            size = (grid, grid)
                        w.table_h = cp(relative_position_table(size[0], size[0], attn.rel_pos_h.detach().float()))
                        w.table_w = cp(relative_position_table(size[1], size[1], attn.rel_pos_w.detach().float()))
                    self.blocks.append(w)
                neck = encoder.neck
                self.neck1_w = cp(neck[0].weight)
                self.neck_ln1 = (cp(neck[1].weight, f32), cp(neck[1].bias, f32), float(neck[1].eps))
                self.neck2_w = cp(neck[2].weight)
                self.neck_ln2 = (cp(neck[3].weight, f32), cp(neck[3].bias, f32), float(neck[3].eps))

        # The tensors above are plain attributes, not registered parameters or buffers, so that
        # `.to()`, `.half()` or `load_state_dict` on this module cannot reach (or alias) anything.

        def _reuses_workspace(self) -> bool:
            return self.device.type == "cpu" and self.keep_workspace

        def _workspace(self, numel: int):
            """A reusable bias buffer (CPU only; CUDA's caching allocator already reuses memory)."""
            import torch

            if not self._reuses_workspace():
                return None
            buf = self._ws_local.__dict__.get("buf")
            if buf is None or buf.numel() < numel:
                buf = torch.empty(numel, dtype=self.dtype, device=self.device)
                self._ws_local.buf = buf
            return buf[:numel]

        def _attention(self, x, w: _BlockWeights):
            """x: (N, h, w, C) in the compute dtype -> (N, h, w, C)."""
            import torch.nn.functional as F

            n, h, wd, c = x.shape
            heads, tokens = w.heads, h * wd
            qkv = linear(x, w.qkv_w, w.qkv_b).reshape(n, tokens, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if not w.use_rel_pos:
                out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
            else:
                group = self._heads_per_bias(n, heads, tokens)
                out = q.new_empty(n, tokens, heads, c // heads) if group < heads else None
                for first in range(0, heads, group):  # heads in groups whose bias fits the budget
                    part = slice(first, min(heads, first + group))
                    qp = q[:, part]
                    mask = rel_pos_bias(qp, w.table_h, w.table_w, (h, wd), (h, wd),
                                        self._workspace(qp.shape[0] * qp.shape[1] * tokens * tokens))
                    y = F.scaled_dot_product_attention(qp, k[:, part], v[:, part], attn_mask=mask).transpose(1, 2)
                    if out is None:
                        out = y
                    else:
                        out[:, :, part] = y
            return linear(out.reshape(n, h, wd, c), w.proj_w, w.proj_b)

        def _heads_per_bias(self, n: int, heads: int, tokens: int) -> int:
            """How many heads share one bias buffer: on the CPU as many as fit BIAS_BUDGET_BYTES (a
            global block's bias is 67 MB per head in float32: all 12 heads of ViT-B at once took 805 MB
            of memory); elsewhere all of them."""
            if not self._reuses_workspace():
                return heads
            per_head = n * tokens * tokens * self.dtype.itemsize
            return max(1, min(heads, BIAS_BUDGET_BYTES // per_head))

        def _block(self, x, w: _BlockWeights, inplace: bool = False):
            """x: (B, H, W, C) residual stream (float32, or the compute dtype when not residual_fp32)."""
            import torch
            import torch.nn.functional as F

            b, height, width, c = x.shape
            y = F.layer_norm(x, (c,), w.norm1[0], w.norm1[1], w.eps1)
            if y.dtype != self.dtype:
                y = y.to(self.dtype)
            if w.window > 0:
                ws = w.window
                pad_h = (ws - height % ws) % ws
                pad_w = (ws - width % ws) % ws
                if pad_h or pad_w:
                    y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
                hp, wp = height + pad_h, width + pad_w
                y = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
                y = self._attention(y, w)
                y = y.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
                y = y.reshape(b, hp, wp, c)[:, :height, :width, :]
            else:
                y = self._attention(y, w)
            x = x.add_(y) if inplace else x + y
            y = F.layer_norm(x, (c,), w.norm2[0], w.norm2[1], w.eps2)
            if y.dtype != self.dtype:
                y = y.to(self.dtype)
            y = linear(torch.ops.aten.gelu_(linear(y, w.fc1_w, w.fc1_b)), w.fc2_w, w.fc2_b)  # in place: fresh tensor
            return x.add_(y) if inplace else x + y

        def _all_blocks(self, x):
            """The blocks without interruption points and without in-place updates (for torch.compile)."""
            for w in self.blocks:
                x = self._block(x, w, inplace=False)
            return x

        @staticmethod
        def _layer_norm_2d(x, weight, bias, eps):
            """segment-anything's LayerNorm2d (over channels of NCHW) in float32."""
            x = x.float()
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / (s + eps).sqrt()
            return weight[:, None, None] * x + bias[:, None, None]

        def forward(self, x, interrupt: Optional[Callable[[], bool]] = None):
            import torch.nn.functional as F

            interrupt = interrupt or self.interrupt
            x = x.to(self.device, self.dtype)
            x = F.conv2d(x, self.patch_w, None, self.patch_stride, self.patch_padding)
            x = x.permute(0, 2, 3, 1).to(self.residual_dtype) + self.patch_b
            if self.pos_embed is not None:
                x.add_(self.pos_embed)
            if self.compiled_blocks is not None:
                if interrupt is not None and interrupt():
                    raise EncodeInterrupted()
                x = self.compiled_blocks(x)
            else:
                for w in self.blocks:  # x is a fresh tensor of ours: the blocks update it in place
                    if interrupt is not None and interrupt():
                        raise EncodeInterrupted()
                    x = self._block(x, w, inplace=True)
            y = x.to(self.dtype).permute(0, 3, 1, 2)
            y = F.conv2d(y, self.neck1_w)
            y = self._layer_norm_2d(y, *self.neck_ln1)
            y = F.conv2d(y.to(self.dtype), self.neck2_w, padding=1)
            return self._layer_norm_2d(y, *self.neck_ln2)

    return FastImageEncoder


_CLASS = None


def fast_encoder_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = _fast_base()
    return _CLASS


def prepare_encoder(encoder, dtype, device=None, compile: bool = False, residual_fp32: bool = True):
    """A fast encoder over a private copy of `encoder`'s weights in `dtype` (torch dtype or name).

    Returns a callable module `x -> (B, 256, 64, 64) float32`. `compile=True` wraps the forward in
    torch.compile (worth it on CUDA; the first call then takes tens of seconds to compile).
    """
    fast = fast_encoder_class()(encoder, dtype, device, residual_fp32=residual_fp32)
    fast.eval()
    if compile:
        import torch

        fast.keep_workspace = False
        fast.compiled_blocks = torch.compile(fast._all_blocks, dynamic=False)
    return fast
