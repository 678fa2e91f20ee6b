"""KV-cache policies: which cached keys and values a KV-cached variant keeps for later scales.

Registered: `full` (keep everything), the LLM baselines as ScaleKV and HACK applied them to next-scale models
(docs/VARIANTS.md §5): `streaming` (StreamingLLM, arXiv:2309.17453; sink_tokens 4), `h2o` (arXiv:2306.14048;
recent_ratio 0.5), `snapkv` (arXiv:2404.14469; window 32, kernel 5, avgpool), `pyramidkv` (arXiv:2406.02069;
the same and beta 20); and the VAR-specific `scalekv` (arXiv:2505.19602, variants/kv_scalekv.py) and `hack`
(arXiv:2504.09261, variants/kv_hack.py). Every budget defaults to 0.1. The baselines' defaults are their papers'
or official code's; neither ScaleKV nor HACK publish the settings they ran them with on next-scale models.
Build one with `KV_POLICIES.get(name)(**args)` and give it to `build_var(kv_policy=...)`; see
variants/kv_base.py for budgets and the API.

In VAR a "decode step" is a whole scale: the cache grows by pn² tokens per step and every policy evicts after
the scale's attention, with the scale's queries as its observation. "Recent" means the last tokens in
generation order (the latest scale, raster order). Scores are the model's attention probabilities: softmax of
the l2-normalised q·k times the learned per-head scale (VAR_SPEC), computed apart because SDPA does not
return them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from varbench.harness.core.kv_cache import GroupPlan, KVView
from varbench.harness.core.registry import register_kv_policy

from .kv_base import KVPolicy, attention_probs, chunked_rows, pool_scores, top_keep

__all__ = ["FullKV", "StreamingKV", "H2OKV", "SnapKV", "PyramidKV", "full", "streaming", "h2o", "snapkv",
           "pyramidkv"]


@dataclass(frozen=True)
class FullKV:
    """Keeps every entry: the cache grows by each scale's tokens (VAR's own behaviour)."""

    name: str = "full"
    unverified: tuple[str, ...] = ()
    compresses: bool = False
    args: ClassVar[dict[str, Any]] = {}

    def prepare(self, variant) -> None:
        """Nothing to calibrate."""

    def record(self) -> dict[str, Any]:
        return {"kv_policy": self.name, "kv_args": {}, "kv_unverified": [], "kv_calibration": None}


class StreamingKV(KVPolicy):
    """StreamingLLM: the first `sink_tokens` (attention sinks) and the most recent entries."""

    name = "streaming"
    defaults: ClassVar[dict[str, Any]] = {"budget": 0.1, "sink_tokens": 4}

    def check(self) -> None:
        if not isinstance(self.args["sink_tokens"], int) or self.args["sink_tokens"] < 0:
            raise ValueError(f"KV policy 'streaming': sink_tokens must be an int >= 0, got {self.args['sink_tokens']!r}")

    def select(self, view: KVView, n_keep: int) -> Tensor:
        # Slots stay in position order, so the sinks are the first slots and the recent entries the last.
        sink = min(self.args["sink_tokens"], n_keep)
        dev = view.k.device
        idx = torch.cat((torch.arange(sink, device=dev), torch.arange(view.N - (n_keep - sink), view.N, device=dev)))
        return idx.expand(*view.k.shape[:2], n_keep)


class H2OKV(KVPolicy):
    """H2O: heavy hitters by attention accumulated over every query so far, plus a recent window."""

    name = "h2o"
    defaults: ClassVar[dict[str, Any]] = {"budget": 0.1, "recent_ratio": 0.5}
    state: ClassVar[tuple[str, ...]] = ("acc",)

    def check(self) -> None:
        if not 0.0 <= self.args["recent_ratio"] <= 1.0:
            raise ValueError(f"KV policy 'h2o': recent_ratio must be in [0, 1], got {self.args['recent_ratio']!r}")

    def observe(self, view: KVView) -> None:
        acc = view.state["acc"]
        for rows in chunked_rows(view.q, view.N):
            acc += attention_probs(view.q[:, :, rows], view.k, view.mask_rows(rows)).sum(-2)

    def select(self, view: KVView, n_keep: int) -> Tensor:
        recent = min(n_keep, round(self.args["recent_ratio"] * n_keep))
        protect = torch.arange(view.N, device=view.k.device) >= view.N - recent
        return top_keep(view.state["acc"], n_keep, protect)


class SnapKV(KVPolicy):
    """SnapKV: the last `window` queries vote (summed softmax attention, pooled along keys) for the earlier
    keys; the window's own keys are always kept."""

    name = "snapkv"
    defaults: ClassVar[dict[str, Any]] = {"budget": 0.1, "window": 32, "kernel": 5, "pooling": "avgpool"}

    def check(self) -> None:
        self._choice("pooling", ("avgpool", "maxpool"))
        if self.args["kernel"] < 1 or self.args["kernel"] % 2 == 0:
            raise ValueError(f"KV policy {self.name!r}: kernel must be odd, got {self.args['kernel']!r}")
        if self.args["window"] < 1:
            raise ValueError(f"KV policy {self.name!r}: window must be >= 1, got {self.args['window']!r}")

    def groups(self, variant, budget: int, ends: list[int]) -> list[list[GroupPlan]]:
        self.require_budget(budget, ends[-1], self.args["window"], "the observation window", "window", budget)
        return super().groups(variant, budget, ends)

    def select(self, view: KVView, n_keep: int) -> Tensor:
        n, total = view.n, view.N
        w = min(self.args["window"], n, n_keep)
        rows = slice(n - w, n)
        votes = attention_probs(view.q[:, :, rows], view.k, view.mask_rows(rows))[..., : total - w].sum(-2)
        pooled = pool_scores(votes, self.args["kernel"], self.args["pooling"])
        scores = torch.cat((pooled, pooled.new_full((*pooled.shape[:2], w), float("inf"))), dim=-1)
        return top_keep(scores, n_keep)


