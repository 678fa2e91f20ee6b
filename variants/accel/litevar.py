"""LiteVAR (Xie et al. 2024, arXiv:2411.17178): multi-diagonal windowed attention (MDWA) at late scales and
attention sharing across CFG (ASC). Its mixed-precision quantization is out of scope here.

Matches EkaterinaXie/LiteVAR@176ee6a models/mask_for_inference.py `mask_inference` (modes 1 and 2 of
models/basic_var.py) and the mask templates of models/ban_mini_token.py; written from reading them, checked
token-exact against that code by `varbench conformance ../shared/conformance/litevar_d2` (fixture made by
results/conformance/make_litevar_fixture.py). What the official inference does, and so this module:
  - queries of scales 3..9 multiply their pre-softmax scores with a 0/1 mask over the last few key scales: their
    own scale and the coarser ones down to scale 2 (query scales 3, 4) or scale 3 (query scales 5..9); the
    earlier scales stay whole (`global_scales`, default (2, 2, 3): per query scale from `start_scale` on, the
    last entry repeating). Masked-out keys keep score 0 (not -inf): they stay in the softmax with weight exp(0);
  - each mask is a band along the scaled diagonal, |i·n_k/n_q - j| < w (i: query index in its scale of n_q tokens,
    j: key index in a key scale of n_k tokens; the own scale's is |i - j| < w);
  - "global CFG" (mode 2) gives the unconditional rows the conditional rows' scores at every scale, so each half
    applies one attention map to its own values (`share_cfg`). The official code writes it `attn[-8:] = attn[:8]`,
    i.e. for batch 8 only; here it holds for any batch (conditional rows first).

Differences, unverified: the official widths w are calibrated per layer, head and scale pair (ban_mini_token.py:
the smallest template keeping a `--threshold` share of the attention mass, 0.95 by default, 0.80-0.90 in
get_mask.sh; an all-zero mask where a key scale holds a small share of it (under 5-20%), all-ones where no
template suffices) and were never released, so one rule serves every layer and head: w = max(1, round(`window`·n_k)),
window 0.25. With a KV policy that evicts keys (no official counterpart; the keys' positions are then unknown) the
band covers the scale's own keys only, |i - j| <= round(window·n), excludes the keys outside it (-inf: the cache's
attention takes an additive mask), the policy decides the coarser keys, and the CFG halves keep their own scores
(the report's `share_cfg_active` says so).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from varbench.harness.core.kv_cache import CompressedKVCache, attention

from .base import Acceleration, StepPlan, check_fraction, check_int

__all__ = ["LiteVAR", "band", "window_mask"]


def band(n_q: int, n_k: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """(n_q, n_k) bool: the official template |i·n_k/n_q - j| < width (the same float32 division as
    ban_mini_token.py, so the band's edges round identically)."""
    i, j = torch.meshgrid(torch.arange(n_q, device=device), torch.arange(n_k, device=device), indexing="ij")
    return torch.abs(i * n_k / n_q - j) < width


def window_mask(patch_nums: tuple[int, ...], si: int, window: float, global_scales: int,
                device: torch.device | str = "cpu") -> Tensor:
    """(n, N) bool over the keys of scales 0..si: True where the query's score is computed, False where the
    official code sets it to 0. Scales below `global_scales` stay whole; key scale sj gets the band of width
    max(1, round(window · pn_sj²))."""
    n = patch_nums[si] ** 2
    blocks = []
    for sj, pn in enumerate(patch_nums[: si + 1]):
        n_k = pn * pn
        if sj < global_scales:
            blocks.append(torch.ones(n, n_k, dtype=torch.bool, device=device))
        else:
            blocks.append(band(n, n_k, max(1, round(window * n_k)), device))
    return torch.cat(blocks, dim=1)


def _own_keys_band(n: int, window: float, device: torch.device) -> Tensor:
    """Under an evicting policy: (n, n) additive mask, 0 within |i - j| <= round(window·n), -inf outside."""
    idx = torch.arange(n, device=device)
    inside = (idx.view(-1, 1) - idx.view(1, -1)).abs() <= max(1, round(window * n))
    return torch.zeros(n, n, device=device).masked_fill_(~inside, -torch.inf)


def _mask_scores(scores: Tensor, visible: Tensor) -> Tensor:
    """The official score * mask: masked keys get score 0 and so keep weight exp(0) in the softmax."""
    return scores.where(visible, 0.0)


class _Attend:
    """The BlockPlan of a LiteVAR step: attention over the cache with masked scores and/or shared scores.

    `visible`: (n, N) bool, scores outside it become 0 (the official multiplication by the 0/1 mask); `bias`:
    an additive mask (the evicting-policy band); `share`: the unconditional rows reuse the conditional scores."""

    sublayer = None

    def __init__(self, bias: Tensor | None, share: bool, visible: Tensor | None = None):
        self.bias, self.share, self.visible = bias, share, visible

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cache) -> Tensor:
        if isinstance(cache, CompressedKVCache):  # the band (own keys only) goes in as the forward's mask
            return cache.attend(layer, q, k, v, self.bias)
        k, v = cache.update(layer, k, v)
        if not self.share and self.visible is None:
            return attention(q, k, v, mask)
        b = q.shape[0] // 2 if self.share else q.shape[0]  # conditional rows first; shared: only they are scored
        scores = q[:b].float() @ k[:b].float().transpose(-1, -2)  # (b, H, n, N)
        if self.visible is not None:
            scores = _mask_scores(scores, self.visible)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(-1).to(v.dtype)
        return torch.cat((probs @ v[:b], probs @ v[b:])) if self.share else probs @ v


