"""SAM's networks for the engine: prompt encoder, mask decoder and ViT image encoder, on torch alone.

Why our own: importing the `segment_anything` package runs its predictor's imports (its resizing
helpers import torchvision, torchvision.ops imports torch._dynamo), which cost 1.5-2 s of every
command's start-up. The engine needs the networks only, so they are written here (following the
SAM paper's architecture; the `segment-anything` package remains the reference they are tested
against, `Testing/test_sam_net.py`).

Contract:

* **Weights**: the parameter and buffer names and shapes are those of segment-anything's ``Sam``
  (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), so its checkpoints, MedSAM's,
  LiteMedSAM's prompt encoder and decoder, and `hf_weights`' conversion load with strict=True.
  Building under the same random seed also draws the same random initial weights.
* **Numbers**: every forward runs the reference's operations in the reference's order and
  shapes (the same matrix products, the same additions, the same normalisations), so outputs
  match it to rounding (tested at <= 1e-6 relative in float32). Scaled-dot-product attention and
  other fused kernels are NOT used here: the fast encoder (`fast_encoder.py`) is where speed lives.
* **Imports**: this module imports torch only when one of its classes is first used (the classes
  are made by `_define()` on first attribute access), so importing it costs nothing.

The classes (module attributes): ``SamNet`` (container with ``image_encoder``, ``prompt_encoder``,
``mask_decoder``), ``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``,
``LayerNorm2d``, ``PositionEmbeddingRandom``. Builders: `build_sam_vit` (ViT-B/L/H or any
shape), `prompt_encoder_and_decoder` (SAM's prompt side at any input size, e.g. LiteMedSAM's 256).

Shapes, for an input of S x S pixels and a 16-pixel patch (S = 1024: a 64 x 64 grid of 256 channels):

* prompt encoder: boxes (N, 1, 4) in input pixels -> sparse (N, 2, 256) (one token per corner:
  random-Fourier position of the corner's pixel centre + that corner's learned embedding); points
  ((N, P, 2), labels (N, P)) -> (N, P(+1), 256); masks (N, 1, 4G, 4G) -> dense (N, 256, G, G),
  else the learned "no mask" vector broadcast.
* mask decoder: embedding (1, 256, G, G), positional map, sparse and dense -> logits
  (N, 1 or 3, 4G, 4G) and IoU estimates (N, 1 or 3).
* ViT encoder: (B, 3, S, S) -> (B, 256, S/16, S/16).
"""
from __future__ import annotations

import math
import threading
from typing import Dict, Optional, Sequence, Tuple

# The classes `_define()` makes, published as this module's attributes on first access.
CLASS_NAMES = ("LayerNorm2d", "FeedForward", "MLP", "PositionEmbeddingRandom", "PromptEncoder", "Attention",
               "TwoWayBlock", "TwoWayTransformer", "MaskDecoder", "PatchEmbed", "ViTAttention", "ViTBlock",
               "ImageEncoderViT", "SamNet")

PROMPT_DIM = 256  # SAM's prompt / decoder width
PATCH_SIZE = 16
WINDOW_SIZE = 14
MASK_IN_CHANS = 16
DECODER_DEPTH = 2
DECODER_HEADS = 8
DECODER_MLP_DIM = 2048
MULTIMASK_OUTPUTS = 3

_classes: Optional[Dict[str, type]] = None
_define_lock = threading.Lock()


def __getattr__(name: str):
    if name in CLASS_NAMES:
        return classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def classes() -> Dict[str, type]:
    """The network classes by name (made on first call, with torch imported then)."""
    global _classes
    with _define_lock:  # one set of classes, also when two threads build models at once
        if _classes is None:
            made = _define()
            for name, cls in made.items():  # module-level names, so pickle and repr find them
                cls.__module__ = __name__
                cls.__qualname__ = name
            globals().update(made)
            _classes = made
    return _classes


