"""The Infinity transformer (bitwise next-scale text-to-image), written from docs/INFINITY_SPEC.md §3 and §5.

Parameter and buffer names match the official state dict (FoundationVision/Infinity@4c27bbb5
infinity/models/{infinity,basic}.py: `block_chunks.{k}.module.{j}`, shared AdaLN, cosine self-attention with
2-D RoPE, text cross-attention, attentive text pooling, AdaLN head), so the released 2B and 8B files load
strictly. Nothing is copied from that code.

Precision as VARNet: the residual stream, norms, RoPE, q/k normalisation and logits stay fp32; linears and
attention run in the weights' dtype (the engine holds them in the compute precision). `xattn_bf16` reproduces
the official cross-attention, which rounds fp32 queries and text keys/values to bf16 and its output back
(basic.py:395-397) in every official configuration; off, cross-attention is plain fp32 (the `fp32xattn`
fixture).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varbench.harness.core.kv_cache import attention

__all__ = ["InfinityConfig", "InfinityNet", "TextCond", "Modulation", "pack_text"]

MAX_SCALE_MUL = math.log(100.0)  # cosine attention's per-head logit scale is clamped at ln 100
EPS = 1e-6

# (gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2), each (bs, 1, C): one block's AdaLN output.
Modulation = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class InfinityConfig:
    """Architecture; the defaults are Infinity-2B's (infinity_2b_reg.pth)."""

    depth: int = 32
    width: int = 2048  # C
    heads: int = 16  # self- and cross-attention heads (head dim 128)
    text_channels: int = 2048  # Ct5 (flan-t5-xl)
    text_maxlen: int = 512  # rows of the learned unconditional text `cfg_uncond`
    bits: int = 32  # d per transformer token (8B: 4 × 14 after the 2×2 patchify)
    pool_heads: int = 16  # heads of the attentive text pooling (Ct5 // 128)
    ffn: int = 0  # hidden width; 0 = round(4C / 256) · 256
    chunks: int = 8  # `block_chunks` (naming only)
    levels: int = 15  # rows of lvl_embed

    def __post_init__(self) -> None:
        object.__setattr__(self, "ffn", self.ffn or round(4 * self.width / 256) * 256)
        if self.depth % self.chunks:
            raise ValueError(f"depth {self.depth} is not a multiple of chunks {self.chunks}")

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> InfinityConfig:
        """Reads the architecture off an official-layout state dict (KeyError if it is not one)."""
        chunks = {int(k.split(".")[1]) for k in sd if k.startswith("block_chunks.")}
        per_chunk = {int(k.split(".")[3]) for k in sd if k.startswith("block_chunks.0.module.")}
        b0 = "block_chunks.0.module.0."
        return cls(depth=len(chunks) * len(per_chunk), width=sd["pos_start"].shape[-1],
                   heads=sd[b0 + "sa.scale_mul_1H11"].shape[1], text_channels=sd["text_norm.weight"].shape[0],
                   text_maxlen=sd["cfg_uncond"].shape[0], bits=sd["word_embed.weight"].shape[1],
                   pool_heads=sd["text_proj_for_sos.ca.mat_q"].shape[1], ffn=sd[b0 + "ffn.fc1.weight"].shape[0],
                   chunks=len(chunks), levels=sd["lvl_embed.weight"].shape[0])


class TextCond(NamedTuple):
    """The text side of one call, cond rows first: pooled condition and cross-attention features."""

    cond: Tensor  # (bs, C) pooled text (the SOS token and the head's AdaLN input)
    kv: Tensor  # (bs, Lt, C) text_proj_for_ca features, zero-padded to the longest prompt
    mask: Tensor  # (bs, 1, 1, Lt) bool: True where a row is real text


