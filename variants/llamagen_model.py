"""The LlamaGen class-conditional transformer (Sun et al. 2024, arXiv:2406.06525), written from
docs/LLAMAGEN_SPEC.md (FoundationVision/LlamaGen@ce98ec41 autoregressive/models/gpt.py); nothing is copied.

A Llama-style decoder over [class token] + raster image tokens: pre-norm RMSNorm blocks, fused-QKV attention with
2-D rotary embeddings (the first half of the rotated pairs turns with the token's row, the second with its
column; the class position has a ZERO table, so its query and key are zero vectors), SwiGLU feed-forward, an
untied head. Parameter names and shapes match the official state dict, so released checkpoints load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SIZES",
    "LlamaGenConfig",
    "LlamaGenNet",
    "TokenKVCache",
    "causal_mask",
    "find_multiple",
    "flops_per_image",
    "param_count_meta",
    "rope_table_2d",
]

# Released c2i sizes (FoundationVision/LlamaGen@ce98ec41 gpt.py GPT_models): name -> (layers, heads, width).
SIZES: dict[str, tuple[int, int, int]] = {"b": (12, 12, 768), "l": (24, 16, 1024), "xl": (36, 20, 1280),
                                          "xxl": (48, 24, 1536), "3b": (24, 32, 3200)}
# The head count is not stored in a state dict (wqkv is (3·dim, dim) for any head count): the released widths.
HEADS_OF_WIDTH = {width: heads for _, heads, width in SIZES.values()}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class LlamaGenConfig:
    """Architecture of a c2i LlamaGen transformer (the official ModelArgs' inference-relevant fields)."""

    n_layer: int = 12
    n_head: int = 12
    dim: int = 768
    n_kv_head: int | None = None  # None: multi-head attention
    vocab_size: int = 16384
    num_classes: int = 1000  # plus one null row (class_dropout_prob > 0 in every released model)
    block_size: int = 256  # image tokens: grid² (256 px -> 16², 384 px -> 24² with VQ-16)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: int = 10000
    norm_eps: float = 1e-5
    cls_token_num: int = 1  # c2i: one class token

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"width {self.dim} is not divisible by {self.n_head} heads")
        if self.grid ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid of tokens")
        if self.cls_token_num != 1:
            raise ValueError("class-conditional LlamaGen has one class token (cls_token_num = 1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def cache_len(self) -> int:
        """KV slots of one generation: class + image tokens rounded up to 8, as the official setup_caches."""
        return find_multiple(self.cls_token_num + self.block_size, 8)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], n_head: int | None = None,
                        block_size: int = 256) -> LlamaGenConfig:
        """Reads the architecture off an official state dict. The head count and the grid are not stored: the
        head count comes from `n_head` or the released width it belongs to, the grid from `block_size`."""
        vocab, dim = sd["tok_embeddings.weight"].shape
        n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
        heads = n_head or HEADS_OF_WIDTH.get(dim)
        if heads is None:
            raise ValueError(f"width {dim} is not a released LlamaGen size ({sorted(HEADS_OF_WIDTH)}) and a state "
                             "dict does not store the head count: pass n_head")
        qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
        kv_heads = (qkv_rows - dim) // (2 * (dim // heads))
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
        cfg = cls(n_layer, heads, dim, None if kv_heads == heads else kv_heads, vocab,
                  sd["cls_embedding.embedding_table.weight"].shape[0] - 1, block_size)
        if cfg.ffn_hidden != hidden:  # any other hidden width: read the multiplier back
            cfg = cls(**{**vars(cfg), "ffn_dim_multiplier": hidden / int(2 * 4 * dim / 3), "multiple_of": 1})
        return cfg

    def describe(self) -> str:
        size = next((f"GPT-{k.upper()} " for k, v in SIZES.items() if v == (self.n_layer, self.n_head, self.dim)), "")
        return (f"{size}LlamaGen ({self.n_layer} layers, {self.n_head} heads, width {self.dim}, "
                f"{self.grid}x{self.grid} tokens)")


def rope_table_2d(cfg: LlamaGenConfig) -> Tensor:
    """(1 + grid², head_dim/2, 2) cos/sin table: row 0 (the class position) all zero; image token r·g + c turns
    its first head_dim/4 pairs by r·freqs and the rest by c·freqs. Same float32 ops as the official table."""
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(cfg.grid), freqs)  # (g, head_dim/4)
    g = cfg.grid
    grid = torch.cat([angles[:, None, :].expand(-1, g, -1), angles[None, :, :].expand(g, -1, -1)], dim=-1)
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cfg.cls_token_num, half, 2), table])


