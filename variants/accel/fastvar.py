"""FastVAR (Guo et al., ICCV 2025, arXiv:2503.23367): cached token pruning at the large scales.

Facts from csguoh/FastVAR@34cdd65 (Infinity/infinity/models/fastvar_utils.py, fastvar_basic.py,
infinity.py), written here without its code:
  - pivotal tokens: per sublayer, the tokens of the sublayer's input farthest (squared L2) from the map's
    spatial mean (its DC component), sorted descending; `int(n · ratio)` tokens are pruned;
  - only pivotal tokens go through the sublayer (their keys and values alone enter the KV cache); the pruned
    positions take the cached residual update of the last unpruned scale (per layer and sublayer), area-resized
    to the current map;
  - Infinity-2B at 1024 px prunes the 32x32 and 40x40 maps by 0.4 and 0.5, caches the 24x24 map, and skips the
    48x48 and 64x64 steps ("100% pruning"), in layers 3..27 of 32.

For VAR (no published setting): the last two scales are pruned by 0.4 and 0.5 (`ratios`, aligned to the last
scales), the scale before them is cached, no step is skipped (`skip_last` 0): unverified. Every layer prunes:
the static KV cache holds one token count per scale for all layers (harness/core/kv_cache.py), so Infinity's
unpruned first 3 and last 4 layers are not reproduced. A model whose cached scale was computed elsewhere (a CoDe
refiner after its prefill) runs its first pruned scale whole and caches it instead, unless the multi-scale pass
ran with `prefill_plan` (which keeps the cached scale's span of each update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from .base import Acceleration, StepPlan, area_resize, check_fraction, check_int, rows_slice

__all__ = ["FastVAR", "pivotal_tokens"]


def pivotal_tokens(x: Tensor, keep: int) -> Tensor:
    """(rows, keep) indices of the tokens of x (rows, n, C) farthest from the map's mean, farthest first."""
    distance = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(-1)
    return distance.argsort(dim=1, descending=True)[:, :keep]


class _Restore:
    """The BlockPlan of a pruned scale: each sublayer on `keep` pivotal tokens, the rest from the cache."""

    attend = None

    def __init__(self, cache: dict, keep: int, side: int, rows: slice):
        self.cache, self.keep, self.side, self.rows = cache, keep, side, rows

    def sublayer(self, layer: int, kind: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        idx = pivotal_tokens(x, self.keep)
        gather = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        update = fn(x.gather(1, gather))
        cached = self.cache[(layer, kind)]
        if cached.shape[0] != x.shape[0]:  # recorded with both CFG halves, run with one
            cached = cached[self.rows]
        full = area_resize(cached.to(update.dtype), self.side)
        return full.scatter_(1, gather, update)


class _Record:
    """The BlockPlan of the cached scale: every token, each sublayer's update kept for the pruned scales."""

    attend = None

    def __init__(self, cache: dict):
        self.cache = cache

    def sublayer(self, layer: int, kind: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        update = fn(x)
        self.cache[(layer, kind)] = update
        return update


class _RecordSpan(_Record):
    """The BlockPlan of a multi-scale pass (CoDe's refiner prefill): keeps the cached scale's token span."""

    def __init__(self, cache: dict, span: tuple[int, int]):
        super().__init__(cache)
        self.span = span

    def sublayer(self, layer: int, kind: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        update = fn(x)
        self.cache[(layer, kind)] = update[:, self.span[0]: self.span[1]]
        return update


class FastVAR(Acceleration):
    name = "fastvar"
    defaults: ClassVar[dict[str, Any]] = {"ratios": (0.4, 0.5), "skip_last": 0}
    unverified: ClassVar[tuple[str, ...]] = ("ratios", "skip_last")
    static_shapes = False  # pivotal sets change per call (counts are fixed; the engine's graphs are not kept)

    def check(self) -> None:
        ratios = self.args["ratios"]
        if isinstance(ratios, (int, float)):
            ratios = (ratios,)
        self.args["ratios"] = tuple(ratios)
        for r in self.args["ratios"]:
            check_fraction(self.name, "ratios[i]", r)
            if r == 1:
                raise ValueError("acceleration 'fastvar': a ratio of 1 prunes every token; skip the step with "
                                 "skip_last instead")
        check_int(self.name, "skip_last", self.args["skip_last"])

    def supports(self, variant) -> None:
        super().supports(variant)
        s, pruned, skipped = len(variant.patch_nums), len(self.args["ratios"]), self.args["skip_last"]
        if pruned + skipped >= s:
            raise ValueError(f"acceleration 'fastvar': {pruned} pruned + {skipped} skipped scales leave no cached "
                             f"scale among the model's {s}")

    def _layout(self, variant) -> tuple[int, dict[int, float], set[int]]:
        """(cached scale, {pruned scale: ratio}, skipped scales)."""
        s, skip = len(variant.patch_nums), self.args["skip_last"]
        first = s - skip - len(self.args["ratios"])
        return first - 1, dict(zip(range(first, s - skip), self.args["ratios"])), set(range(s - skip, s))

    def prefill_plan(self, variant, state, scale: int):
        cached_at = self._layout(variant)[0]
        if cached_at > scale:
            return None
        return _RecordSpan(state.accel.per_model.setdefault(variant.name, {}), variant.net.begin_ends[cached_at])

    def plan(self, variant, state, step) -> StepPlan:
        si, acc = step.si, state.accel
        cached_at, ratios, skipped = self._layout(variant)
        if si in skipped:
            return StepPlan(skip=True, rows=acc.rows)
        cache = acc.per_model.setdefault(variant.name, {})
        n, pn = variant.patch_nums[si] ** 2, variant.patch_nums[si]
        ratio = ratios.get(si, 0.0)
        keep = n - int(n * ratio)
        if si == cached_at or (ratio > 0 and not cache):  # nothing cached yet: this scale runs whole and is cached
            return StepPlan(rows=acc.rows, blocks=_Record(cache))
        if keep == n:
            return StepPlan(rows=acc.rows)
        acc.tokens_per_scale[si] = keep
        return StepPlan(rows=acc.rows, blocks=_Restore(cache, keep, pn, rows_slice(acc.rows, acc.batch)))


def fastvar(**kwargs: Any) -> FastVAR:
    """FastVAR (Guo et al. 2025, arXiv:2503.23367): cached token pruning at the largest scales.

    Defaults for VAR (unverified; the paper's code is Infinity's): the last two scales keep 60% / 50% of their
    tokens (ratios 0.4, 0.5), the scale before them is cached, no step skipped (Infinity skips its last two).
    ratios=[] disables it."""
    return FastVAR(**kwargs)
