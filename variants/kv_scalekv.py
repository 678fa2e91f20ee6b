"""ScaleKV, scale-aware KV cache (Li, Chen, Yang, Hwang; NeurIPS 2025; arXiv:2505.19602), ported to VAR.

Written from docs/VARIANTS.md §2 and a reading of StargazerX0/ScaleKV@eb0615a (scale_kv.py,
enable_scale_kv_2b.py); nothing copied. Offline, layers are typed per scale from their Attention Selectivity
Index (ASI): drafters (diffuse over the history, low ASI) get large budgets, refiners (focused on the current
map or very selective on the history) small ones, at a fixed total per scale. Online, after each scale's
attention, every layer keeps a 4×4 grid of centre tokens of the current map (the observation window) and the
top keys by the window's scores, pooled along keys.

Scoring (`scoring`), where the official code and the paper differ (VARIANTS §2.1 step 8):
- "code": pre-softmax logits of the window's queries summed over the window, max-pooled (kernel 5); the query
  is the raw projection (no bias, no l2 norm, no learned scale) against the cached normalised keys, scaled by
  1/√d, as scale_kv.py does.
- "paper": softmax attention (the model's own logits) summed over the window, average-pooled.
Allocation (`allocation`):
- "code": what the released budget JSONs encode: drafters keep up to everything a full cache would hold,
  refiners share the rest equally, Min = (B·L − N_d·Max) / (L − N_d).
- "paper": refiner budget decays linearly over the compressed scales, B_r = B·(refiner_start − refiner_decay·j),
  drafters share the rest (the paper's Infinity-2B ablation: B_r(0) = 600 of 650, δ = 70 per scale).

Selection (`selection`): "ours" (default) is the above; "official" is the released `update_kv` as written
(variants/kv_scalekv_official.py: the scores of "code", top-(capacity − window) of the non-window keys plus the
window, capacities below the window raised to it). Either takes `budgets=PATH`, a budgets JSON in the released
format ("Scale N" -> "Block i" flags, "Max", "Min"), in place of the calibrated allocation, and `gate`: no
compression until a full cache would exceed it (ScaleKV's base capacity). The gate defaults to 650 with a budgets
file (the released scripts' value, for Infinity-2B/8B at 1M), else to the budget in tokens (unverified elsewhere).
On Infinity both CFG halves are compressed independently, as in the released code (per batch row and head).

Unverified for VAR (the paper reports Infinity only and the calibration script is not released): `drafters`
(the fraction of (layer, scale) pairs typed as drafters: 0.0625, between the released 2B JSON's 9/160 and 8B's
15/200), `history_topk` (K′ of the history top-K′ ratio, not stated: here 10% of the history), `combiner`
(product, the literal reading of the extracted text), `refiner_start`/`refiner_decay` (the 2B ablation's
600/650 and 70/650), `allocation` and the calibration labels (10 classes instead of 10 prompts).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from varbench.harness.core.kv_cache import GroupPlan, KVPlan, KVView
from varbench.harness.core.registry import register_kv_policy

from .kv_base import KVPolicy, attention_probs, chunked_rows, geometry, grid_centres, pool_scores, top_keep
from .kv_scalekv_official import RELEASED_GATE, budget_entry, official_keep, official_window, read_budgets

__all__ = ["ScaleKV", "scalekv"]


class ScaleKV(KVPolicy):
    """Drafter/refiner layers per scale, per-scale budgets, grid-centre observation window, pooled scores."""

    name = "scalekv"
    defaults: ClassVar[dict[str, Any]] = {
        "budget": 0.1, "scoring": "code", "allocation": "code", "window": 16, "kernel": 5, "drafters": 0.0625,
        "history_topk": 0.1, "combiner": "product", "refiner_start": 0.92, "refiner_decay": 0.108,
        "calibration": None, "selection": "ours", "budgets": None, "gate": None}
    unverified: ClassVar[tuple[str, ...]] = ("drafters", "history_topk", "combiner", "allocation", "refiner_start",
                                             "refiner_decay", "calibration_labels")
    needs_calibration = True

    def check(self) -> None:
        self._choice("selection", ("ours", "official"))
        if self.args["selection"] == "official" and self.args["scoring"] != "code":
            raise ValueError("KV policy 'scalekv': selection 'official' scores as the released code; leave scoring "
                             f"at 'code' (got {self.args['scoring']!r})")
        gate = self.args["gate"]
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, int) or gate < 0):
            raise ValueError(f"KV policy 'scalekv': gate must be a token count >= 0 or None, got {gate!r}")
        self.budget_table = read_budgets(self.args["budgets"]) if self.args["budgets"] else None
        self.needs_calibration = self.budget_table is None  # a budgets file replaces the layer typing
        self._choice("scoring", ("code", "paper"))
        self._choice("allocation", ("code", "paper"))
        self._choice("combiner", ("product", "sum"))
        a = self.args
        if a["kernel"] < 1 or a["kernel"] % 2 == 0:
            raise ValueError(f"KV policy 'scalekv': kernel must be odd, got {a['kernel']!r}")
        for arg in ("drafters", "history_topk", "refiner_start"):
            if not 0.0 <= a[arg] <= 1.0:
                raise ValueError(f"KV policy 'scalekv': {arg} must be in [0, 1], got {a[arg]!r}")
        if a["window"] < 1 or a["refiner_decay"] < 0:
            raise ValueError("KV policy 'scalekv': window must be >= 1 and refiner_decay >= 0")

    # -- offline: layer typing ---------------------------------------------------------------------
    def calibration_stats(self, variant) -> _ASIStats:
        g = geometry(variant)
        return _ASIStats(g.depth, len(g.patch_nums), self.args["history_topk"])

    def gate_tokens(self, budget: int) -> int:
        """Tokens a full cache may hold before compression starts: `gate`, else 650 with a budgets file (the
        released scripts' max_capacity), else the budget."""
        gate = self.args["gate"]
        if gate is not None:
            return gate
        return RELEASED_GATE if self.budget_table is not None else budget

    def plan(self, variant) -> KVPlan:
        """Per layer and scale, the capacity; scales compress once a full cache would exceed the gate."""
        g = geometry(variant)
        budget = self.budget_tokens(g.seq_len)
        gate = self.gate_tokens(budget)
        ends = [sum(pn * pn for pn in g.patch_nums[: i + 1]) for i in range(len(g.patch_nums))]
        if self.budget_table is not None:
            layers = self._file_groups(g.depth, ends, gate)
        else:
            layers = self.groups(variant, budget, ends, gate)
        return KVPlan(tuple(g.patch_nums), tuple(tuple(layer) for layer in layers),
                      tuple(end > gate for end in ends), self.state)

    def _file_groups(self, depth: int, ends: list[int], gate: int) -> list[list[GroupPlan]]:
        """Capacities from the budgets file: entry budget_entry(si) for every scale past the gate."""
        table, w = self.budget_table, self.args["window"]
        some = next(iter(table.values()))
        if len(some) != depth:
            raise ValueError(f"ScaleKV budgets file {self.args['budgets']} lists {len(some)} blocks; the model has "
                             f"{depth}")
        rows: list[list[int]] = [[] for _ in range(depth)]
        for si, end in enumerate(ends):
            n = budget_entry(si)
            if end > gate and n not in table:
                raise ValueError(f"ScaleKV budgets file {self.args['budgets']} has no 'Scale {n}', which scale index "
                                 f"{si} needs (a full cache of {end} tokens exceeds the gate of {gate}); it has "
                                 f"{', '.join(f'Scale {k}' for k in sorted(table))}")
            for layer, row in enumerate(rows):
                # The code raises a capacity below the window to the window (it keeps the window whole).
                row.append(max(table[n][layer], w) if end > gate else end)
        return [[GroupPlan(None, tuple(row))] for row in rows]

    def drafters_of(self, variant, budget: int, ends: list[int], gate: int | None = None) -> set[tuple[int, int]]:
        """(layer, scale) pairs typed as drafters: the lowest per-scale z-scores of the ASI over the scales
        that are compressed, ranked together."""
        cal = self.calibration_for(variant)
        cur, top = torch.tensor(cal["current_ratio"]), torch.tensor(cal["history_topk_ratio"])
        asi = cur * top if self.args["combiner"] == "product" else cur + top
        depth = asi.shape[0]
        gate = budget if gate is None else gate
        compressed = [k for k, end in enumerate(ends) if end > gate]
        pairs = []
        for k in compressed:
            col = asi[:, k]
            z = (col - col.mean()) / (col.std(unbiased=False) + 1e-6)
            pairs += [(float(z[layer]), k, layer) for layer in range(depth)]
        count = round(self.args["drafters"] * len(pairs))
        if self.args["drafters"] > 0 and pairs:
            count = max(1, count)
        return {(layer, k) for _, k, layer in sorted(pairs)[:count]}

    def groups(self, variant, budget: int, ends: list[int], gate: int | None = None) -> list[list[GroupPlan]]:
        w = self.args["window"]
        self.require_budget(budget, ends[-1], w, "the observation window", "window", budget)
        gate = budget if gate is None else gate
        depth = geometry(variant).depth
        drafters = self.drafters_of(variant, budget, ends, gate)
        per_layer: list[list[int]] = [[] for _ in range(depth)]
        j = 0  # index among compressed scales (the paper's linear decay runs over them)
        for k, end in enumerate(ends):
            if end <= gate:
                for row in per_layer:
                    row.append(end)
                continue
            d = sum((layer, k) in drafters for layer in range(depth))
            b_d, b_r = self._split(budget, depth, d, end, j)
            for layer in range(depth):
                per_layer[layer].append(b_d if (layer, k) in drafters else b_r)
            j += 1
        return [[GroupPlan(None, tuple(row))] for row in per_layer]

    def _split(self, budget: int, depth: int, d: int, full: int, j: int) -> tuple[int, int]:
        """(drafter, refiner) budgets of one scale: depth·budget in all, drafters at most `full`."""
        total, floor = budget * depth, self.args["window"]
        if d in (0, depth):
            return budget, budget
        if self.args["allocation"] == "code":
            b_d = min(full, (total - (depth - d) * floor) // d)
            return b_d, (total - d * b_d) // (depth - d)
        a = self.args
        b_r = max(floor, round(budget * (a["refiner_start"] - a["refiner_decay"] * j)))
        return max(b_r, min(full, (total - (depth - d) * b_r) // d)), b_r

    # -- online: selection -------------------------------------------------------------------------
    def window_rows(self, view: KVView) -> Tensor:
        """Rows of this forward's queries in the observation window: the centres of a grid over the current
        map, or (a map smaller than the grid, or a non-square window) its most recent tokens, as the code does."""
        n, w = view.n, self.args["window"]
        lo, hi = view.scale_slots
        size, grid = hi - lo, math.isqrt(w)
        pn = math.isqrt(size)
        if grid * grid == w and pn * pn == size and pn >= grid:
            return torch.tensor(grid_centres(pn, grid), device=view.k.device) + (n - size)
        return torch.arange(n - min(w, n), n, device=view.k.device)

    def select(self, view: KVView, n_keep: int) -> Tensor:
        if self.args["selection"] == "official":
            lo, hi = view.scale_slots
            window = torch.tensor(official_window(hi - lo, self.args["window"], view.N), device=view.k.device)
            raw = view.raw_queries(window - (view.N - view.n))
            return official_keep(raw, view.k, window, n_keep, self.args["kernel"])
        rows = self.window_rows(view)[-n_keep:]
        slots = rows + (view.N - view.n)
        if self.args["scoring"] == "code":
            raw = view.raw_queries(rows)
            logits = raw @ view.k.float().transpose(-1, -2) / math.sqrt(raw.shape[-1])
            logits[..., slots] = float("-inf")  # the window is kept anyway and does not vote for itself
            scores = pool_scores(logits.sum(-2), self.args["kernel"], "maxpool")
        else:
            probs = attention_probs(view.q[:, :, rows], view.k, view.mask_rows(rows))
            scores = pool_scores(probs.sum(-2), self.args["kernel"], "avgpool")
        protect = torch.zeros(view.N, dtype=torch.bool, device=view.k.device)
        protect[slots] = True
        return top_keep(scores, n_keep, protect)


class _ASIStats:
    """Per (layer, scale), over the current scale's queries (both CFG halves, every head): the attention mass
    on the current map's keys, and the mass of the K′ largest weights on history keys."""

    def __init__(self, depth: int, scales: int, history_topk: float):
        self.history_topk = history_topk
        self.cur = torch.zeros(depth, scales, dtype=torch.float64)
        self.top = torch.zeros(depth, scales, dtype=torch.float64)
        self.count = torch.zeros(depth, scales, dtype=torch.float64)

    def observe(self, view: KVView) -> None:
        lo, hi = view.scale_slots
        at = (view.layer, view.si)
        for rows in chunked_rows(view.q, view.N):
            p = attention_probs(view.q[:, :, rows], view.k)
            self.cur[at] += p[..., lo:].sum().item()
            if lo > 0:
                k_prime = max(1, round(self.history_topk * lo))
                self.top[at] += p[..., :lo].topk(k_prime, dim=-1).values.sum().item()
            self.count[at] += p[..., 0].numel()

    def result(self) -> dict:
        count = self.count.clamp_min(1)
        return {"current_ratio": (self.cur / count).tolist(), "history_topk_ratio": (self.top / count).tolist(),
                "history_topk": self.history_topk}


@register_kv_policy
def scalekv(**kwargs: Any) -> ScaleKV:
    """ScaleKV (Li et al. 2025, arXiv:2505.19602): drafter/refiner layers per scale, grid-centre window.

    Defaults: budget 0.1 (the only released budget), window 16 (4×4 grid), kernel 5, scoring "code" (summed
    pre-softmax logits, max-pool; "paper": summed softmax, avg-pool), allocation "code" (the released JSONs'
    drafter Max / refiner Min split). Unverified for VAR (see the module docstring): drafters 0.0625,
    history_topk 0.1, combiner product, refiner_start 0.92, refiner_decay 0.108, 10 calibration labels.
    Calibrates itself on first use with a model unless given calibration=PATH (policy.save_calibration) or
    budgets=PATH (a released budgets JSON, which replaces the calibrated allocation). selection "official": the
    released update_kv (INFINITY_SPEC §8); gate: tokens a full cache holds before compression starts (default 650
    with a budgets file, else the budget).
    """
    return ScaleKV(**kwargs)