class PyramidKV(SnapKV):
    """PyramidKV: SnapKV's selection with per-layer budgets falling linearly with depth at a fixed total."""

    name = "pyramidkv"
    defaults: ClassVar[dict[str, Any]] = {"budget": 0.1, "window": 32, "kernel": 5, "pooling": "avgpool", "beta": 20}

    def check(self) -> None:
        super().check()
        if self.args["beta"] < 1:
            raise ValueError(f"KV policy 'pyramidkv': beta must be >= 1, got {self.args['beta']!r}")

    def groups(self, variant, budget: int, ends: list[int]) -> list[list[GroupPlan]]:
        super().groups(variant, budget, ends)  # checks the window
        depth, w = variant.cfg.depth, self.args["window"]
        prefix = budget - w  # average budget beyond the window
        per_layer = [[] for _ in range(depth)]
        for end in ends:
            low = prefix // self.args["beta"]
            high = 2 * prefix - low
            if high >= end - w:  # a short cache: PyramidKV caps the top layer at what there is
                high = max(end - w, prefix)
                low = 2 * prefix - high
            for layer in range(depth):
                # Exact linear interpolation keeps the layers' sum at depth × budget (the code's floored
                # integer step overshoots it by up to (depth - 1) / 2 tokens per layer).
                t = layer / (depth - 1) if depth > 1 else 0.5
                per_layer[layer].append(w + round(high - t * (high - low)))
        return [[GroupPlan(None, tuple(b))] for b in per_layer]


@register_kv_policy
def full(**kwargs: Any) -> FullKV:
    """Full KV cache, no compression (Tian et al. 2024, arXiv:2404.02905): the baseline policy."""
    if kwargs:
        raise ValueError(f"KV policy 'full' has no argument(s) {', '.join(map(repr, sorted(kwargs)))}; valid: (none)")
    return FullKV()


@register_kv_policy
def streaming(**kwargs: Any) -> StreamingKV:
    """StreamingLLM (Xiao et al. 2023, arXiv:2309.17453): attention sinks + recent window.

    Defaults: budget 0.1 (ScaleKV's released budget), sink_tokens 4 (the paper's setting; ScaleKV and HACK do
    not publish theirs for next-scale models, here 4 covers the SOS and three tokens of scale 1).
    sink_tokens=0 is ScaleKV's "sliding window" baseline.
    """
    return StreamingKV(**kwargs)


@register_kv_policy
def h2o(**kwargs: Any) -> H2OKV:
    """H2O heavy hitters (Zhang et al. 2023, arXiv:2306.14048): accumulated attention + recent window.

    Defaults: budget 0.1, recent_ratio 0.5 (the paper's equal heavy/recent split). Accumulates the softmax
    attention of every query of every scale (both CFG halves, each row on its own).
    """
    return H2OKV(**kwargs)


@register_kv_policy
def snapkv(**kwargs: Any) -> SnapKV:
    """SnapKV (Li et al. 2024, arXiv:2404.14469): observation-window voting with pooling.

    Defaults from the official code (FasterDecoding/SnapKV init_snapkv): window 32, kernel 5, avgpool; budget
    0.1. In VAR the window is the last 32 tokens of the scale just generated (no causal mask inside a scale).
    """
    return SnapKV(**kwargs)


@register_kv_policy
def pyramidkv(**kwargs: Any) -> PyramidKV:
    """PyramidKV (Cai et al. 2024, arXiv:2406.02069): SnapKV selection, layer budgets decreasing with depth.

    Defaults from the official code (Zefan-Cai/PyramidKV init_pyramidkv): window 32, kernel 5, avgpool, beta 20
    (bottom layer budget = (budget - window) / beta); budget 0.1. The code's short-prompt cap uses the length a
    full cache would have after the scale.
    """
    return PyramidKV(**kwargs)


from . import kv_hack, kv_scalekv  # noqa: E402,F401  (registers scalekv and hack)
