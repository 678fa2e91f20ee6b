"""The HMAR transformer (Kumbong et al. 2025, arXiv:2506.04421): VAR's blocks split into a shared base, a
next-scale path and a masked-prediction path, with Markov (block-diagonal) attention.

Matches NVlabs/HMAR@595a9df models/hmar.py (layout, inputs, heads); written from docs/HMAR_SPEC.md §2-§5,
nothing copied. Parameter and buffer names match the released `hmar-d*.pth` state dicts (docs/keys/keys_hmar_d*.txt),
so they load strictly. The blocks, attention and AdaLN maths are VAR's and are reused from var_model.

Markov attention: a token of scale k attends to the tokens of scale k only; what earlier scales said reaches it
through its input (the reconstruction of coarser scales). At inference every pass holds one scale's tokens, so the
attention is plain dense SDPA and nothing is cached. The teacher-forced forward over all L tokens needs the
block-diagonal pattern, computed by `markov_attention` (the block-sparse kernel of varbench.kernels, or SDPA with a
boolean mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varbench.kernels import block_sparse_attention, markov_ranges
from varbench.kernels.reference import allowed_mask

from .var_model import PATCH_NUMS, Block, Modulation, _layer_norm, add_positions

__all__ = ["HMARConfig", "HMARNet", "HMARModulations", "ATTN_IMPLS", "markov_attention",
           "param_count_closed_form", "init_random_hmar_"]

ATTN_IMPLS = ("auto", "triton", "ref", "sdpa")  # kernel dispatch of varbench.kernels, or SDPA with a boolean mask


@dataclass(frozen=True)
class HMARConfig:
    depth: int = 16
    width: int = 0  # 0 = 64·depth
    heads: int = 0  # 0 = depth
    n_layers_train: int = 8  # blocks of each private path (ns, mask); the official build uses 8 at every depth
    patch_nums: tuple[int, ...] = PATCH_NUMS[680]
    vocab_size: int = 4096
    z_channels: int = 32
    num_classes: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", self.width or 64 * self.depth)
        object.__setattr__(self, "heads", self.heads or self.depth)
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        if not 1 <= self.n_layers_train <= self.depth:
            raise ValueError(f"n_layers_train must be in 1..depth={self.depth}, got {self.n_layers_train}")

    @property
    def n_base(self) -> int:
        return self.depth - self.n_layers_train

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], patch_nums: Sequence[int] | None = None) -> HMARConfig:
        """Reads the architecture off an official-layout state dict. The base/ns/mask split is not stored: it is
        read from the key counts (raises ValueError when the two private paths differ in length)."""
        counts = {p: len({k.split(".")[1] for k in sd if k.startswith(p + ".")})
                  for p in ("base_blocks", "ns_blocks", "mask_blocks")}
        if counts["ns_blocks"] != counts["mask_blocks"] or counts["ns_blocks"] == 0:
            raise ValueError(f"the next-scale and masked paths must have the same, non-zero number of blocks; "
                             f"found {counts}")
        seq_len = sd["pos_1LC"].shape[1]
        if patch_nums is None:
            if seq_len not in PATCH_NUMS:
                raise ValueError(f"no known scale schedule has {seq_len} tokens; pass patch_nums explicitly")
            patch_nums = PATCH_NUMS[seq_len]
        return cls(depth=counts["base_blocks"] + counts["ns_blocks"], width=sd["pos_start"].shape[-1],
                   heads=sd["ns_blocks.0.attn.scale_mul_1H11"].shape[1], n_layers_train=counts["ns_blocks"],
                   patch_nums=tuple(patch_nums), vocab_size=sd["ns_head.weight"].shape[0],
                   z_channels=sd["word_embed.weight"].shape[1], num_classes=sd["class_emb.weight"].shape[0] - 1)


class HMARModulations(NamedTuple):
    """AdaLN outputs of one call (constant over its scales and steps)."""

    base: list[Modulation]
    ns: list[Modulation]
    mask: list[Modulation]
    ns_head: tuple[Tensor, Tensor]
    mask_head: tuple[Tensor, Tensor]


def markov_attention(q: Tensor, k: Tensor, v: Tensor, patch_nums: Sequence[int], impl: str = "auto",
                     ranges: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Block-diagonal attention over the whole sequence: each token sees its own scale only.

    q, k, v: (B, H, L, hd), q already carrying the softmax scale (VAR's l2-normalised attention). impl: "auto",
    "triton" or "ref" go to `varbench.kernels.block_sparse_attention`; "sdpa" runs SDPA with a boolean mask.
    ranges: `markov_ranges(patch_nums)` already on q's device (computed once per forward, not per layer).
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
    start, end = ranges if ranges is not None else markov_ranges(patch_nums)
    start, end = start.to(q.device), end.to(q.device)
    if impl == "sdpa":
        mask = allowed_mask(start, end, k.shape[2])  # (L, L) True = may attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return block_sparse_attention(q, k, v, start, end, scale=1.0, impl=impl, count_tiles=False)[0]


def _block_with(block: Block, x: Tensor, mod: Modulation, attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """Block.forward with another attention operator (same maths and modules)."""
    g1, g2, s1, s2, b1, b2 = mod
    q, k, v = block.attn.qkv(_layer_norm(x).mul(s1).add_(b1))
    out = attend(q, k, v)  # (B, H, L, hd)
    b, _, n, _ = out.shape
    x = x + block.attn.proj(out.transpose(1, 2).reshape(b, n, -1)).mul_(g1)
    return x + block.ffn(_layer_norm(x).mul(s2).add_(b2)).mul(g2)


def _head_nm(width: int) -> nn.Module:
    m = nn.Module()
    m.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
    return m


class HMARNet(nn.Module):
    """Embeddings, base/ns/mask blocks and two AdaLN heads, in the official state-dict order."""

    def __init__(self, cfg: HMARConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        # Block-DIAGONAL (unlike VAR's block-causal buffer): kept for strict loading; markov_attention is what runs.
        add_positions(self, c, cfg.patch_nums, lambda row, col: row == col)
        self.word_embed_bias = nn.Parameter(torch.zeros(c))  # word_embed has no bias of its own (§2.3)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), c)
        self.base_blocks = nn.ModuleList(Block(c, cfg.heads, False) for _ in range(cfg.n_base))
        self.ns_blocks = nn.ModuleList(Block(c, cfg.heads, False) for _ in range(cfg.n_layers_train))
        self.mask_blocks = nn.ModuleList(Block(c, cfg.heads, False) for _ in range(cfg.n_layers_train))
        self.ns_head_nm, self.ns_head = _head_nm(c), nn.Linear(c, cfg.vocab_size)
        self.mask_head_nm, self.mask_head = _head_nm(c), nn.Linear(c, cfg.vocab_size)
        self.word_embed = nn.Linear(cfg.z_channels, c, bias=False)
        self.mask_embed = nn.Embedding(1, c)  # the [MASK] vector, replacing word-embedding rows
        ends = [sum(pn * pn for pn in cfg.patch_nums[: i + 1]) for i in range(len(cfg.patch_nums))]
        self.begin_ends = [(e - pn * pn, e) for e, pn in zip(ends, cfg.patch_nums)]

    @property
    def blocks(self) -> list[Block]:
        """Every block (base, ns, mask), as VARNet.blocks lists them for precision casts."""
        return [*self.base_blocks, *self.ns_blocks, *self.mask_blocks]

    # -- conditioning ----------------------------------------------------------------------------
    def modulations(self, cond: Tensor) -> HMARModulations:
        """AdaLN outputs of every block and both heads for a (B', C) class embedding."""
        def heads(nm: nn.Module) -> tuple[Tensor, Tensor]:
            lin = nm.ada_lin[1]
            scale, shift = lin(F.silu(cond).to(lin.weight.dtype)).view(-1, 1, 2, self.cfg.width).unbind(2)
            return scale.add(1), shift

        def of(blocks: nn.ModuleList) -> list[Modulation]:
            return [b.modulation(cond) for b in blocks]

        return HMARModulations(of(self.base_blocks), of(self.ns_blocks), of(self.mask_blocks),
                               heads(self.ns_head_nm), heads(self.mask_head_nm))

    # -- inputs ----------------------------------------------------------------------------------
    def level_pos(self) -> Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, L, C)

    def first_input(self, cond: Tensor, lvl_pos: Tensor) -> Tensor:
        """Scale 0, both paths: class embedding + start position + its level/position embedding (as VAR)."""
        return cond.unsqueeze(1) + self.pos_start + lvl_pos[:, :1]

    def embed(self, x: Tensor) -> Tensor:
        """W·x without the bias, (B, l, Cvae) -> (B, l, C); the bias is added once per input (§2.3)."""
        w = self.word_embed.weight
        return F.linear(x.to(w.dtype), w)

    def ns_input(self, x: Tensor, si: int, lvl_pos: Tensor) -> Tensor:
        """Next-scale input of scale si from area(f_hat -> pn) (B, Cvae, pn, pn): W·x + b + level/position."""
        begin, end = self.begin_ends[si]
        return self.embed(x.flatten(2).transpose(1, 2)) + self.word_embed_bias + lvl_pos[:, begin:end]

    def mask_input(self, f_tilde: Tensor, g: Tensor, masked: Tensor, si: int, lvl_pos: Tensor) -> Tensor:
        """Masked-step input of scale si (§5): W·f̃ + E + b + level/position, E = W·g with the rows at `masked`
        (B, m) replaced by the [MASK] vector. f̃, g: (B, Cvae, pn, pn)."""
        begin, end = self.begin_ends[si]
        e = self.embed(g.flatten(2).transpose(1, 2))  # (B, l, C)
        b, m = masked.shape
        rows = self.mask_embed.weight.to(e.dtype).expand(b, m, -1)
        e = e.scatter(1, masked.unsqueeze(-1).expand(-1, -1, e.shape[-1]), rows)
        return self.embed(f_tilde.flatten(2).transpose(1, 2)) + e + self.word_embed_bias + lvl_pos[:, begin:end]

    # -- network ---------------------------------------------------------------------------------
    def run(self, x: Tensor, mods: HMARModulations, path: str,
            attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Base blocks, then the `path` ("ns" or "mask") blocks and head: (B', l, C) -> (B', l, V) fp32 logits.
        attend=None: dense attention over the tokens given (one scale at inference)."""
        blocks = [*zip(self.base_blocks, mods.base), *zip(getattr(self, f"{path}_blocks"), getattr(mods, path))]
        for block, mod in blocks:
            x = block(x, mod) if attend is None else _block_with(block, x, mod, attend)
        scale, shift = getattr(mods, f"{path}_head")
        head: nn.Linear = getattr(self, f"{path}_head")
        return F.linear(_layer_norm(x).mul(scale).add_(shift).to(head.weight.dtype), head.weight, head.bias).float()

    def forward(self, labels: Tensor, x_ns: Tensor, x_mask: Tensor | None = None,
                mask_positions: Tensor | None = None, attn_impl: str = "auto") -> Tensor:
        """Teacher-forced logits (B, L, V) over all scales at once with Markov attention.

        x_ns: (B, L-1, Cvae) next-scale inputs (VAR's teacher-forcing input). Without x_mask: the next-scale path.
        With x_mask (B, L-1, Cvae) (each scale's own tokens through bicubic, φ, area) and mask_positions (P,) indices
        into the L-1 positions, shared by the batch as in training: the masked path.
        """
        cond = self.class_emb(labels)
        mods = self.modulations(cond)
        tokens = self.embed(x_ns)
        if x_mask is not None:
            e = self.embed(x_mask)
            if mask_positions is not None:
                e[:, mask_positions] = self.mask_embed.weight[0].to(e.dtype)
            tokens = tokens + e
        x = torch.cat((cond.unsqueeze(1) + self.pos_start, (tokens + self.word_embed_bias).float()), 1)
        x = x + self.level_pos()
        pn = self.cfg.patch_nums
        ranges = tuple(r.to(x.device) for r in markov_ranges(pn))
        return self.run(x, mods, "ns" if x_mask is None else "mask",
                        attend=lambda q, k, v: markov_attention(q, k, v, pn, attn_impl, ranges))


def param_count_closed_form(cfg: HMARConfig) -> int:
    """HMAR_SPEC §1: (depth + n)(18C² + 14C + H) + 4C² + C(L + 2V + 2 + Cvae + classes + 1 + S + 4 + 1) + 2V."""
    c, h, n = cfg.width, cfg.heads, cfg.n_layers_train
    per_c = cfg.seq_len + 2 * cfg.vocab_size + cfg.z_channels + cfg.num_classes + 1 + len(cfg.patch_nums) + 7
    return (cfg.depth + n) * (18 * c * c + 14 * c + h) + 4 * c * c + c * per_c + 2 * cfg.vocab_size


@torch.no_grad()
def init_random_hmar_(net: HMARNet, generator: torch.Generator, logit_scale: float = 1.0) -> HMARNet:
    """O(1) random weights so that every code path matters (the recipe of var_model.init_random_): linear
    weights ~ N(0, 1/fan_in), other tensors ~ N(0, 0.5²), per-head logit scales around ln 4 with one above the
    ln 100 clamp, AdaLN linears ×0.3, both heads × logit_scale. For tests and speed benchmarks."""
    for name, p in net.named_parameters():
        if name.endswith("scale_mul_1H11"):
            p.copy_(math.log(4.0) + torch.randn(p.shape, generator=generator))
            p.view(-1)[0] = math.log(150.0)
        elif p.ndim >= 2 and not name.startswith(("pos_", "class_emb", "lvl_embed", "mask_embed")):
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
        if "ada_lin" in name:
            p.mul_(0.3)
    net.ns_head.weight.mul_(logit_scale)
    net.mask_head.weight.mul_(logit_scale)
    return net
