"""Sampling settings and the token sampler shared by every variant.

Matches the official samplers (FoundationVision/VAR@78b95394 models/helpers.py; czg1225/CoDe@bfb204de
for the per-scale temperature), written from docs/VAR_SPEC.md §4 and docs/CODE_SPEC.md §2:
top-k keeps ties at the threshold, top-p sorts ascending and never removes the largest logit, the
temperature divides the logits after both filters, and one multinomial draws over the (B·l, V) rows from the
call's generator. `more_smooth` replaces the hard codebook lookup by a Gumbel-softmax mixture whose noise is
drawn from the same generator after the multinomial.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = ["SampleConfig", "ScaleSampling", "Draw", "NonFiniteLogitsError", "Sampler", "filter_top_k_top_p_",
           "draw_tokens", "sample_scale", "guide", "bad_logits", "non_finite_error", "CFG_MAX"]

PerScale = float | tuple[float, ...]
CFG_MAX = 1000.0  # far above any published guidance scale; larger ones only overflow the guided fp32 logits


class NonFiniteLogitsError(FloatingPointError, ValueError):
    """Logits that make no distribution (NaN, +inf, or a row of -inf) reached the sampler. `cause` says at
    which stage of the sampler they appeared: "input" (the logits it was given) or "temperature". A ValueError
    too, so that the command line prints it as a message like any other bad setting or file."""

    def __init__(self, message: str, cause: str = "input"):
        super().__init__(message)
        self.cause = cause


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars too, not True/False


def _check_value(name: str, v: object) -> None:
    """Raises ValueError naming one setting's bad value and its valid range (`name` as `top_p[3]`)."""
    if name.startswith("top_k"):
        ok = _is_number(v) and math.isfinite(v) and v >= 0 and float(v).is_integer()
        valid = "an integer >= 0 (0 = off; >= the vocabulary keeps every token)"
    elif name.startswith("top_p"):
        ok = _is_number(v) and 0.0 <= v <= 1.0  # False for NaN
        valid = "a number in [0, 1] (0 = off)"
    elif name.startswith("temperature"):
        ok = _is_number(v) and math.isfinite(v) and v > 0
        valid = "a finite number, temperature > 0"
    else:  # cfg
        ok = _is_number(v) and 0.0 <= v <= CFG_MAX
        valid = f"a finite guidance scale in [0, {CFG_MAX:g}] (0 = no guidance)"
    if not ok:
        raise ValueError(f"sampling.{name} = {v!r} is invalid: it must be {valid}")


@dataclass(frozen=True)
class ScaleSampling:
    """The settings of one scale."""

    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    more_smooth: bool = False


@dataclass(frozen=True)
class SampleConfig:
    """Sampling settings of one generation call. `cfg`, `top_k`, `top_p` and `temperature` are a single value
    or one value per scale (CoDe samples scale si with top_k[si] and temperature[si]; Infinity guides scale si
    with cfg[si], read by `cfg_at`).

    Defaults are the official VAR FID protocol (README): cfg 1.5, top-k 900, top-p 0.96, no smoothing.
    """

    cfg: PerScale = 1.5
    top_k: int | tuple[int, ...] = 900
    top_p: PerScale = 0.96
    temperature: PerScale = 1.0
    more_smooth: bool = False

    def __post_init__(self) -> None:
        for f in ("cfg", "top_k", "top_p", "temperature"):
            value = getattr(self, f)
            if isinstance(value, list):
                object.__setattr__(self, f, tuple(value))
        self._check_values()

    def _check_values(self) -> None:
        """Every value finite and in its range, before any model runs (a NaN would only surface in the sampler)."""
        for f in ("cfg", "top_k", "top_p", "temperature"):
            v = getattr(self, f)
            if isinstance(v, tuple):
                if not v:
                    raise ValueError(f"sampling.{f} is an empty list: give one value, or one per scale")
                for si, x in enumerate(v):
                    _check_value(f"{f}[{si}]", x)
            else:
                _check_value(f, v)

    def at(self, si: int) -> ScaleSampling:
        def pick(v):
            return v[si] if isinstance(v, tuple) else v
        return ScaleSampling(int(pick(self.top_k)), float(pick(self.top_p)), float(pick(self.temperature)),
                             self.more_smooth)

    def cfg_at(self, si: int) -> float:
        """The guidance scale of scale si."""
        return float(self.cfg[si]) if isinstance(self.cfg, tuple) else self.cfg

    def validate(self, num_scales: int) -> None:
        """Raises ValueError naming the bad setting and its valid values."""
        for f in ("cfg", "top_k", "top_p", "temperature"):
            v = getattr(self, f)
            if isinstance(v, tuple) and len(v) != num_scales:
                raise ValueError(f"sampling.{f} has {len(v)} values but the model has {num_scales} scales")
        self._check_values()


