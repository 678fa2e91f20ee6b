"""The acceleration base: settings checked by name, the per-call state and report, and the per-step plan.

An acceleration is a small modifier a VAR model consults at every step of the one loop (harness/core/loop.py),
like a KV policy: it never owns a loop. Per step it answers, in a `StepPlan`:
  - `skip`: the step is skipped by every sample of the batch (no network call, nothing added to f_hat);
  - `rows`: which CFG rows run: "both" (guided), "cond" or "uncond" (one half, unguided);
  - `blocks`: a `BlockPlan` (variants/var_model.py) that computes some tokens only or changes the attention;
    while its `sublayer` runs `fn` on a token subset, its `index` (rows, l) names their positions (Infinity's
    attention rotates each by its own RoPE angles; None: every token in order);
  - `unguided`: samples whose guidance is off while others of the batch keep it (their unconditional logits
    are replaced by their conditional ones, so guidance leaves them unchanged up to rounding).
After each draw, `after_commit` may decide later steps (SkipVAR) and `frozen_rows` names the samples that skip
this scale while the rest of the batch runs it. The state of one generation lives in `AccelState`; everything a
study reports of it is `AccelState.report()` (tokens computed per scale, steps skipped, guided rows).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from varbench.harness.core.kv_cache import CompressedKVCache, ConcatKVCache, StaticKVCache

__all__ = ["Acceleration", "AccelState", "StepPlan", "ROWS", "narrow_cache", "rows_slice", "area_resize",
           "check_fraction", "check_int", "family_of", "grid_of"]

ROWS = ("both", "cond", "uncond")


@dataclass(frozen=True)
class StepPlan:
    skip: bool = False
    rows: str = "both"
    blocks: Any = None  # a BlockPlan, or None for the plain network
    unguided: Tensor | None = None  # (B,) bool: samples whose guidance is off in a step both halves run


@dataclass
class AccelState:
    """One generation's acceleration state, shared by the models of a composed variant (CoDe)."""

    batch: int
    tokens_per_scale: dict[int, int] = field(default_factory=dict)  # tokens each block computed, per CFG row
    rows_per_scale: dict[int, int] = field(default_factory=dict)  # CFG rows the network ran (2B guided, B not)
    skipped: Tensor | None = None  # (B, S) bool: sample b skipped scale si
    decisions: dict[str, Any] = field(default_factory=dict)  # per-sample decisions (SkipVAR), as lists
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)  # model-specific caches (FastVAR)
    rows: str = "both"  # the CFG rows the caches still hold (a dropped half never comes back)

    def report(self) -> dict[str, Any]:
        """Per scale: tokens each block computed per row and CFG rows run (0 when skipped; None for a scale run
        outside the model's own step, such as CoDe's refiner prefill); steps skipped per sample; decisions."""
        skipped = self.skipped
        return {"tokens_per_scale": [self.tokens_per_scale.get(si) for si in range(_scales(self))],
                "rows_per_scale": [self.rows_per_scale.get(si) for si in range(_scales(self))],
                "steps_skipped_per_sample": [] if skipped is None else skipped.sum(1).tolist(),
                "steps_skipped_mean": 0.0 if skipped is None else float(skipped.float().sum(1).mean()),
                **self.decisions}


def _scales(state: AccelState) -> int:
    seen = list(state.tokens_per_scale) + list(state.rows_per_scale)
    width = 0 if state.skipped is None else state.skipped.shape[1]
    return max([width, *(si + 1 for si in seen)])


