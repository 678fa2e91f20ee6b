"""KV caches for scale-wise decoding.

`StaticKVCache` is the engine's: one preallocated buffer per call shape, written in place at the positions of
the current scale, read as a prefix view (gpt-fast's KVCache idea), so no step allocates or copies the past.
`ConcatKVCache` is what the official code does (torch.cat at every scale); the reference loop uses it so that
the engine is measured against the same algorithm with only this feature switched off.
`CompressedKVCache` is the cache of a compressing KV policy (variants/kv_policies.py): static buffers sized to
the policy's budget plus one forward's tokens, compacted in place after each scale's attention (`compact_kv_`),
so that the allocated bytes, not only the accounted ones, fall with the budget.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from varbench.kernels import compact_kv_

__all__ = ["attention", "StaticKVCache", "ConcatKVCache", "CompressedKVCache", "GroupPlan", "KVPlan", "KVView"]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """One fused attention call; the softmax scale is already in q (VAR-family nets pre-scale it)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), scale=1.0)


class _KeepAll:
    """The cache contract every model calls: `attend` writes this forward's keys and values and attends over
    all held. Caches that keep every key do it as update + one fused call; CompressedKVCache also evicts."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
               x: Tensor | None = None, attn=None) -> Tensor:
        k, v = self.update(layer, k, v)  # keys/values of this scale join those of coarser scales
        return attention(q, k, v, mask)


class StaticKVCache(_KeepAll):
    """Keys and values of every layer in two (layers, batch, heads, capacity, head_dim) buffers.

    The write position advances by the number of tokens each layer-0 update brings; all layers of one
    scale write to the same slots. Positions are Python ints fixed by the scale schedule, so no host sync.
    """

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens held after the current scale's update
        self._start = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.length = self._start = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes this scale's (B, H, l, hd) keys/values for `layer`; returns views of everything held."""
        if layer == 0:
            self._start = self.length
            self.length += k.shape[2]
            if self.length > self.capacity:
                raise RuntimeError(f"KV cache overflow: {self.length} tokens > capacity {self.capacity}")
        start, end = self._start, self.length
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes of keys and values held (for `tokens` positions; default: what is held now)."""
        n = self.length if tokens is None else tokens
        return 2 * self.k[:, :, :, :n].numel() * self.k.element_size()

    def current_nbytes(self) -> int:
        """Bytes of the keys and values the latest forward wrote (the current scale's)."""
        return self.nbytes(self.length - self._start)

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class ConcatKVCache(_KeepAll):
    """The official code's cache: grows by concatenation at every scale (reference only)."""

    def __init__(self, layers: int):
        self.k: list[Tensor | None] = [None] * layers
        self.v: list[Tensor | None] = [None] * layers
        self._added = 0  # tokens the latest forward appended

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)
        self._added = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer == 0:
            self._added = k.shape[2]
        old_k, old_v = self.k[layer], self.v[layer]
        self.k[layer] = k if old_k is None else torch.cat((old_k, k), dim=2)
        self.v[layer] = v if old_v is None else torch.cat((old_v, v), dim=2)
        return self.k[layer], self.v[layer]

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def nbytes(self, tokens: int | None = None) -> int:
        held = sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
        if tokens is None or self.length == 0:
            return held
        return held * tokens // self.length

    def current_nbytes(self) -> int:
        return self.nbytes(self._added) if self.length else 0


@dataclass(frozen=True)
class GroupPlan:
    """Heads of one layer that share a budget (HACK: one group per head type; others: one group of all heads)."""

    heads: tuple[int, ...] | None  # head indices; None = every head, in order
    budgets: tuple[int, ...]  # tokens kept per head after each scale, where the plan is active
    kind: str = ""  # the policy's label for the group (HACK: "structural" or "contextual")