class Draw(NamedTuple):
    """What one sampling call produced for (B, l) positions."""

    tokens: Tensor  # (B, l) int64
    logits: Tensor  # (B, l, V) guided logits after top-k/top-p (-inf outside the nucleus), before temperature
    soft: Tensor | None  # (B, l, V) Gumbel-softmax weights with more_smooth, else None


class Sampler(Protocol):
    """A family's sampler: guidance, filters, temperature and the draw of one step, from the random stream the
    loop hands it. A family with other sampling semantics (Infinity's bitwise draw, LlamaGen's temperature
    before the filters) selects its own by a `sampler` attribute; the loop and its streams stay the same."""

    def __call__(self, logits: Tensor, guided: bool, t: float, s: ScaleSampling,
                 generator: torch.Generator | None, ratio: float) -> Draw:
        """logits: the step's (2B, l, V) output, conditional rows first ((B, l, V) when not guided); t: the step's
        guidance sampling.cfg · step.cfg_ratio, read in the family's convention; ratio: si / (S - 1)."""
        ...


def sample_scale(logits: Tensor, guided: bool, t: float, s: ScaleSampling, generator: torch.Generator | None,
                 ratio: float) -> Draw:
    """VAR's sampler, the default: guidance (1 + t)·cond − t·uncond, then `draw_tokens`."""
    return draw_tokens(guide(logits, t) if guided else logits, s, generator, ratio)


def guide(logits: Tensor, t: float) -> Tensor:
    """Classifier-free guidance on (2B, l, V) logits, conditional rows first: (1 + t)·cond − t·uncond."""
    b = logits.shape[0] // 2
    return (1 + t) * logits[:b] - t * logits[b:]


def filter_top_k_top_p_(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Sets logits outside the top-k and top-p sets to -inf, in place, over the last dim.

    A top-k at or above the vocabulary keeps every token (VAR's default 900 on the zoo's 512 codes)."""
    if 0 < top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < threshold, -torch.inf)  # ties at the threshold survive
    if top_p > 0:
        ascending, order = logits.sort(dim=-1, descending=False)
        drop_sorted = ascending.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False  # the most likely token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits.masked_fill_(drop, -torch.inf)
    return logits


def draw_tokens(logits: Tensor, s: ScaleSampling, generator: torch.Generator | None,
                ratio: float = 0.0) -> Draw:
    """Samples one token per position from (B, l, V) fp32 logits, which are filtered in place.

    `ratio` = si/(S-1) sets the Gumbel temperature and logit scale of more_smooth (MaskGIT-style).
    """
    b, n, vocab = logits.shape
    filter_top_k_top_p_(logits, s.top_k, s.top_p)
    scaled = logits / s.temperature if s.temperature != 1.0 else logits
    probs = scaled.softmax(dim=-1).view(-1, vocab)
    try:  # multinomial already checks its input (one sync); diagnosing only on failure keeps success free
        tokens = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(b, n)
    except RuntimeError:
        err = non_finite_error(logits, scaled, s)
        if err is None:
            raise
        raise err from None
    soft = None
    if s.more_smooth:
        tau = max(0.27 * (1 - ratio * 0.95), 0.005)
        noise = -torch.empty_like(logits).exponential_(generator=generator).log()
        soft = ((logits.mul(1 + ratio) + noise) / tau).softmax(dim=-1)
    return Draw(tokens, logits, soft)


def bad_logits(logits: Tensor) -> bool:
    """True if some row of (..., V) logits makes no distribution: a NaN, a +inf, or every entry -inf."""
    return bool(logits.isnan().any() or logits.isposinf().any() or logits.isneginf().all(dim=-1).any())


def non_finite_error(filtered: Tensor, scaled: Tensor, s: ScaleSampling) -> NonFiniteLogitsError | None:
    """The error to raise when the sampler's input or its temperature made the probabilities invalid; None when
    the cause is something else (the caller then re-raises torch's own error)."""
    if bad_logits(filtered):
        return NonFiniteLogitsError("non-finite logits reached the sampler", "input")
    if bad_logits(scaled):
        return NonFiniteLogitsError(f"sampling.temperature = {s.temperature!r} made the logits non-finite "
                                    "(dividing by it overflowed fp32): use a larger temperature", "temperature")
    return None
