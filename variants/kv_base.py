"""The KV-policy base: settings checked by name, budgets, the per-model plan, scoring helpers, calibration I/O.

A policy is an object given to a KV-cached variant (`build_var(kv_policy=...)`, `build_infinity(kv_policy=...)`),
which it reads through `geometry` (layers, heads, width, scale sides: VAR's config, Infinity's `kv_geometry`). It
holds its settings and, for the policies with an offline phase (ScaleKV's layer typing, HACK's head typing), one
calibration per model, keyed by the model's architecture and weights; everything that changes during a
generation lives in the model's own cache (harness/core/kv_cache.py `CompressedKVCache`), so one policy object
may serve several models (CoDe's drafter and refiner) without sharing state.

Budgets: a float in (0, 1] is a fraction of what `full` holds after the last scale (the sequence length L, per
layer and head: 0.1 of VAR-256's 680 tokens is 68); an int is a token count per layer and head. Every policy
keeps the cache whole while a full cache would hold at most the budget (ScaleKV's "base capacity" rule,
KVCache-Factory's "prompt shorter than the capacity" rule), so a budget of 1.0 never evicts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from varbench.harness.core.kv_cache import CompressedKVCache, GroupPlan, KVPlan, KVView

__all__ = ["KVPolicy", "KVGeometry", "attention_probs", "pool_scores", "top_keep", "uniform_rows", "grid_centres",
           "geometry", "model_key"]

CALIBRATION_LABELS = 10  # ScaleKV calibrates on 10 prompts; HACK's typing is stable from one sample
_CHUNK = 1 << 24  # score elements per chunk of queries (bounds the transient memory of all-query scores)


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, H, r, N) fp32 attention probabilities of queries q (pre-scaled, as the model's) over keys k."""
    logits = q.float() @ k.float().transpose(-1, -2)
    if mask is not None:
        logits = logits + mask
    return logits.softmax(-1)


