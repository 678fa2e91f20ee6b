"""The VAR transformer (next-scale prediction), written from docs/VAR_SPEC.md §3.

Parameter and buffer names match the official state dict (FoundationVision/VAR@78b95394 models/var.py,
basic_var.py) for both AdaLN layouts: per-block `ada_lin` (d16-d30) and shared AdaLN (`shared_ada_lin` +
per-block `ada_gss`, d36 at 512 px). Nothing is copied from that code.

Precision: the residual stream, LayerNorms, q/k normalisation, logits and f_hat stay fp32; linear layers and
attention run in `compute_dtype`, which is what the official code gets under autocast. Weights may be held in
that dtype (the engine) or in fp32 under `torch.autocast` (the reference): the explicit casts below are no-ops
in fp32 and the same casts autocast would make otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varbench.harness.core.kv_cache import attention

__all__ = ["VARConfig", "VARNet", "Modulation", "BlockPlan", "PATCH_NUMS", "flops_per_image", "init_random_"]

# Scale schedules by total token count L: VAR 256 px, VAR 512 px (d36), and the 64 px zoo.
PATCH_NUMS: dict[int, tuple[int, ...]] = {
    680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    155: (1, 2, 3, 4, 5, 6, 8),
}
MAX_SCALE_MUL = torch.log(torch.tensor(100.0)).item()  # per-head logit scale is clamped at ln 100


@dataclass(frozen=True)
class VARConfig:
    depth: int = 16
    width: int = 0  # 0 = 64·depth, as in every released model
    heads: int = 0  # 0 = depth (head dim 64)
    shared_aln: bool = False
    patch_nums: tuple[int, ...] = PATCH_NUMS[680]
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae of the tokenizer
    num_classes: int = 1000  # class index num_classes is the null class used for CFG

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", self.width or 64 * self.depth)
        object.__setattr__(self, "heads", self.heads or self.depth)
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], patch_nums: Sequence[int] | None = None) -> VARConfig:
        """Reads depth, width, heads, AdaLN layout and schedule off an official-layout state dict."""
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        seq_len = sd["pos_1LC"].shape[1]
        if patch_nums is None:
            if seq_len not in PATCH_NUMS:
                raise ValueError(f"no known scale schedule has {seq_len} tokens (known: "
                                 f"{ {k: v for k, v in PATCH_NUMS.items()} }); pass patch_nums explicitly")
            patch_nums = PATCH_NUMS[seq_len]
        return cls(
            depth=depth, width=sd["pos_start"].shape[-1], heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1],
            shared_aln="shared_ada_lin.1.weight" in sd, patch_nums=tuple(patch_nums),
            vocab_size=sd["head.weight"].shape[0], z_channels=sd["word_embed.weight"].shape[1],
            num_classes=sd["class_emb.weight"].shape[0] - 1)


# (gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2), each (2B, 1, C): one block's AdaLN output.
Modulation = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


class BlockPlan(Protocol):
    """How an acceleration (variants/accel/) changes one forward's blocks; None everywhere is the plain network.

    `sublayer(layer, kind, x, fn)`: the residual update of sublayer `kind` ("attn" or "ffn") of `layer` on the
    (rows, l, C) stream x, where `fn` computes it on any subset of tokens. `attend(layer, q, k, v, mask, cache)`:
    the attention output in place of the cache's own `attend`."""

    sublayer: Callable[[int, str, Tensor, Callable[[Tensor], Tensor]], Tensor] | None
    attend: Callable[..., Tensor] | None


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6)