def causal_mask(cfg: LlamaGenConfig) -> Tensor:
    """(cache_len, cache_len) bool: position p sees slots 0..p (row p is step p's mask over the whole cache)."""
    return torch.tril(torch.ones(cfg.cache_len, cfg.cache_len, dtype=torch.bool))


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of (B, T, H, hd) by a (T, hd/2, 2) table, in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class TokenKVCache:
    """One preallocated (layers, R, kv_heads, capacity, hd) buffer pair written in place at device-tensor positions
    (the official KVCache, gpt-fast's): every step attends over the whole buffer under a causal mask row, so the
    one-token step has one shape for the whole generation (what a CUDA graph needs)."""

    def __init__(self, cfg: LlamaGenConfig, rows: int, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.n_layer, rows, cfg.kv_heads, cfg.cache_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions written so far (host-side count for reports; the step never reads it)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        """Forgets what is held; stale slots are never read (the mask hides every slot past the position)."""
        self.length = 0

    def write(self, layer: int, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]

    def nbytes(self, tokens: int | None = None) -> int:
        n = self.length if tokens is None else tokens
        return 2 * self.k[:, :, :, :n].numel() * self.k.element_size()

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, layer: int, cache: TokenKVCache | None, pos: Tensor | None,
                mask: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q, k, v = self.wqkv(x).split([c.dim, c.kv_heads * hd, c.kv_heads * hd], dim=-1)
        q = apply_rope(q.view(b, t, c.n_head, hd), rope).transpose(1, 2)
        k = apply_rope(k.view(b, t, c.kv_heads, hd), rope).transpose(1, 2)
        v = v.view(b, t, c.kv_heads, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, pos, k, v)
        if c.kv_heads != c.n_head:  # grouped-query attention (no released c2i model uses it)
            k = k.repeat_interleave(c.n_head // c.kv_heads, dim=1)
            v = v.repeat_interleave(c.n_head // c.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(b, t, c.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm, self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, layer: int, cache: TokenKVCache | None = None,
                pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, layer, cache, pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class _LabelEmbedder(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # row num_classes: the null class


class LlamaGenNet(nn.Module):
    """The c2i transformer. `step` is the KV-cached forward of the sampler; `teacher_forced` the full-sequence one."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = _LabelEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # derived tables, never saved (the official ones are plain attributes, not buffers)
        self.register_buffer("rope", rope_table_2d(cfg), persistent=False)
        self.register_buffer("causal", causal_mask(cfg), persistent=False)

    def class_embed(self, labels: Tensor) -> Tensor:
        """(R,) labels (num_classes = null) -> (R, 1, C)."""
        return self.cls_embedding.embedding_table(labels).unsqueeze(1)

    def token_embed(self, tokens: Tensor) -> Tensor:
        """(R, l) codes -> (R, l, C)."""
        return self.tok_embeddings(tokens)

    def step(self, x: Tensor, pos: Tensor, cache: TokenKVCache) -> Tensor:
        """(R, l, C) embeddings at sequence positions `pos` (l,) (0 = class, 1 + n = image token n) -> (R, l, V)
        fp32 logits; writes their keys/values into `cache` and attends over all its slots under the causal mask."""
        rope, mask = self.rope[pos], self.causal[pos][None, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, i, cache, pos, mask)
        return self.output(self.norm(x)).float()

    def teacher_forced(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Logits of every position for given (B, N) codes: (B, N, V) fp32, [:, t] predicts tokens[:, t]
        (the official training/naive path: class + tokens[:, :-1], no cache, is_causal)."""
        x = torch.cat([self.class_embed(labels), self.token_embed(tokens[:, :-1].long())], dim=1)
        rope = self.rope[: x.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, i)
        return self.output(self.norm(x)).float()


def flops_per_image(cfg: LlamaGenConfig, guided: bool = True) -> float:
    """Model FLOPs of one KV-cached generation (2 per MAC): both CFG rows when `guided`; per position, the
    linears, attention over every cache slot (the official masked full-cache attention computes them all), and
    the head. Embedding look-ups are free."""
    c, n = cfg.dim, cfg.block_size
    qkv_out = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    linears = c * qkv_out + c * c + 3 * c * cfg.ffn_hidden
    attn = 2 * c * cfg.cache_len  # q·K and P·V over the whole buffer
    per_position = cfg.n_layer * (linears + attn) + c * cfg.vocab_size
    return float(2 * (2 if guided else 1) * per_position * n)  # n forwards: the class prefill + n - 1 tokens


def param_count_meta(cfg: LlamaGenConfig) -> int:
    """Exact parameters of the architecture, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaGenNet(cfg).parameters())
