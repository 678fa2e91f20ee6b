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
VAR's static KV cache holds one token count per scale for all layers (harness/core/kv_cache.py), so the
`which_layers` range of Infinity is refused there. A model whose cached scale was computed elsewhere (a CoDe
refiner after its prefill) runs its first pruned scale whole and caches it instead, unless the multi-scale pass
ran with `prefill_plan` (which keeps the cached scale's span of each update).

On Infinity (`accel_family` "infinity") the official settings are the defaults: `ratios` (0.4, 0.5) on the two
scales after the cached one, `skip_last` 2, `which_layers` (3, 28) (blocks 3..27 prune, the others compute every token
and keep every key), all by position from the end, which on the 1M 1:1 schedule (13 scales) is exactly the
official 24 / 32, 40 / 48, 64 by side. The official code restores the 2-D RoPE of a kept token from its own
position (fastvar_basic.py `apply_rotary_emb_fastvar` gathers the angles by the pivotal indices): so does
Infinity here (the plan's `index`, read by the model's attention). Pruned and unpruned blocks then write different
token counts to the KV cache, which the static cache cannot hold: Infinity concatenates under FastVAR (as the
official code does) whenever `ragged_cache` says so. Unverified on Infinity: the layer range on other depths
(the official range is fixed for the 2B's 32 blocks) and the settings on non-square schedules (the official code
names the sides 24, 32, 40, 48, 64 of the 1:1 one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from .base import Acceleration, StepPlan, area_resize, check_fraction, check_int, grid_of, rows_slice

__all__ = ["FastVAR", "pivotal_tokens"]


def pivotal_tokens(x: Tensor, keep: int) -> Tensor:
    """(rows, keep) indices of the tokens of x (rows, n, C) farthest from the map's mean, farthest first."""
    distance = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(-1)
    return distance.argsort(dim=1, descending=True)[:, :keep]


class _Restore:
    """The BlockPlan of a pruned scale: in `which_layers`, each sublayer on `keep` pivotal tokens, the rest from the
    cache; other layers compute every token. `index` holds the (rows, keep) positions of the tokens the running
    sublayer computes (None: all), for a model whose attention needs them (Infinity's RoPE)."""

    attend = None

    def __init__(self, cache: dict, keep: int, side: int | tuple[int, int], rows: slice, layers: range | None = None):
        self.cache, self.keep, self.side, self.rows, self.layers = cache, keep, side, rows, layers
        self.index: Tensor | None = None

    def sublayer(self, layer: int, kind: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.layers is not None and layer not in self.layers:
            return fn(x)
        idx = pivotal_tokens(x, self.keep)
        gather = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        self.index = idx
        try:
            update = fn(x.gather(1, gather))
        finally:
            self.index = None
        cached = self.cache[(layer, kind)]
        if cached.shape[0] != x.shape[0]:  # recorded with both CFG halves, run with one
            cached = cached[self.rows]
        full = area_resize(cached.to(update.dtype), self.side, self.cache.get("grid"))  # grid None: square
        return full.scatter_(1, gather, update)


class _Record:
    """The BlockPlan of the cached scale: every token, each sublayer's update kept (in `which_layers`) for the pruned
    scales."""

    attend = None
    index = None

    def __init__(self, cache: dict, layers: range | None = None):
        self.cache, self.layers = cache, layers

    def sublayer(self, layer: int, kind: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        update = fn(x)
        if self.layers is None or layer in self.layers:
            self.cache[(layer, kind)] = update
        return update


class _RecordSpan(_Record):
    """The BlockPlan of a multi-scale pass (CoDe's refiner prefill): keeps the cached scale's token span."""

    def __init__(self, cache: dict, span: tuple[int, int], grid: tuple[int, int]):
        super().__init__(cache)
        self.span = span
        cache["grid"] = grid

    def sublayer(self, layer: int, kind: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        update = fn(x)
        self.cache[(layer, kind)] = update[:, self.span[0]: self.span[1]]
        return update


class FastVAR(Acceleration):
    name = "fastvar"
    defaults: ClassVar[dict[str, Any]] = {"ratios": (0.4, 0.5), "skip_last": 0}  # + which_layers on Infinity
    unverified: ClassVar[tuple[str, ...]] = ("ratios", "skip_last")
    static_shapes = False  # pivotal sets change per call (counts are fixed; the engine's graphs are not kept)
    families = ("var", "infinity")
    family_defaults: ClassVar[dict[str, dict[str, Any]]] = {"infinity": {"skip_last": 2, "which_layers": (3, 28)}}
    family_unverified: ClassVar[dict[str, tuple[str, ...]]] = {"infinity": ()}

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
        layers = self.args.get("which_layers")
        if layers is not None:
            ok = isinstance(layers, (list, tuple)) and len(layers) == 2
            if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in layers) \
                    or layers[0] > layers[1]:
                raise ValueError(f"acceleration 'fastvar': which_layers must be None (every block) or [start, "
                                 f"stop) block indices with 0 <= start <= stop, got {layers!r}")
            self.args["which_layers"] = tuple(layers)

    def _layers(self, variant) -> range:
        """The blocks that prune (the others compute every token at every scale)."""
        depth = variant.cfg.depth
        layers = self.args.get("which_layers")
        return range(depth) if layers is None else range(min(layers[0], depth), min(layers[1], depth))

    def ragged_cache(self, variant) -> bool:
        pruned = len(self._layers(variant))
        return 0 < pruned < variant.cfg.depth and any(r > 0 for r in self.args["ratios"])

    def supports(self, variant) -> None:
        super().supports(variant)
        if self.ragged_cache(variant) and not hasattr(variant, "schedule"):
            raise ValueError("acceleration 'fastvar': on VAR every block prunes (which_layers=None): its static KV "
                             "cache holds one token count per scale for all blocks")
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
        return _RecordSpan(state.accel.per_model.setdefault(variant.name, {}), variant.net.begin_ends[cached_at],
                           grid_of(variant, cached_at))

    def plan(self, variant, state, step) -> StepPlan:
        si, acc = step.si, state.accel
        cached_at, ratios, skipped = self._layout(variant)
        if si in skipped:
            return StepPlan(skip=True, rows=acc.rows)
        cache = acc.per_model.setdefault(variant.name, {})
        grid = grid_of(variant, si)
        n = grid[0] * grid[1]
        ratio = ratios.get(si, 0.0)
        keep = n - int(n * ratio)
        layers = self._layers(variant)
        if si == cached_at or (ratio > 0 and not cache):  # nothing cached yet: this scale runs whole and is cached
            cache["grid"] = grid
            return StepPlan(rows=acc.rows, blocks=_Record(cache, layers))
        if keep == n or not layers:
            return StepPlan(rows=acc.rows)
        acc.tokens_per_scale[si] = keep  # per pruning block (the blocks outside `which_layers` compute all n)
        return StepPlan(rows=acc.rows, blocks=_Restore(cache, keep, grid, rows_slice(acc.rows, acc.batch), layers))


def fastvar(**kwargs: Any) -> FastVAR:
    """FastVAR (Guo et al. 2025, arXiv:2503.23367): cached token pruning at the largest scales.

    Defaults for VAR (unverified; the paper's code is Infinity's): the last two scales keep 60% / 50% of their
    tokens (ratios 0.4, 0.5), the scale before them is cached, no step skipped (Infinity skips its last two).
    On Infinity the defaults are the official code's: ratios 0.4, 0.5 after the cached scale, the last 2 scales
    skipped, blocks 3..27 pruning (which_layers=[3, 28]). ratios=[] with skip_last=0 disables it."""
    return FastVAR(**kwargs)