class SelfAttention(nn.Module):
    """Multi-head attention with l2-normalised q and k and a learned per-head logit scale."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(width)), nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # keys have no bias
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(width, width)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projects (B, L, C) to q, k, v of shape (B, H, L, hd): q and k normalised, q pre-scaled."""
        w = self.mat_qkv.weight
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x.to(w.dtype), w, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scale = self.scale_mul_1H11.float().clamp_max(MAX_SCALE_MUL).exp()
        q = F.normalize(q.float(), dim=-1).mul(scale).to(v.dtype)
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        return q, k, v

    def forward(self, x: Tensor, cache=None, layer: int = 0, mask: Tensor | None = None,
                attend: Callable[..., Tensor] | None = None) -> Tensor:
        q, k, v = self.qkv(x)
        if attend is not None:  # an acceleration's attention (LiteVAR: windows, scores shared by the CFG halves)
            out = attend(layer, q, k, v, mask, cache)
        else:  # a cache attends over what it holds (a compressing policy's then scores and evicts keys)
            out = attention(q, k, v, mask) if cache is None else cache.attend(layer, q, k, v, mask, x, self)
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class FFN(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x.to(self.fc1.weight.dtype)), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block, AdaLN-modulated by the class condition."""

    def __init__(self, width: int, heads: int, shared_aln: bool):
        super().__init__()
        self.attn, self.ffn = SelfAttention(width, heads), FFN(width)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def modulation(self, cond: Tensor) -> Modulation:
        """cond: (2B, C) class embedding, or (2B, 1, 6, C) shared-AdaLN output."""
        if hasattr(self, "ada_gss"):
            g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond).unbind(2)
        else:
            lin = self.ada_lin[1]
            ada = lin(F.silu(cond).to(lin.weight.dtype))
            g1, g2, s1, s2, b1, b2 = ada.view(-1, 1, 6, ada.shape[-1] // 6).unbind(2)
        return g1, g2, s1.add(1), s2.add(1), b1, b2

    def forward(self, x: Tensor, mod: Modulation, cache=None, layer: int = 0,
                mask: Tensor | None = None, plan: BlockPlan | None = None) -> Tensor:
        g1, g2, s1, s2, b1, b2 = mod
        attend = None if plan is None else plan.attend

        def attn(h: Tensor) -> Tensor:
            return self.attn(_layer_norm(h).mul(s1).add_(b1), cache, layer, mask, attend).mul_(g1)

        def ffn(h: Tensor) -> Tensor:
            return self.ffn(_layer_norm(h).mul(s2).add_(b2)).mul(g2)

        if plan is None or plan.sublayer is None:
            x = x + attn(x)
            return x + ffn(x)
        # An acceleration computes each residual update on some tokens and restores the others (FastVAR, StageVAR)
        x = x + plan.sublayer(layer, "attn", x, attn)
        return x + plan.sublayer(layer, "ffn", x, ffn)


def scale_index(patch_nums: tuple[int, ...]) -> Tensor:
    """(1, L) int64: the scale each token position belongs to (the `lvl_1L` buffer of VAR-family nets)."""
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)]).view(1, -1)


def add_positions(net: nn.Module, width: int, patch_nums: tuple[int, ...],
                  visible: Callable[[Tensor, Tensor], Tensor]) -> None:
    """The position parameters and the `lvl_1L` / `attn_bias_for_masking` buffers of a VAR-family net, as the
    official state dicts hold them; `visible(row_scale, col_scale)` says which token pairs the mask lets attend."""
    lvl = scale_index(patch_nums)
    n = lvl.shape[1]
    net.pos_start = nn.Parameter(torch.zeros(1, 1, width))
    net.pos_1LC = nn.Parameter(torch.zeros(1, n, width))
    net.register_buffer("lvl_1L", lvl)
    mask = torch.where(visible(lvl.view(n, 1), lvl.view(1, n)), 0.0, -torch.inf).view(1, 1, n, n)
    net.register_buffer("attn_bias_for_masking", mask)


class VARNet(nn.Module):
    """Class-conditional next-scale transformer: embeddings, blocks, AdaLN head."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        # Block-causal mask: a token sees every token of its own and coarser scales (teacher forcing only).
        add_positions(self, cfg.width, cfg.patch_nums, lambda row, col: row >= col)
        self.word_embed = nn.Linear(cfg.z_channels, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), c)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(Block(c, cfg.heads, cfg.shared_aln) for _ in range(cfg.depth))
        self.head_nm = nn.Module()
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))
        self.head = nn.Linear(c, cfg.vocab_size)
        ends = [sum(pn * pn for pn in cfg.patch_nums[: i + 1]) for i in range(len(cfg.patch_nums))]
        self.begin_ends = [(e - pn * pn, e) for e, pn in zip(ends, cfg.patch_nums)]  # token span per scale

    # -- conditioning ----------------------------------------------------------------------------
    def modulations(self, cond: Tensor) -> list[Modulation]:
        """AdaLN outputs of every block for a (2B, C) condition; constant over the scales of one call."""
        if self.cfg.shared_aln:
            lin = self.shared_ada_lin[1]
            shared = lin(F.silu(cond).to(lin.weight.dtype))
            cond = shared.view(-1, 1, 6, self.cfg.width)
        return [block.modulation(cond) for block in self.blocks]

    def head_modulation(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        lin = self.head_nm.ada_lin[1]
        scale, shift = lin(F.silu(cond).to(lin.weight.dtype)).view(-1, 1, 2, self.cfg.width).unbind(2)
        return scale.add(1), shift

    # -- inputs ----------------------------------------------------------------------------------
    def level_pos(self) -> Tensor:
        """Level + position embedding of every token, (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_input(self, cond: Tensor, lvl_pos: Tensor) -> Tensor:
        """Scale-0 token: the class embedding (the SOS) + start position + its level/position embedding."""
        return cond.unsqueeze(1) + self.pos_start + lvl_pos[:, :1]

    def embed_input(self, x: Tensor, si: int, lvl_pos: Tensor) -> Tensor:
        """Token-map input (B, Cvae, pn, pn) of scale si to (B, pn², C) embeddings."""
        begin, end = self.begin_ends[si]
        w = self.word_embed.weight
        return F.linear(x.flatten(2).transpose(1, 2).to(w.dtype), w, self.word_embed.bias) + lvl_pos[:, begin:end]

    # -- network ---------------------------------------------------------------------------------
    def run_blocks(self, x: Tensor, mods: Sequence[Modulation], cache=None, mask: Tensor | None = None,
                   plan: BlockPlan | None = None) -> Tensor:
        for layer, (block, mod) in enumerate(zip(self.blocks, mods)):
            x = block(x, mod, cache, layer, mask, plan)
        return x

    def logits(self, x: Tensor, head_mod: tuple[Tensor, Tensor]) -> Tensor:
        """fp32 logits (…, V) of hidden states (…, C)."""
        scale, shift = head_mod
        w = self.head.weight
        return F.linear(_layer_norm(x).mul(scale).add_(shift).to(w.dtype), w, self.head.bias).float()

    def forward(self, labels: Tensor, x_in: Tensor, mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, L, V) from labels (B,) and the inputs of scales 1.. (B, L - 1, Cvae)."""
        cond = self.class_emb(labels)
        lvl_pos = self.level_pos()
        tokens = F.linear(x_in.to(self.word_embed.weight.dtype), self.word_embed.weight, self.word_embed.bias)
        x = torch.cat((cond.unsqueeze(1) + self.pos_start, tokens.float()), dim=1) + lvl_pos
        mask = self.attn_bias_for_masking if mask is None else mask
        return self.logits(self.run_blocks(x, self.modulations(cond), mask=mask), self.head_modulation(cond))


def flops_per_image(cfg: VARConfig) -> float:
    """Model FLOPs of one CFG-guided KV-cached generation (2 per MAC), docs/VAR_SPEC.md §7.

    Counts what the official algorithm computes: both CFG halves, attention over the cached keys,
    AdaLN linears once per scale, the head, and word_embed on the B conditional rows. VAE decode excluded.
    """
    d, c, v, s, n = cfg.depth, cfg.width, cfg.vocab_size, len(cfg.patch_nums), cfg.seq_len
    sizes = [pn * pn for pn in cfg.patch_nums]
    attn_pairs = sum(k * sum(sizes[: i + 1]) for i, k in enumerate(sizes))  # Σ n_k·N_k
    adaln = (1 if cfg.shared_aln else d) * 12 * c * c * s
    per_half = d * (24 * c * c * n + 4 * c * attn_pairs) + adaln + 2 * c * v * n + 4 * c * c * s
    return float(2 * per_half + 2 * cfg.z_channels * c * (n - 1))


@torch.no_grad()
def init_random_(net: VARNet, generator: torch.Generator, logit_scale: float = 1.0) -> VARNet:
    """Fills every parameter with O(1)-scaled random values so that every code path matters.

    Linear weights ~ N(0, 1/fan_in) (unit-variance outputs), biases and embeddings ~ N(0, 0.5²) style
    values, per-head logit scales spread around ln 4 with one above the ln 100 clamp, and the head scaled
    by `logit_scale` so that top-k/top-p keep a meaningful nucleus. Used for tests and speed benchmarks.
    """
    for name, p in net.named_parameters():
        if p.device.type == "meta":
            raise ValueError("materialise the model (to_empty) before random init")
        fan_in = p.shape[-1] if p.ndim >= 2 else 1
        if name.endswith("scale_mul_1H11"):
            p.copy_(math.log(4.0) + torch.randn(p.shape, generator=generator))
            p.view(-1)[0] = math.log(150.0)  # exercises the clamp at ln 100
        elif p.ndim >= 2 and not name.startswith(("pos_", "class_emb", "lvl_embed")) and "ada_gss" not in name:
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    for name, p in net.named_parameters():
        if "ada_lin" in name or "ada_gss" in name:
            p.mul_(0.3)  # keep (1 + scale) and gamma of order one
    net.head.weight.mul_(logit_scale)
    return net