def pack_text(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-prompt (len_i, Ct5) embeddings to a zero-padded (bs, Lt, Ct5) batch and its (bs, 1, 1, Lt) mask."""
    lt = max(r.shape[0] for r in rows)
    padded = rows[0].new_zeros(len(rows), lt, rows[0].shape[1])
    mask = torch.zeros(len(rows), 1, 1, lt, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        padded[i, : r.shape[0]] = r
        mask[i, ..., : r.shape[0]] = True
    return padded, mask


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=EPS)


def _text_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bf16: bool) -> Tensor:
    """Each sample's queries over its own text rows, scale 1/√c; `bf16`: the official bf16 round trip."""
    if bf16 and q.dtype == torch.float32:
        q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(torch.bfloat16).float()
    return F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask)


class _TextKV(nn.Module):
    """Keys and values of text features: Linear(·, 2C, no bias) + [0, v_bias]."""

    def _init_kv(self, c_in: int, width: int, heads: int) -> None:
        self.heads, self.head_dim = heads, width // heads
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.mat_kv = nn.Linear(c_in, 2 * width, bias=False)

    def kv(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """(bs, Lt, Cin) -> k, v (bs, H, Lt, c)."""
        w = self.mat_kv.weight
        b, n, _ = text.shape
        kv = F.linear(text.to(w.dtype), w, torch.cat((self.zero_k_bias, self.v_bias)).to(w.dtype))
        k, v = kv.view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v


class TextPool(_TextKV):
    """TextAttentivePool's `ca`: one learned query per head attends over the prompt; proj to (bs, C)."""

    def __init__(self, text_channels: int, width: int, heads: int):
        super().__init__()
        self.mat_q = nn.Parameter(torch.zeros(1, heads, width // heads))
        self._init_kv(text_channels, width, heads)
        self.proj = nn.Linear(width, width)

    def forward(self, text: Tensor, mask: Tensor, bf16: bool) -> Tensor:
        k, v = self.kv(text)
        q = self.mat_q.to(k.dtype).unsqueeze(2).expand(text.shape[0], -1, -1, -1)  # (bs, Hp, 1, c)
        out = _text_attention(q, k, v, mask, bf16)
        return self.proj(out.reshape(text.shape[0], -1).to(self.proj.weight.dtype)).float()


class CrossAttention(_TextKV):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.mat_q = nn.Linear(width, width)
        self._init_kv(width, width, heads)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor, bf16: bool) -> Tensor:
        b, n, c = x.shape
        w = self.mat_q.weight
        q = F.linear(x.to(w.dtype), w, self.mat_q.bias).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        out = _text_attention(q, kv[0], kv[1], mask, bf16)
        return self.proj(out.transpose(1, 2).reshape(b, n, c).to(self.proj.weight.dtype))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates channel pairs (2j, 2j+1) of (…, L, c) fp32 by angle j of (L, c/2) cos/sin (interleaved pairs)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((cos * a - sin * b, sin * a + cos * b), dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Cosine attention: l2-normalised q and k, a learned per-head scale, then 2-D RoPE; SDPA with scale 1."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(width)), nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache=None, layer: int = 0,
                mask: Tensor | None = None) -> Tensor:
        w = self.mat_qkv.weight
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)).to(w.dtype)
        q, k, v = F.linear(x.to(w.dtype), w, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scale = self.scale_mul_1H11.float().clamp_max(MAX_SCALE_MUL).exp()
        q = apply_rope(F.normalize(q.float(), dim=-1).mul(scale), *rope).to(v.dtype)
        k = apply_rope(F.normalize(k.float(), dim=-1), *rope).to(v.dtype)
        out = attention(q, k, v, mask) if cache is None else cache.attend(layer, q, k, v, mask, x, self)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x.to(self.fc1.weight.dtype)), approximate="tanh"))