@dataclass(frozen=True)
class KVPlan:
    """What a compressing policy keeps, per layer and scale, for one model."""

    patch_nums: tuple[int, ...]
    layers: tuple[tuple[GroupPlan, ...], ...]
    active: tuple[bool, ...]  # per scale: compress after it (a full cache would hold more than the budget)
    state: tuple[str, ...] = ()  # per-slot fp32 statistics the policy carries (H2O: accumulated attention)

    @property
    def ends(self) -> list[int]:
        return [sum(pn * pn for pn in self.patch_nums[: i + 1]) for i in range(len(self.patch_nums))]

    def capacity(self, budgets: tuple[int, ...], tokens: int | None = None) -> int:
        """Slots a group needs when each forward brings one scale: the most held while a scale attends."""
        held = cap = 0
        for si, end in enumerate(self.ends):
            if tokens is not None and end > tokens:
                break
            held += self.patch_nums[si] ** 2
            cap = max(cap, held)
            if self.active[si]:
                held = min(held, budgets[si])
        return cap


@dataclass
class KVView:
    """One group's cache as a policy sees it right after a forward's attention (before eviction)."""

    layer: int
    kind: str
    q: Tensor  # (B, Hg, n, D) this forward's queries, pre-scaled: q·k are the model's attention logits
    k: Tensor  # (B, Hg, N, D) every key held; this forward's are the last n slots
    si: int  # scale of the forward's last token
    scale_slots: tuple[int, int]  # slots of that scale's keys; its queries are the last rows of q
    mask: Tensor | None = None  # (.., n, N) additive mask of a multi-scale forward (the refiner's prefill)
    x: Tensor | None = None  # (B, n, C) the attention's input, for scores from the raw projection
    attn: object = None  # the attention module (its `mat_qkv`, `heads`)
    heads: Tensor | None = None  # (Hg,) head indices of the group; None = all
    state: dict[str, Tensor] = field(default_factory=dict)  # per-slot statistics, (B, Hg, N) views
    patch_nums: tuple[int, ...] = ()  # the model's scale schedule

    @property
    def n(self) -> int:
        return self.q.shape[2]

    @property
    def N(self) -> int:
        return self.k.shape[2]

    def mask_rows(self, rows: Tensor | slice) -> Tensor | None:
        return None if self.mask is None else self.mask[..., rows, :].float()

    def raw_queries(self, rows: Tensor) -> Tensor:
        """(B, Hg, r, D) queries of `rows` straight from the qkv projection: no bias, no normalisation, no
        learned scale (what ScaleKV's released code scores with)."""
        w = self.attn.mat_qkv.weight
        c = w.shape[1]
        raw = F.linear(self.x[:, rows].to(w.dtype), w[:c]).float()
        b, r, _ = raw.shape
        raw = raw.view(b, r, self.attn.heads, -1).transpose(1, 2)
        return raw if self.heads is None else raw[:, self.heads]


class _Group:
    def __init__(self, plan: GroupPlan, heads: int, capacity: int, batch: int, head_dim: int, state: tuple[str, ...],
                 dtype: torch.dtype, device: torch.device):
        self.plan, self.length = plan, 0
        self.index = None if plan.heads is None else torch.tensor(plan.heads, dtype=torch.long, device=device)
        hg = heads if plan.heads is None else len(plan.heads)
        self.k = torch.zeros(batch, hg, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.state = {name: torch.zeros(batch, hg, capacity, device=device) for name in state}

    def ensure(self, slots: int) -> None:
        """Grows the buffers for a forward longer than planned (a multi-scale prefill); keeps what is held."""
        if slots <= self.k.shape[2]:
            return
        held = self.length
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], slots, old.shape[3])
            new[:, :, :held] = old[:, :, :held]
            setattr(self, name, new)
        for name, old in self.state.items():
            new = old.new_zeros(*old.shape[:2], slots)
            new[..., :held] = old[..., :held]
            self.state[name] = new