def chunked_rows(q: Tensor, n_keys: int) -> list[slice]:
    """Query-row slices such that one chunk's score matrix has at most _CHUNK elements."""
    b, h, n, _ = q.shape
    step = max(1, _CHUNK // max(1, b * h * n_keys))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def pool_scores(scores: Tensor, kernel: int, kind: str) -> Tensor:
    """1-D pooling along keys (stride 1, same length): SnapKV's clustering of neighbouring keys."""
    if kernel <= 1:
        return scores
    fn = F.avg_pool1d if kind == "avgpool" else F.max_pool1d
    return fn(scores, kernel, stride=1, padding=kernel // 2)


def top_keep(scores: Tensor, n_keep: int, protect: Tensor | None = None) -> Tensor:
    """(B, H, n_keep) ascending slots of the n_keep highest scores; `protect`ed slots (bool, broadcastable,
    at most n_keep of them) always kept."""
    if protect is not None:
        scores = scores.masked_fill(protect, float("inf"))
    return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values


def uniform_rows(lo: int, hi: int, count: int, device: torch.device) -> Tensor:
    """`count` rows spread evenly over [lo, hi) (all of them when there are fewer)."""
    if hi - lo <= count:
        return torch.arange(lo, hi, device=device)
    return torch.linspace(lo, hi - 1, count, device=device).round().long().unique()


def grid_centres(pn: int, grid: int) -> list[int]:
    """Raster indices of the centre token of each cell of a grid×grid split of a pn×pn map (ScaleKV's
    observation window: cell side pn // grid, centre at (side - 1) // 2 inside the cell)."""
    side = pn // grid
    rows = [i * side + (side - 1) // 2 for i in range(grid)]
    return [r * pn + c for r in rows for c in rows]


@dataclass(frozen=True)
class KVGeometry:
    """What a policy reads of a model's self-attention cache: layers, heads, width and the square scale schedule
    (side per scale). VAR-family configs have these fields themselves; Infinity builds one (`kv_geometry`)."""

    depth: int
    heads: int
    width: int
    patch_nums: tuple[int, ...]

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


def geometry(variant) -> KVGeometry:
    """The model's `kv_geometry` where it has one (Infinity: from its current schedule), else its config."""
    return getattr(variant, "kv_geometry", None) or variant.cfg


def model_key(variant) -> str:
    """Calibrations are per model: architecture and weights."""
    c = geometry(variant)
    return f"d{c.depth}-w{c.width}-h{c.heads}-L{c.seq_len}:{variant.weights}"


class KVPolicy:
    """Base of the KV-cache policies. Subclasses set `name`, `defaults` (the valid arguments), `unverified` (the
    settings whose value no paper or official code fixes for VAR), and implement `select` (and `groups`,
    `observe` where they differ from a uniform budget and no running statistics)."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {"budget": 0.1}
    unverified: ClassVar[tuple[str, ...]] = ()
    compresses: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    state: ClassVar[tuple[str, ...]] = ()  # per-slot statistics the cache carries for the policy

    def __init__(self, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            raise ValueError(f"KV policy {self.name!r} has no argument(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(sorted(self.defaults)) or '(none)'}")
        self.args: dict[str, Any] = {**self.defaults, **kwargs}
        self.calibrations: dict[str, dict] = {}  # model_key -> calibration data (JSON-able)
        self.sources: dict[str, str] = {}  # model_key -> where its calibration came from
        if "budget" in self.args:
            b = self.args["budget"]
            if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 or (isinstance(b, float) and b > 1):
                raise ValueError(f"KV policy {self.name!r}: budget must be a fraction in (0, 1] or a token count "
                                 f">= 1, got {b!r}")
        self.check()
        if self.args.get("calibration"):
            self.load_calibration(self.args["calibration"])

    def check(self) -> None:
        """Validates the policy's own arguments (raises ValueError)."""

    def _choice(self, arg: str, options: tuple[str, ...]) -> None:
        if self.args[arg] not in options:
            raise ValueError(f"KV policy {self.name!r}: {arg} must be one of {', '.join(options)}, "
                             f"got {self.args[arg]!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"

    def record(self) -> dict[str, Any]:
        """The fields a result record carries about the policy."""
        return {"kv_policy": self.name, "kv_args": dict(self.args), "kv_unverified": list(self.unverified),
                "kv_calibration": dict(self.sources) or None}

    @property
    def calibration_source(self) -> str | None:
        """Where the calibrations came from ("file: PATH", "calibrate()", "auto: ..."), one line."""
        return "; ".join(sorted(set(self.sources.values()))) or None

    # -- budgets and plan ------------------------------------------------------------------------
    def budget_tokens(self, seq_len: int) -> int:
        b = self.args["budget"]
        return int(b) if isinstance(b, int) else max(1, round(b * seq_len))

    def require_budget(self, budget: int, seq_len: int, need: int, what: str, arg: str, value: int) -> None:
        """Raises unless `budget` tokens hold the `need` tokens the policy always keeps (`what`), naming the
        smallest budget that works on this model (tokens, and a fraction of its `seq_len`) and the alternative:
        `arg` lowered to `value`."""
        if budget >= need:
            return
        given = self.args["budget"]
        as_given = f" ({given} of this model's {seq_len})" if isinstance(given, float) else ""
        milli = max(1, math.floor((need - 1) * 1000 / seq_len))  # the smallest 3-decimal fraction giving >= need
        while round(milli / 1000 * seq_len) < need:
            milli += 1
        fraction = milli / 1000
        raise_to = (f"raise the budget to at least {need} tokens (\"budget\": {need}, or {fraction:g} of this "
                    f"model) or " if need <= seq_len else "")
        raise ValueError(f"KV policy {self.name!r}: a budget of {budget} tokens{as_given} is smaller than {what} "
                         f"({need} tokens), which it always keeps: {raise_to}lower {arg} to {value}, e.g. "
                         f"--kv-args '{{\"budget\": {given}, \"{arg}\": {value}}}'")

    def groups(self, variant, budget: int, ends: list[int]) -> list[list[GroupPlan]]:
        """Per layer, the head groups and their kept counts per scale. Default: all heads, the budget."""
        return [[GroupPlan(None, (budget,) * len(ends))] for _ in range(geometry(variant).depth)]

    def plan(self, variant) -> KVPlan:
        cfg = geometry(variant)
        budget = self.budget_tokens(cfg.seq_len)
        ends = [sum(pn * pn for pn in cfg.patch_nums[: i + 1]) for i in range(len(cfg.patch_nums))]
        layers = tuple(tuple(layer) for layer in self.groups(variant, budget, ends))
        return KVPlan(tuple(cfg.patch_nums), layers, tuple(end > budget for end in ends), self.state)

    def cache(self, variant, batch2: int, previous=None, tokens: int | None = None) -> CompressedKVCache:
        """The model's cache for a call of `batch2` rows over `tokens` positions (None: every scale): the
        previous one reset when it fits, else a new one."""
        plan = self.plan(variant)
        if isinstance(previous, CompressedKVCache) and previous.matches(self, plan, batch2, variant.dtype,
                                                                         variant.device, tokens):
            previous.reset()
            return previous
        cfg = geometry(variant)
        return CompressedKVCache(self, plan, batch2, cfg.heads, cfg.width // cfg.heads, variant.dtype,
                                 variant.device, tokens)

    # -- scoring hooks (called by the cache) -----------------------------------------------------
    def observe(self, view: KVView) -> None:
        """Updates running statistics after every forward (H2O); default: none."""

    def select(self, view: KVView, n_keep: int) -> Tensor:
        """(B, Hg, n_keep) ascending slots to keep."""
        raise TypeError(f"{type(self).__name__} keeps every entry; it selects nothing")

    # -- calibration -----------------------------------------------------------------------------
    def prepare(self, variant) -> None:
        """Called once a model is built with this policy: calibrates it when the policy needs it and has none."""
        if self.needs_calibration and model_key(variant) not in self.calibrations:
            self.calibrate(variant)
            count = min(CALIBRATION_LABELS, getattr(variant, "num_classes", CALIBRATION_LABELS))
            self.sources[model_key(variant)] = f"auto: {count} labels, g_seed 0"

    def calibration_for(self, variant) -> dict:
        key = model_key(variant)
        if key not in self.calibrations:
            raise ValueError(f"KV policy {self.name!r} has no calibration for model {key}: call "
                             f"policy.calibrate(variant) or pass calibration=PATH (has: {sorted(self.calibrations)})")
        return self.calibrations[key]

    def calibration_stats(self, variant):
        """An object with observe(view) (fed every forward of a full-cache run) and result() -> dict."""
        raise TypeError(f"KV policy {self.name!r} has no offline calibration")

    def calibrate(self, variant, labels: Tensor | None = None, sampling=None, g_seed: int = 0) -> dict:
        """Runs each model of `variant` once with a full cache over `labels` (default: 10 classes spread over
        the label range) and stores what the policy derives from its attention; returns {model_key: data}."""
        from varbench.harness.core.loop import generate
        from varbench.harness.core.sampling import SampleConfig

        out = {}
        for model in (getattr(variant, "models", None) or {"model": variant}).values():
            if model.engine.cuda_graphs:
                raise ValueError("calibrate on a model built without cuda_graphs")
            stats = self.calibration_stats(model)
            n = model.num_classes
            count = min(CALIBRATION_LABELS, n)  # Infinity's test model has 8 prompts
            lab = labels if labels is not None else torch.arange(count) * max(1, n // count)
            saved = model.kv_policy
            model.set_kv_policy(_Recorder(stats))  # a full cache that hands every forward to the statistics
            try:
                generate(model, lab.to(model.device), sampling or SampleConfig(), g_seed=g_seed)
            finally:
                model.set_kv_policy(saved)
            data = stats.result() | {"labels": [int(x) for x in lab], "g_seed": g_seed}
            out[model_key(model)] = self.calibrations[model_key(model)] = data
            self.sources[model_key(model)] = "calibrate()"
        return out

    def save_calibration(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"policy": self.name, "format": 1, "models": self.calibrations}, indent=1))

    def load_calibration(self, path: str | Path) -> None:
        data = json.loads(Path(path).read_text())
        if data.get("policy") != self.name:
            raise ValueError(f"{path} holds a calibration of {data.get('policy')!r}, not {self.name!r}")
        self.calibrations.update(data["models"])
        self.sources.update({key: f"file: {path}" for key in data["models"]})


class _Recorder(KVPolicy):
    """Keeps everything and hands every forward's view to a calibration's statistics."""

    name = "calibration"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, stats):
        super().__init__()
        self.stats = stats

    def plan(self, variant) -> KVPlan:
        cfg = geometry(variant)
        layers = tuple((GroupPlan(None, (cfg.seq_len,) * len(cfg.patch_nums)),) for _ in range(cfg.depth))
        return KVPlan(tuple(cfg.patch_nums), layers, (False,) * len(cfg.patch_nums))

    def observe(self, view: KVView) -> None:
        self.stats.observe(view)