def _define() -> Dict[str, type]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ..fast_encoder import relative_position_table

    # ------------------------------------------------------------------------------ shared pieces

    class LayerNorm2d(nn.Module):
        """Layer norm over the channels of an NCHW map (one mean and variance per pixel)."""

        def __init__(self, channels: int, eps: float = 1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
            self.eps = eps

        def forward(self, x):
            mean = x.mean(1, keepdim=True)
            var = (x - mean).pow(2).mean(1, keepdim=True)
            x = (x - mean) / torch.sqrt(var + self.eps)
            return self.weight[:, None, None] * x + self.bias[:, None, None]

    class FeedForward(nn.Module):
        """lin1 -> activation -> lin2 (checkpoint keys ``lin1.*``, ``lin2.*``)."""

        def __init__(self, dim: int, hidden: int, activation=nn.GELU):
            super().__init__()
            self.lin1 = nn.Linear(dim, hidden)
            self.lin2 = nn.Linear(hidden, dim)
            self.act = activation()

        def forward(self, x):
            return self.lin2(self.act(self.lin1(x)))

    class MLP(nn.Module):
        """`depth` linear layers with ReLU between them (keys ``layers.K.*``)."""

        def __init__(self, dim_in: int, hidden: int, dim_out: int, depth: int):
            super().__init__()
            widths = [dim_in] + [hidden] * (depth - 1)
            outs = [hidden] * (depth - 1) + [dim_out]
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, outs))

        def forward(self, x):
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < last:
                    x = F.relu(x)
            return x

    # ---------------------------------------------------------------------------- prompt encoder

    class PositionEmbeddingRandom(nn.Module):
        """Random-Fourier features of 2D positions: [sin, cos](2 pi ((2 p - 1) @ G)), G (2, F) fixed."""

        def __init__(self, features: int = 64, scale: Optional[float] = None):
            super().__init__()
            scale = 1.0 if scale is None or scale <= 0.0 else scale
            self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, features)))

        def encode(self, coords):
            """coords in [0, 1], (..., 2) as (x, y) -> (..., 2F)."""
            projected = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
            projected = 2 * math.pi * projected
            return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

        def forward(self, size: Tuple[int, int]):
            """The (2F, h, w) map of the pixel centres of an h x w grid."""
            h, w = size
            device = self.positional_encoding_gaussian_matrix.device
            ones = torch.ones((h, w), device=device, dtype=torch.float32)
            ys = (ones.cumsum(dim=0) - 0.5) / h
            xs = (ones.cumsum(dim=1) - 0.5) / w
            return self.encode(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)

        def forward_with_coords(self, coords, image_size: Tuple[int, int]):
            """(B, N, 2) pixel coordinates (x, y) in an image of (H, W) -> (B, N, 2F)."""
            x = coords[:, :, 0:1] / image_size[1]
            y = coords[:, :, 1:2] / image_size[0]
            return self.encode(torch.cat([x, y], dim=-1).to(torch.float))

    class PromptEncoder(nn.Module):
        def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int],
                     input_image_size: Tuple[int, int], mask_in_chans: int, activation=nn.GELU):
            super().__init__()
            self.embed_dim = embed_dim
            self.input_image_size = tuple(input_image_size)
            self.image_embedding_size = tuple(image_embedding_size)
            self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
            # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
            self.num_point_embeddings = 4
            self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
            self.not_a_point_embed = nn.Embedding(1, embed_dim)
            self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
            quarter = mask_in_chans // 4
            self.mask_downscaling = nn.Sequential(
                nn.Conv2d(1, quarter, kernel_size=2, stride=2), LayerNorm2d(quarter), activation(),
                nn.Conv2d(quarter, mask_in_chans, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans), activation(),
                nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
            )
            self.no_mask_embed = nn.Embedding(1, embed_dim)

        def get_dense_pe(self):
            """(1, C, h, w) positional map of the image embedding's grid."""
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)

        def _embed_points(self, points, labels, pad: bool):
            points = points + 0.5  # pixel centres
            if pad:  # a "not a point" token takes the box's place when there is none
                points = torch.cat([points, torch.zeros((points.shape[0], 1, 2), device=points.device)], dim=1)
                labels = torch.cat([labels, -torch.ones((labels.shape[0], 1), device=labels.device)], dim=1)
            pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
            lab = labels[..., None]
            learned = torch.where(lab == 0, self.point_embeddings[0].weight,
                                  torch.where(lab == 1, self.point_embeddings[1].weight, torch.zeros_like(pe)))
            return torch.where(lab == -1, self.not_a_point_embed.weight.expand_as(pe), pe + learned)

        def _embed_boxes(self, boxes):
            corners = (boxes + 0.5).reshape(-1, 2, 2)  # pixel centres of (x0, y0), (x1, y1)
            pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
            learned = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
            return pe + learned

        def _batch_size(self, points, boxes, masks) -> int:
            if points is not None:
                return points[0].shape[0]
            if boxes is not None:
                return boxes.shape[0]
            if masks is not None:
                return masks.shape[0]
            return 1

        def forward(self, points, boxes, masks):
            """(sparse (B, N, C), dense (B, C, h, w)) for points (coords, labels), boxes (B, 1, 4) or
            (B, 4) and mask logits (B, 1, 4h, 4w), each optional."""
            bs = self._batch_size(points, boxes, masks)
            sparse = torch.empty((bs, 0, self.embed_dim), device=self.point_embeddings[0].weight.device)
            if points is not None:
                sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
            if boxes is not None:
                sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
            if masks is not None:
                dense = self.mask_downscaling(masks)
            else:
                h, w = self.image_embedding_size
                dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
            return sparse, dense

    # ------------------------------------------------------------------------------ mask decoder

    class Attention(nn.Module):
        """Multi-head attention whose q/k/v projections may narrow the width by `downsample_rate`."""

        def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1):
            super().__init__()
            self.embedding_dim = embedding_dim
            self.internal_dim = embedding_dim // downsample_rate
            self.num_heads = num_heads
            if self.internal_dim % num_heads:
                raise ValueError("the number of heads must divide the attention width")
            self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
            self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
            self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
            self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

        def _heads(self, x):  # (B, N, C) -> (B, heads, N, C / heads)
            b, n, c = x.shape
            return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

        def forward(self, q, k, v):
            q = self._heads(self.q_proj(q))
            k = self._heads(self.k_proj(k))
            v = self._heads(self.v_proj(v))
            scores = q @ k.permute(0, 1, 3, 2)
            scores = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)
            out = scores @ v
            b, heads, n, c = out.shape
            return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * c))

    class TwoWayBlock(nn.Module):
        """Tokens self-attend, attend to the image, go through an MLP; then the image attends to them."""

        def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048, activation=nn.ReLU,
                     attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False):
            super().__init__()
            self.self_attn = Attention(embedding_dim, num_heads)
            self.norm1 = nn.LayerNorm(embedding_dim)
            self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
            self.norm2 = nn.LayerNorm(embedding_dim)
            self.mlp = FeedForward(embedding_dim, mlp_dim, activation)
            self.norm3 = nn.LayerNorm(embedding_dim)
            self.norm4 = nn.LayerNorm(embedding_dim)
            self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
            self.skip_first_layer_pe = skip_first_layer_pe

        def forward(self, queries, keys, query_pe, key_pe):
            if self.skip_first_layer_pe:  # the first layer's tokens ARE their positions: no residual
                queries = self.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + self.self_attn(q=q, k=q, v=queries)
            queries = self.norm1(queries)
            q = queries + query_pe
            k = keys + key_pe
            queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
            queries = self.norm3(queries + self.mlp(queries))
            q = queries + query_pe
            k = keys + key_pe
            keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
            return queries, keys

    class TwoWayTransformer(nn.Module):
        def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, activation=nn.ReLU,
                     attention_downsample_rate: int = 2):
            super().__init__()
            self.depth = depth
            self.embedding_dim = embedding_dim
            self.num_heads = num_heads
            self.mlp_dim = mlp_dim
            self.layers = nn.ModuleList(
                TwoWayBlock(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate,
                            skip_first_layer_pe=(i == 0))
                for i in range(depth)
            )
            self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
            self.norm_final_attn = nn.LayerNorm(embedding_dim)

        def forward(self, image_embedding, image_pe, point_embedding):
            """image (B, C, h, w), its positional map, tokens (B, N, C) -> (tokens, image (B, h*w, C))."""
            keys = image_embedding.flatten(2).permute(0, 2, 1)
            key_pe = image_pe.flatten(2).permute(0, 2, 1)
            queries = point_embedding
            for layer in self.layers:
                queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
            q = queries + point_embedding
            k = keys + key_pe
            queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
            return queries, keys

    class MaskDecoder(nn.Module):
        def __init__(self, *, transformer_dim: int, transformer, num_multimask_outputs: int = 3,
                     activation=nn.GELU, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256):
            super().__init__()
            self.transformer_dim = transformer_dim
            self.transformer = transformer
            self.num_multimask_outputs = num_multimask_outputs
            self.iou_token = nn.Embedding(1, transformer_dim)
            self.num_mask_tokens = num_multimask_outputs + 1
            self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
            quarter, eighth = transformer_dim // 4, transformer_dim // 8
            self.output_upscaling = nn.Sequential(
                nn.ConvTranspose2d(transformer_dim, quarter, kernel_size=2, stride=2), LayerNorm2d(quarter),
                activation(),
                nn.ConvTranspose2d(quarter, eighth, kernel_size=2, stride=2), activation(),
            )
            self.output_hypernetworks_mlps = nn.ModuleList(
                MLP(transformer_dim, transformer_dim, eighth, 3) for _ in range(self.num_mask_tokens))
            self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

        def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                    multimask_output: bool):
            """Logits (N, 3, 4h, 4w) and IoU (N, 3) with multimask_output, else the single-mask output's."""
            masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                            dense_prompt_embeddings)
            chosen = slice(1, None) if multimask_output else slice(0, 1)
            return masks[:, chosen, :, :], iou[:, chosen]

        def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
            """All mask tokens' logits and IoU estimates, one row per prompt (one image's embedding)."""
            n = sparse_prompt_embeddings.size(0)
            output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
            tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings), dim=1)
            src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0) + dense_prompt_embeddings
            pos = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
            b, c, h, w = src.shape
            hs, src = self.transformer(src, pos, tokens)
            iou_token_out = hs[:, 0, :]
            mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]
            upscaled = self.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
            hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                                    for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
            return masks, self.iou_prediction_head(iou_token_out)

    # ------------------------------------------------------------------------- ViT image encoder

    class PatchEmbed(nn.Module):
        """Non-overlapping patches by a strided convolution, channels last: (B, H, W, C)."""

        def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
            super().__init__()
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=(patch_size, patch_size),
                                  stride=(patch_size, patch_size), padding=(0, 0))

        def forward(self, x):
            return self.proj(x).permute(0, 2, 3, 1)

    class ViTAttention(nn.Module):
        """Self-attention over an (B, H, W, C) grid with decomposed relative-position terms: the score of
        query (y, x) for key (ky, kx) gains q·R_h[y - ky] + q·R_w[x - kx] (unscaled q)."""

        def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True,
                     input_size: Optional[Tuple[int, int]] = None):
            super().__init__()
            self.num_heads = num_heads
            head_dim = dim // num_heads
            self.scale = head_dim ** -0.5
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)
            self.use_rel_pos = use_rel_pos
            if use_rel_pos:
                if input_size is None:
                    raise ValueError("relative positions need the attention's input size")
                self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
                self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

        def forward(self, x):
            b, h, w, _ = x.shape
            n = b * self.num_heads
            # (B, h*w, 3, heads, c) -> (3, B, heads, h*w, c) -> q, k, v each (B*heads, h*w, c)
            qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.reshape(3, n, h * w, -1).unbind(0)
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if self.use_rel_pos:
                table_h = relative_position_table(h, h, self.rel_pos_h)
                table_w = relative_position_table(w, w, self.rel_pos_w)
                grid_q = q.reshape(n, h, w, q.shape[-1])
                along_h = torch.einsum("nyxc,ykc->nyxk", grid_q, table_h)
                along_w = torch.einsum("nyxc,xkc->nyxk", grid_q, table_w)
                scores = (scores.view(n, h, w, h, w) + along_h[:, :, :, :, None]
                          + along_w[:, :, :, None, :]).view(n, h * w, h * w)
            scores = scores.softmax(dim=-1)
            out = (scores @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
            return self.proj(out)

    def to_windows(x, size: int):
        """(B, H, W, C) -> (B * windows, size, size, C), zero-padded at the bottom/right; the padded (H, W)."""
        b, h, w, c = x.shape
        pad_h, pad_w = (size - h % size) % size, (size - w % size) % size
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        x = x.view(b, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
        return x.contiguous().view(-1, size, size, c), (hp, wp)

    def from_windows(windows, size: int, padded: Tuple[int, int], hw: Tuple[int, int]):
        """The inverse of `to_windows`, padding removed."""
        hp, wp = padded
        h, w = hw
        b = windows.shape[0] // ((hp // size) * (wp // size))
        x = windows.view(b, hp // size, wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5)
        x = x.contiguous().view(b, hp, wp, -1)
        if hp > h or wp > w:
            x = x[:, :h, :w, :].contiguous()
        return x

    class ViTBlock(nn.Module):
        """Pre-norm transformer block; window_size > 0: attention inside size x size windows, 0: global."""

        def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                     use_rel_pos: bool = True, window_size: int = 0, input_size: Tuple[int, int] = (64, 64),
                     eps: float = 1e-6):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=eps)
            self.attn = ViTAttention(dim, num_heads, qkv_bias, use_rel_pos,
                                     tuple(input_size) if window_size == 0 else (window_size, window_size))
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            self.mlp = FeedForward(dim, int(dim * mlp_ratio), nn.GELU)
            self.window_size = window_size

        def forward(self, x):
            shortcut = x
            x = self.norm1(x)
            if self.window_size > 0:
                hw = (x.shape[1], x.shape[2])
                windows, padded = to_windows(x, self.window_size)
                x = from_windows(self.attn(windows), self.window_size, padded, hw)
            else:
                x = self.attn(x)
            x = shortcut + x
            return x + self.mlp(self.norm2(x))

    class ImageEncoderViT(nn.Module):
        """SAM's ViT: patches + absolute positions, `depth` blocks (windowed except `global_attn_indexes`),
        then the neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to `out_chans`."""

        def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                     depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256,
                     qkv_bias: bool = True, use_abs_pos: bool = True, use_rel_pos: bool = True,
                     window_size: int = 14, global_attn_indexes: Sequence[int] = (), eps: float = 1e-6):
            super().__init__()
            self.img_size = img_size
            grid = img_size // patch_size
            self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
            self.blocks = nn.ModuleList(
                ViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, use_rel_pos,
                         window_size if i not in global_attn_indexes else 0, (grid, grid), eps)
                for i in range(depth)
            )
            self.neck = nn.Sequential(
                nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False), LayerNorm2d(out_chans),
                nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False), LayerNorm2d(out_chans),
            )

        def forward(self, x):
            x = self.patch_embed(x)
            if self.pos_embed is not None:
                x = x + self.pos_embed
            for block in self.blocks:
                x = block(x)
            return self.neck(x.permute(0, 3, 1, 2))

    # --------------------------------------------------------------------------------- container

    class SamNet(nn.Module):
        """image_encoder + prompt_encoder + mask_decoder under segment-anything's ``Sam`` key names."""

        mask_threshold: float = 0.0  # logits above it are foreground

        def __init__(self, image_encoder, prompt_encoder, mask_decoder):
            super().__init__()
            self.image_encoder = image_encoder
            self.prompt_encoder = prompt_encoder
            self.mask_decoder = mask_decoder

    scope = dict(locals())  # outside the comprehension: before 3.12 it has locals of its own
    return {name: scope[name] for name in CLASS_NAMES}


