"""HACK, head-aware KV cache compression (Qin, Lv, Lin, Guo, Zhang, Zou, Lin; arXiv:2504.09261), on VAR.

Written from docs/VARIANTS.md §3, which has the paper's abstract and two secondary notes; the official code
(Zr2223/HACK) could not be read here, so every setting below is unverified. Offline, heads are typed by the
summed column-wise variance of their attention at the last scale: the fraction `alpha` with the lowest variance
are contextual heads (vertical stripes: every query looks at the same few keys), the rest structural
(diagonals: each query looks at its spatial counterpart in earlier scales). Budgets are asymmetric,
budget = alpha·B_C + (1 − alpha)·B_S with B_C = contextual_ratio·B_S, and retention is pattern-specific:
- contextual heads keep the top-B_C keys by the attention of `observe` queries spread evenly over the current
  scale;
- structural heads always keep the first `init_scales` scales, then the most recent scale (by the same
  importance when it does not fit), then the most important keys of the scales between.
Heads of one type in a layer form one cache group (HACK reorders heads by type for grouped attention), so
each group keeps equal counts and needs no padding mask; layers with both types hold two buffers.

On Infinity (square schedules) the same: calibrated through the loop on the model's first min(10, prompts)
prompts, the variance over both CFG halves' rows.

Unverified (not published or code unavailable): alpha 0.5, contextual_ratio 0.25 (B_C ≪ B_S; HACK reports
contextual heads surviving 90% compression and structural ones degrading beyond 50%), init_scales 2 and
observe 32 (from the notes), 10 calibration labels (the notes: ~50 samples, stable from one). The LOOK-M-style
merge of evicted entries at the final step is not implemented (its formula is not available).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from varbench.harness.core.kv_cache import GroupPlan, KVView
from varbench.harness.core.registry import register_kv_policy

from .kv_base import KVPolicy, attention_probs, chunked_rows, geometry, top_keep, uniform_rows

__all__ = ["HACK", "hack"]

STRUCTURAL, CONTEXTUAL = "structural", "contextual"


class HACK(KVPolicy):
    """Structural vs contextual heads, asymmetric budgets, pattern-specific retention."""

    name = "hack"
    defaults: ClassVar[dict[str, Any]] = {"budget": 0.1, "alpha": 0.5, "contextual_ratio": 0.25, "init_scales": 2,
                                          "observe": 32, "calibration": None}
    unverified: ClassVar[tuple[str, ...]] = ("alpha", "contextual_ratio", "init_scales", "observe",
                                             "calibration_labels")
    needs_calibration = True

    def check(self) -> None:
        a = self.args
        if not 0.0 <= a["alpha"] <= 1.0 or not 0.0 < a["contextual_ratio"] <= 1.0:
            raise ValueError(f"KV policy 'hack': alpha must be in [0, 1] and contextual_ratio in (0, 1], got "
                             f"{a['alpha']!r}, {a['contextual_ratio']!r}")
        if a["init_scales"] < 0 or a["observe"] < 1:
            raise ValueError("KV policy 'hack': init_scales must be >= 0 and observe >= 1")

    # -- offline: head typing ----------------------------------------------------------------------
    def calibration_stats(self, variant) -> _VarianceStats:
        g = geometry(variant)
        return _VarianceStats(g.depth, g.heads, len(g.patch_nums) - 1)

    def head_types(self, variant) -> list[list[str]]:
        """Per layer and head, the type: the alpha fraction of heads with the lowest variance is contextual."""
        sigma = torch.tensor(self.calibration_for(variant)["sigma"])
        depth, heads = sigma.shape
        n_ctx = round(self.args["alpha"] * depth * heads)
        order = sorted(range(depth * heads), key=lambda i: (float(sigma.view(-1)[i]), i))
        ctx = set(order[:n_ctx])
        return [[CONTEXTUAL if layer * heads + h in ctx else STRUCTURAL for h in range(heads)]
                for layer in range(depth)]

    def split(self, budget: int) -> tuple[int, int]:
        """(B_C, B_S): alpha·B_C + (1 − alpha)·B_S <= budget with B_C = contextual_ratio·B_S."""
        alpha, ratio = self.args["alpha"], self.args["contextual_ratio"]
        if alpha in (0.0, 1.0):  # one head type: it has the whole budget
            return budget, budget
        b_c = int(budget / (alpha + (1 - alpha) / ratio))
        return max(1, b_c), int((budget - alpha * b_c) / (1 - alpha))

    def groups(self, variant, budget: int, ends: list[int]) -> list[list[GroupPlan]]:
        b_c, b_s = self.split(budget)
        n_init = ends[self.args["init_scales"] - 1] if self.args["init_scales"] else 0
        if b_s < n_init:
            raise ValueError(f"KV policy 'hack': the structural budget ({b_s} tokens) is smaller than the "
                             f"{self.args['init_scales']} protected first scales ({n_init} tokens)")
        out = []
        for types in self.head_types(variant):
            layer = []
            for kind, b in ((STRUCTURAL, b_s), (CONTEXTUAL, b_c)):
                heads = tuple(h for h, t in enumerate(types) if t == kind)
                if heads:
                    layer.append(GroupPlan(None if len(heads) == len(types) else heads, (b,) * len(ends), kind))
            out.append(layer)
        return out

    # -- online: selection -------------------------------------------------------------------------
    def importance(self, view: KVView) -> Tensor:
        """(B, Hg, N) attention of `observe` queries spread evenly over the current scale, summed."""
        lo, hi = view.scale_slots
        off = view.n - view.N  # query row of a slot of this forward
        rows = uniform_rows(lo + off, hi + off, self.args["observe"], view.k.device)
        return attention_probs(view.q[:, :, rows], view.k, view.mask_rows(rows)).sum(-2)

    def select(self, view: KVView, n_keep: int) -> Tensor:
        imp = self.importance(view)
        if view.kind == CONTEXTUAL:
            return top_keep(imp, n_keep)
        lo, _ = view.scale_slots
        slots = torch.arange(view.N, device=view.k.device)
        # The recent scale outranks every intermediate key (importance sums at most `observe` rows of 1).
        scores = imp + (slots >= lo).float() * (self.args["observe"] + 1)
        # Kept slots stay in position order, so the first scales, always kept, are the first slots.
        n_init = sum(pn * pn for pn in view.patch_nums[: self.args["init_scales"]])
        return top_keep(scores, n_keep, slots < min(n_init, n_keep))


class _VarianceStats:
    """Per (layer, head) at the last scale: the column-wise variance of the attention matrix (over queries),
    summed over keys, averaged over the batch rows (both CFG halves)."""

    def __init__(self, depth: int, heads: int, last: int):
        self.last = last
        self.sigma = torch.zeros(depth, heads, dtype=torch.float64)

    def observe(self, view: KVView) -> None:
        if view.si != self.last:
            return
        s1 = s2 = 0
        for rows in chunked_rows(view.q, view.N):
            p = attention_probs(view.q[:, :, rows], view.k).double()
            s1, s2 = s1 + p.sum(-2), s2 + (p * p).sum(-2)
        n = view.n
        var = (s2 / n - (s1 / n) ** 2).sum(-1)  # (B, H)
        self.sigma[view.layer] = var.mean(0).cpu()

    def result(self) -> dict:
        return {"sigma": self.sigma.tolist()}


@register_kv_policy
def hack(**kwargs: Any) -> HACK:
    """HACK (Qin et al. 2025, arXiv:2504.09261): structural vs contextual heads, asymmetric budgets.

    Defaults (all unverified, code unavailable; see the module docstring): budget 0.1, alpha 0.5 (contextual
    fraction), contextual_ratio 0.25 (B_C / B_S), init_scales 2, observe 32, 10 calibration labels.
    Calibrates itself on first use with a model unless given calibration=PATH (policy.save_calibration).
    """
    return HACK(**kwargs)