class Acceleration:
    """Base of the accelerations. Subclasses set `name`, `defaults` (the valid arguments), `unverified` (the
    arguments whose VAR value no paper or official code fixes) and override the hooks they change."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    unverified: ClassVar[tuple[str, ...]] = ()
    static_shapes: ClassVar[bool] = False  # whether every step's shapes are fixed before the call (CUDA graphs)
    # The model families it runs on (a model's `accel_family`, "var" when absent), and per family the defaults
    # and unverified arguments that differ from VAR's (Infinity's are the official code's where it has some); an
    # argument only a family's defaults name exists only there (FastVAR's `which_layers` on Infinity).
    families: ClassVar[tuple[str, ...]] = ("var",)
    family_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    family_unverified: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, **kwargs: Any):
        valid = set(self.defaults).union(*self.family_defaults.values())  # a family may add its own arguments
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(f"acceleration {self.name!r} has no argument(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(sorted(valid)) or '(none)'}")
        self.args: dict[str, Any] = {**self.defaults, **kwargs}
        self.given = frozenset(kwargs)  # arguments the caller chose: a family's defaults never replace them
        self.model_family = "var"  # the family bound last (`family` is the scale/raster kind)
        self.current: AccelState | None = None  # the latest call's state (a CoDe refiner joins the drafter's)
        self.check()

    def bind(self, variant) -> None:
        """Takes the defaults of `variant`'s family for the arguments the caller did not give (apply_acceleration
        calls it before `supports`); raises ValueError when the family is not one the method runs on."""
        family = family_of(variant)
        if family not in self.families:
            raise ValueError(f"acceleration {self.name!r} runs on {', '.join(self.families)} models, not on "
                             f"{family} ({getattr(variant, 'name', variant)!r})")
        self.model_family = family
        own = self.family_defaults.get(family, {})
        self.args = {**self.defaults, **own, **{k: v for k, v in self.args.items() if k in self.given}}
        self.check()

    def check(self) -> None:
        """Validates the arguments (raises ValueError naming the bad one)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"

    def record(self) -> dict[str, Any]:
        """The fields a result record carries about the acceleration."""
        unverified = self.family_unverified.get(self.model_family, self.unverified)
        return {"acceleration": self.name, "accel_args": dict(self.args), "accel_unverified": list(unverified)}

    def supports(self, variant) -> None:
        """Raises ValueError when the acceleration cannot run on `variant` (a VAR model)."""
        if variant.engine.cuda_graphs and not self.static_shapes:
            raise ValueError(f"acceleration {self.name!r} changes shapes per call; it cannot run with cuda_graphs")

    # -- hooks -----------------------------------------------------------------------------------
    def begin(self, variant, labels: Tensor, join: bool = False) -> AccelState:
        """The state of a new call; `join`: the second model of a composed variant shares the first's state."""
        if join and self.current is not None and self.current.batch == len(labels):
            return self.current
        self.current = AccelState(len(labels))
        self.current.skipped = torch.zeros(len(labels), len(variant.patch_nums), dtype=torch.bool, device=labels.device)
        return self.current

    def ragged_cache(self, variant) -> bool:
        """Whether layers of one step may feed different token counts to the KV cache (FastVAR's unpruned
        layers): a static cache has one write position per scale, so the model then concatenates instead."""
        return False

    def plan(self, variant, state, step) -> StepPlan:
        """What the step computes; `state` is the model's VARState (its `accel` is the AccelState)."""
        return StepPlan()

    def prefill_plan(self, variant, state, scale: int):
        """A BlockPlan for a multi-scale pass over scales 0..scale (CoDe's refiner prefill), or None."""
        return None

    def frozen_rows(self, variant, state, si: int) -> Tensor | None:
        """(B,) bool: samples whose latent scale si leaves unchanged while the batch runs it; None: none."""
        return None

    def after_commit(self, variant, state, si: int) -> None:
        """Called after scale si's tokens were added to f_hat."""


def narrow_cache(cache, rows: slice):
    """A view of `cache` over the CFG rows `rows` that later steps write in place: the steps after a dropped
    CFG half run on the other half's keys and values only."""
    view = copy.copy(cache)
    if isinstance(cache, StaticKVCache):
        view.k, view.v = cache.k[:, rows], cache.v[:, rows]
    elif isinstance(cache, ConcatKVCache):
        view.k = [None if t is None else t[rows] for t in cache.k]
        view.v = [None if t is None else t[rows] for t in cache.v]
    elif isinstance(cache, CompressedKVCache):
        view.groups = [[_narrow_group(g, rows) for g in layer] for layer in cache.groups]
        view.batch = len(range(cache.batch)[rows])
    else:
        raise TypeError(f"cannot drop CFG rows of a {type(cache).__name__}")
    return view


def _narrow_group(group, rows: slice):
    view = copy.copy(group)
    view.k, view.v = group.k[rows], group.v[rows]
    view.state = {name: t[rows] for name, t in group.state.items()}
    return view


def check_fraction(name: str, arg: str, value: Any, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value if low_open else 0 <= value)
    if not ok or value > 1:
        raise ValueError(f"acceleration {name!r}: {arg} must be a number in {'(0' if low_open else '[0'}, 1], "
                         f"got {value!r}")


def check_int(name: str, arg: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"acceleration {name!r}: {arg} must be an integer >= {minimum}, got {value!r}")


def family_of(variant) -> str:
    """The model family an acceleration reads its defaults for: "infinity" or "var" (VAR, CoDe's models)."""
    return getattr(variant, "accel_family", "var")


def grid_of(variant, si: int) -> tuple[int, int]:
    """(h, w) token grid of scale si: Infinity's `schedule` may be non-square, VAR's scales are pn x pn."""
    schedule = getattr(variant, "schedule", None)
    return tuple(schedule[si]) if schedule is not None else (variant.patch_nums[si],) * 2


def rows_slice(rows: str, batch: int) -> slice:
    """The (2B, ...) rows a CFG-row choice keeps: conditional rows come first."""
    return {"both": slice(0, 2 * batch), "cond": slice(0, batch), "uncond": slice(batch, 2 * batch)}[rows]


def area_resize(tokens: Tensor, size: int | tuple[int, int], source: tuple[int, int] | None = None) -> Tensor:
    """(rows, h·w, C) token map (square when `source` is None) area-resized to (rows, size², C) or size (h', w')."""
    rows, n, c = tokens.shape
    h, w = source or (int(round(n ** 0.5)),) * 2
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = tokens.transpose(1, 2).reshape(rows, c, h, w)
    return torch.nn.functional.interpolate(grid, size=size, mode="area").flatten(2).transpose(1, 2)
