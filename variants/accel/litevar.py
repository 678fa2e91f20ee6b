"""LiteVAR (Xie et al. 2024, arXiv:2411.17178): multi-diagonal windowed attention (MDWA) at late scales and
attention sharing across CFG (ASC). Its mixed-precision quantization is out of scope here.

Facts from EkaterinaXie/LiteVAR@176ee6a (models/mask_for_inference.py `mask_inference`, models/mask_attn_try.py),
written here without its code: on VAR-256 the queries of scales 3..9 see, in each of the last few key scales
(their own and up to six coarser ones; the first two or three scales stay whole), only the keys within a band
|i - j| <= w of raster indices (i: the query's index in its scale, j: the key's index in its scale); w is
chosen per layer, head and scale offline, the smallest of a list of templates (16 to 64 at the 13x13 scale)
that keeps 90-95% of the attention mass. "Global CFG" mode gives the unconditional rows the conditional rows'
attention scores (`attn[-B:] = attn[:B]`), so each half applies one attention map to its own values.

Differences, unverified: the calibrated windows were never released, so one band w = `window`·n (n: the query
scale's token count) serves every layer and head; keys outside the band are excluded (-inf before the softmax;
the official code multiplies the scores by the 0/1 band, which leaves those keys at score 0). With a KV policy
that evicts keys (their positions are then unknown) the band covers the scale's own keys only, the policy decides
the coarser ones, and the CFG halves keep their own scores (the report's `share_cfg_active` says so).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from varbench.harness.core.kv_cache import CompressedKVCache, attention

from .base import Acceleration, StepPlan, check_fraction, check_int

__all__ = ["LiteVAR", "window_mask"]


def window_mask(patch_nums: tuple[int, ...], si: int, window: int, global_scales: int,
                device: torch.device) -> Tensor:
    """(n, N) bool: which keys of scales 0..si the queries of scale si see (True = visible)."""
    sizes = [pn * pn for pn in patch_nums[: si + 1]]
    n = sizes[-1]
    query = torch.arange(n, device=device).view(-1, 1)
    blocks = []
    for sj, size in enumerate(sizes):
        if sj < global_scales:
            blocks.append(torch.ones(n, size, dtype=torch.bool, device=device))
        else:
            blocks.append((query - torch.arange(size, device=device).view(1, -1)).abs() <= window)
    return torch.cat(blocks, dim=1)


class _Attend:
    """The BlockPlan of a LiteVAR step: the model's attention over the cache with a band and shared scores."""

    sublayer = None

    def __init__(self, bias: Tensor | None, share: bool):
        self.bias, self.share = bias, share

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cache) -> Tensor:
        if isinstance(cache, CompressedKVCache):  # the band (own keys only) goes in as the forward's mask
            return cache.attend(layer, q, k, v, self.bias)
        k, v = cache.update(layer, k, v)
        bias = self.bias if mask is None else (mask if self.bias is None else mask + self.bias)
        if not self.share:
            return attention(q, k, v, bias)
        b = q.shape[0] // 2  # conditional rows first; the unconditional ones reuse their scores
        scores = q[:b].float() @ k[:b].float().transpose(-1, -2)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(-1).to(v.dtype)
        return torch.cat((probs @ v[:b], probs @ v[b:]))


class LiteVAR(Acceleration):
    name = "litevar"
    defaults: ClassVar[dict[str, Any]] = {"window": 0.25, "start_scale": 3, "global_scales": 2, "share_cfg": True}
    unverified: ClassVar[tuple[str, ...]] = ("window", "global_scales")

    def check(self) -> None:
        check_fraction(self.name, "window", self.args["window"])
        check_int(self.name, "start_scale", self.args["start_scale"])
        check_int(self.name, "global_scales", self.args["global_scales"])
        if not isinstance(self.args["share_cfg"], bool):
            raise ValueError(f"acceleration 'litevar': share_cfg must be true or false, got {self.args['share_cfg']!r}")

    def plan(self, variant, state, step) -> StepPlan:
        si, acc = step.si, state.accel
        windowed = self.args["window"] > 0 and si >= self.args["start_scale"]
        evicting = isinstance(state.cache, CompressedKVCache)
        share = self.args["share_cfg"] and acc.rows == "both" and not evicting
        acc.decisions["share_cfg_active"] = share
        if not (windowed or share):
            return StepPlan(rows=acc.rows)
        bias = None
        if windowed:
            n = variant.patch_nums[si] ** 2
            window = max(1, round(self.args["window"] * n))
            # the full layout, or with an evicting policy the scale's own keys (the last n of any held set)
            layout = variant.patch_nums[si: si + 1] if evicting else variant.patch_nums
            visible = window_mask(layout, si if not evicting else 0, window,
                                  0 if evicting else self.args["global_scales"], variant.device)
            kept = acc.decisions.setdefault("attention_kept_per_scale", [1.0] * len(variant.patch_nums))
            kept[si] = round(float(visible.float().mean()), 4)
            bias = torch.zeros(visible.shape, device=variant.device).masked_fill_(~visible, -torch.inf)
        return StepPlan(rows=acc.rows, blocks=_Attend(bias, share))


def litevar(**kwargs: Any) -> LiteVAR:
    """LiteVAR (Xie et al. 2024, arXiv:2411.17178): banded attention at late scales, CFG halves share scores.

    Defaults: queries of scales >= 3 see keys of scales >= 2 within a raster band of 0.25·n (one band for every
    head: the calibrated per-head windows are unreleased; unverified); the unconditional rows reuse the
    conditional rows' attention scores at every scale. window=0 and share_cfg=false disable it."""
    return LiteVAR(**kwargs)