class LiteVAR(Acceleration):
    name = "litevar"
    defaults: ClassVar[dict[str, Any]] = {"window": 0.25, "start_scale": 3, "global_scales": (2, 2, 3),
                                          "share_cfg": True}
    unverified: ClassVar[tuple[str, ...]] = ("window",)

    def check(self) -> None:
        check_fraction(self.name, "window", self.args["window"])
        check_int(self.name, "start_scale", self.args["start_scale"])
        whole = self.args["global_scales"]
        self.args["global_scales"] = whole = (whole,) if isinstance(whole, int) else tuple(whole)
        if not whole:
            raise ValueError("acceleration 'litevar': global_scales must be an integer or a non-empty list")
        for g in whole:
            check_int(self.name, "global_scales[i]", g)
        if not isinstance(self.args["share_cfg"], bool):
            raise ValueError(f"acceleration 'litevar': share_cfg must be true or false, got {self.args['share_cfg']!r}")

    def global_scales(self, si: int) -> int:
        """How many of the coarsest key scales query scale si (>= start_scale) sees whole."""
        whole = self.args["global_scales"]
        return whole[min(si - self.args["start_scale"], len(whole) - 1)]

    def plan(self, variant, state, step) -> StepPlan:
        si, acc = step.si, state.accel
        windowed = self.args["window"] > 0 and si >= self.args["start_scale"]
        evicting = isinstance(state.cache, CompressedKVCache)
        share = self.args["share_cfg"] and acc.rows == "both" and not evicting
        acc.decisions["share_cfg_active"] = share
        if not (windowed or share):
            return StepPlan(rows=acc.rows)
        bias = visible = None
        if windowed:
            kept = acc.decisions.setdefault("attention_kept_per_scale", [1.0] * len(variant.patch_nums))
            if evicting:
                bias = _own_keys_band(variant.patch_nums[si] ** 2, self.args["window"], variant.device)
                kept[si] = round(float(bias.isfinite().float().mean()), 4)
            else:
                visible = window_mask(variant.patch_nums, si, self.args["window"], self.global_scales(si),
                                      variant.device)
                kept[si] = round(float(visible.float().mean()), 4)
        return StepPlan(rows=acc.rows, blocks=_Attend(bias, share, visible))


def litevar(**kwargs: Any) -> LiteVAR:
    """LiteVAR (Xie et al. 2024, arXiv:2411.17178): banded attention at late scales, CFG halves share scores.

    Defaults (official code EkaterinaXie/LiteVAR@176ee6a unless marked): queries of scales >= 3 see the keys of
    scales 0-1 (query scales 3, 4) or 0-2 (later) whole; in the other key scales the scores outside the band
    |i·n_k/n_q - j| < w become 0; w = max(1, round(0.25·n_k)) for every layer and head (the calibrated per-head
    widths are unreleased; unverified); the unconditional rows reuse the conditional rows' scores at every scale.
    window=0 and share_cfg=false disable it."""
    return LiteVAR(**kwargs)