# ----------------------------------------------------------------------------------------- builders


def prompt_encoder_and_decoder(input_size: int, embedding_size: int):
    """SAM's prompt encoder and mask decoder for a square input of `input_size` pixels whose image
    embedding is `embedding_size` a side (1024 and 64 for SAM/MedSAM, 256 and 64 for LiteMedSAM)."""
    c = classes()
    prompt = c["PromptEncoder"](embed_dim=PROMPT_DIM, image_embedding_size=(embedding_size, embedding_size),
                                input_image_size=(input_size, input_size), mask_in_chans=MASK_IN_CHANS)
    transformer = c["TwoWayTransformer"](depth=DECODER_DEPTH, embedding_dim=PROMPT_DIM, num_heads=DECODER_HEADS,
                                         mlp_dim=DECODER_MLP_DIM)
    decoder = c["MaskDecoder"](transformer_dim=PROMPT_DIM, transformer=transformer,
                               num_multimask_outputs=MULTIMASK_OUTPUTS, iou_head_depth=3, iou_head_hidden_dim=256)
    return prompt, decoder


def build_sam_vit(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: Sequence[int],
                  image_size: int = 1024):
    """A SamNet with SAM's ViT image encoder of this shape (ViT-B: 768, 12, 12, (2, 5, 8, 11)), in eval
    mode, random weights (drawn in segment-anything's order: the same seed gives the same weights)."""
    c = classes()
    encoder = c["ImageEncoderViT"](img_size=image_size, patch_size=PATCH_SIZE, embed_dim=embed_dim, depth=depth,
                                   num_heads=num_heads, mlp_ratio=4, out_chans=PROMPT_DIM, qkv_bias=True,
                                   use_rel_pos=True, window_size=WINDOW_SIZE,
                                   global_attn_indexes=tuple(global_attn_indexes))
    prompt, decoder = prompt_encoder_and_decoder(image_size, image_size // PATCH_SIZE)
    return c["SamNet"](encoder, prompt, decoder).eval()