class CompressedKVCache:
    """Per layer, one static buffer per head group, compacted in place after each forward's attention.

    Heads of one group keep equal counts (HACK's head types are separate groups, as HACK reorders heads by type),
    so no per-head valid length or padding mask is needed. The model's attention calls `attend`, which writes
    the forward's keys and values, attends, lets the policy score the held keys with this forward's queries, and
    compacts the kept ones to the front (`compact_kv_`: Triton on CUDA, reference elsewhere).
    """

    def __init__(self, policy, plan: KVPlan, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, tokens: int | None = None):
        self.policy, self.plan, self.heads, self.head_dim = policy, plan, heads, head_dim
        self.batch, self.dtype, self.device, self.tokens = batch, dtype, torch.device(device), tokens
        self.groups = [[_Group(g, heads, max(1, plan.capacity(g.budgets, tokens)), batch, head_dim, plan.state,
                               dtype, self.device) for g in layer] for layer in plan.layers]
        self._ends = plan.ends
        self.seen = 0  # tokens the model has fed through the cache (positions, not slots)
        self._added = 0

    def matches(self, policy, plan: KVPlan, batch: int, dtype: torch.dtype, device: torch.device,
                tokens: int | None) -> bool:
        return (self.policy is policy and self.plan == plan and self.batch == batch and self.dtype == dtype
                and self.device == torch.device(device) and self.tokens == tokens)

    def reset(self) -> None:
        self.seen = self._added = 0
        for layer in self.groups:
            for g in layer:
                g.length = 0
                for t in g.state.values():
                    t.zero_()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
               x: Tensor | None = None, attn=None) -> Tensor:
        """(B, H, n, D) attention output of this forward's queries over everything held, then eviction."""
        n = k.shape[2]
        if layer == 0:
            self._added = n
            self.seen += n
        si = min(bisect.bisect_left(self._ends, self.seen), len(self._ends) - 1)
        groups = self.groups[layer]
        outs = []
        for g in groups:
            qg, kg, vg = (q, k, v) if g.index is None else (q[:, g.index], k[:, g.index], v[:, g.index])
            start, end = g.length, g.length + n
            g.ensure(end)
            g.k[:, :, start:end] = kg
            g.v[:, :, start:end] = vg
            m = None if mask is None else F.pad(mask.to(q.dtype), (start, 0))  # held entries are all visible
            outs.append(F.scaled_dot_product_attention(qg, g.k[:, :, :end], g.v[:, :, :end], attn_mask=m, scale=1.0))
            g.length = end
            size = min(self.plan.patch_nums[si] ** 2, n)
            view = KVView(layer, g.plan.kind, qg, g.k[:, :, :end], si, (end - size, end), m, x, attn, g.index,
                          {name: t[..., :end] for name, t in g.state.items()}, self.plan.patch_nums)
            self.policy.observe(view)
            n_keep = g.plan.budgets[si] if self.plan.active[si] else end
            if end > n_keep:
                self._evict(g, self.policy.select(view, n_keep), end)
        if len(groups) == 1 and groups[0].index is None:
            return outs[0]
        out = torch.empty_like(q)
        for g, o in zip(groups, outs):
            out[:, g.index] = o
        return out

    @staticmethod
    def _evict(g: _Group, keep: Tensor, end: int) -> None:
        n_keep = keep.shape[2]
        compact_kv_(g.k, g.v, keep, check=False)  # sorted by construction (policies return sorted slots)
        for t in g.state.values():
            t[..., :n_keep] = t[..., :end].gather(-1, keep)
            t[..., n_keep:end] = 0  # the next forward's slots start from zero
        g.length = n_keep

    def lengths(self) -> list[list[int]]:
        """Slots held per layer and group."""
        return [[g.length for g in layer] for layer in self.groups]

    def _bytes(self, per_group) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * size * self.head_dim * sum(per_group(g) * g.k.shape[0] * g.k.shape[1]
                                              for layer in self.groups for g in layer)

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes of keys and values held for later scales (after this scale's eviction)."""
        return self._bytes(lambda g: g.length)

    def current_nbytes(self) -> int:
        """Bytes of the keys and values the latest forward wrote, before eviction."""
        return self._bytes(lambda g: self._added)

    @property
    def allocated_bytes(self) -> int:
        return self._bytes(lambda g: g.k.shape[2])

    @property
    def length(self) -> int:
        return self.seen