class Block(nn.Module):
    """CrossAttnBlock with shared AdaLN: self-attention, text cross-attention, FFN."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        c = cfg.width
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))
        self.sa, self.ca = SelfAttention(c, cfg.heads), CrossAttention(c, cfg.heads)
        self.ffn = FFN(c, cfg.ffn)
        self.ca_norm = nn.LayerNorm(c, eps=EPS)  # the only affine LayerNorm

    def modulation(self, gss: Tensor) -> Modulation:
        g1, g2, s1, s2, b1, b2 = (self.ada_gss + gss).unbind(2)
        return g1, g2, s1.add(1), s2.add(1), b1, b2

    def forward(self, x: Tensor, mod: Modulation, text_kv: tuple[Tensor, Tensor], text_mask: Tensor,
                rope: tuple[Tensor, Tensor], bf16: bool, cache=None, layer: int = 0,
                mask: Tensor | None = None, plan=None) -> Tensor:
        g1, g2, s1, s2, b1, b2 = mod
        if plan is None or plan.sublayer is None:
            x = x + self.sa(_layer_norm(x).mul(s1).add_(b1), rope, cache, layer, mask).float().mul_(g1)
            x = x + self.ca(self.ca_norm(x), text_kv, text_mask, bf16).float()  # ca_gamma = 1
            return x + self.ffn(_layer_norm(x).mul(s2).add_(b2)).float().mul(g2)

        # An acceleration's BlockPlan (variants/var_model.py; FastVAR, StageVAR) computes each residual update on
        # some tokens and restores the others; `plan.index` names the positions of the tokens given, so that
        # they keep their own RoPE angles (as FastVAR's official Infinity code gathers them).
        def sa(h: Tensor) -> Tensor:
            idx = getattr(plan, "index", None)
            r = rope if idx is None else (rope[0][idx].unsqueeze(1), rope[1][idx].unsqueeze(1))  # (rows, 1, l, c/2)
            return self.sa(_layer_norm(h).mul(s1).add_(b1), r, cache, layer, mask).float().mul_(g1)

        x = x + plan.sublayer(layer, "attn", x, sa)
        x = x + plan.sublayer(layer, "ca", x, lambda h: self.ca(self.ca_norm(h), text_kv, text_mask, bf16).float())
        return x + plan.sublayer(layer, "ffn", x, lambda h: self.ffn(_layer_norm(h).mul(s2).add_(b2)).float().mul(g2))


class _Chunk(nn.Module):
    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class InfinityNet(nn.Module):
    """Text conditioning, the block stack and the bitwise head; `forward` is the teacher-forced pass."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        c, ct5 = cfg.width, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, ct5))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.text_norm = nn.Module()
        self.text_norm.weight = nn.Parameter(torch.ones(ct5))
        self.text_proj_for_sos = nn.Module()
        self.text_proj_for_sos.ca = TextPool(ct5, c, cfg.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ct5, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.lvl_embed = nn.Embedding(cfg.levels, c)
        self.word_embed = nn.Linear(cfg.bits, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.head_nm = nn.Module()
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))
        self.head = nn.Linear(c, 2 * cfg.bits)
        per = cfg.depth // cfg.chunks
        self.block_chunks = nn.ModuleList(_Chunk([Block(cfg) for _ in range(per)]) for _ in range(cfg.chunks))
        self.xattn_bf16 = True  # the official cross-attention numerics (see the module docstring)

    @property
    def blocks(self) -> list[Block]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    # -- conditioning ----------------------------------------------------------------------------
    def encode_text(self, text: Tensor, mask: Tensor) -> TextCond:
        """(bs, Lt, Ct5) padded T5 features -> pooled condition and cross-attention features."""
        x = text.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.text_norm.weight  # RMSNorm
        cond = self.text_proj_for_sos.ca(x, mask, self.xattn_bf16)
        lin = self.text_proj_for_ca[0]
        kv = self.text_proj_for_ca(x.to(lin.weight.dtype)).float()
        return TextCond(cond, kv, mask)

    def shared_gss(self, cond: Tensor) -> Tensor:
        lin = self.shared_ada_lin[1]
        return lin(F.silu(cond).to(lin.weight.dtype)).float().view(-1, 1, 6, self.cfg.width)

    def modulations(self, cond: Tensor) -> list[Modulation]:
        gss = self.shared_gss(cond)
        return [b.modulation(gss) for b in self.blocks]

    def text_kv(self, text: TextCond) -> list[tuple[Tensor, Tensor]]:
        """Every block's cross-attention keys and values of the text (constant over a call)."""
        return [b.ca.kv(text.kv) for b in self.blocks]

    def head_modulation(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        lin = self.head_nm.ada_lin[1]
        scale, shift = lin(F.silu(cond).to(lin.weight.dtype)).float().view(-1, 1, 2, self.cfg.width).unbind(2)
        return scale.add(1), shift

    # -- inputs ----------------------------------------------------------------------------------
    def first_input(self, cond: Tensor) -> Tensor:
        """Scale-0 token: pooled text (SOS) + start position, (bs, 1, C); lvl_embed is added per scale."""
        return cond.unsqueeze(1) + self.pos_start

    def embed_input(self, x: Tensor) -> Tensor:
        """(B, l, d) next-scale input to (B, l, C)."""
        w = self.word_embed.weight
        return F.linear(x.to(w.dtype), w, self.word_embed.bias).float()

    # -- network ---------------------------------------------------------------------------------
    def run_blocks(self, x: Tensor, mods: Sequence[Modulation], text_kv: Sequence[tuple[Tensor, Tensor]],
                   text_mask: Tensor, rope: tuple[Tensor, Tensor], cache=None, mask: Tensor | None = None,
                   mix: tuple[int, float] | None = None, plan=None) -> Tensor:
        """`mix` = (block index, cfg): hidden-state guidance after that block, x = cfg·x[:B] + (1−cfg)·x[B:]
        repeated over both halves (later blocks and caches see the mixed state). `plan`: an acceleration's
        BlockPlan (None: the plain network)."""
        for layer, block in enumerate(self.blocks):
            x = block(x, mods[layer], text_kv[layer], text_mask, rope, self.xattn_bf16, cache, layer, mask, plan)
            if mix is not None and layer == mix[0]:
                b = x.shape[0] // 2
                x = mix[1] * x[:b] + (1 - mix[1]) * x[b:]
                x = torch.cat((x, x))
        return x

    def logits(self, x: Tensor, head_mod: tuple[Tensor, Tensor]) -> Tensor:
        """fp32 logits (…, 2d): channel 2k is bit k = 0, 2k + 1 is bit k = 1."""
        scale, shift = head_mod
        w = self.head.weight
        return F.linear(_layer_norm(x).mul(scale).add_(shift).to(w.dtype), w, self.head.bias).float()

    def forward(self, text: Tensor, text_mask: Tensor, x_in: Tensor, schedule: Sequence[tuple[int, int]],
                rope: tuple[Tensor, Tensor], pad_to: int = 128) -> Tensor:
        """Teacher-forced logits (B, L, 2d) from padded text and the inputs of scales 1.. (B, L − 1, d).

        As the official training forward: the sequence is zero-padded to a multiple of `pad_to`; a token of scale
        a sees the tokens of scales ≤ a, padded rows see only token 0; `rope` covers the padded length."""
        t = self.encode_text(text, text_mask)
        sizes = [h * w for h, w in schedule]
        n = sum(sizes)
        level = torch.repeat_interleave(torch.arange(len(sizes), device=x_in.device),
                                        torch.tensor(sizes, device=x_in.device))
        x = torch.cat((self.first_input(t.cond), self.embed_input(x_in)), dim=1) + self.lvl_embed.weight[level]
        padded = -(-n // pad_to) * pad_to
        x = F.pad(x, (0, 0, 0, padded - n))
        lvl = F.pad(level, (0, padded - n), value=-1)
        see = (lvl.view(-1, 1) >= lvl.view(1, -1)) & (lvl.view(1, -1) >= 0)
        see[n:, 0] = True
        mask = torch.where(see, 0.0, -torch.inf).view(1, 1, padded, padded)
        h = self.run_blocks(x, self.modulations(t.cond), self.text_kv(t), text_mask, rope, mask=mask)
        return self.logits(h[:, :n], self.head_modulation(t.cond))
