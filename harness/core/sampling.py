"""Sampling settings and the token sampler shared by every variant.

Matches the official samplers (FoundationVision/VAR@78b95394 models/helpers.py; czg1225/CoDe@bfb204de
for the per-scale temperature), written from docs/VAR_SPEC.md §4 and docs/CODE_SPEC.md §2:
top-k keeps ties at the threshold, top-p sorts ascending and never removes the largest logit, the
temperature divides the logits after both filters, and one multinomial draws over the (B·l, V) rows from the
call's generator. `more_smooth` replaces the hard codebook lookup by a Gumbel-softmax mixture whose noise is
drawn from the same generator after the multinomial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SampleConfig", "ScaleSampling", "Draw", "filter_top_k_top_p_", "draw_tokens", "guide"]

PerScale = float | tuple[float, ...]


@dataclass(frozen=True)
class ScaleSampling:
    """The settings of one scale."""

    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    more_smooth: bool = False


@dataclass(frozen=True)
class SampleConfig:
    """Sampling settings of one generation call. `top_k`, `top_p` and `temperature` are a single value or
    one value per scale (CoDe samples scale si with top_k[si] and temperature[si]).

    Defaults are the official VAR FID protocol (README): cfg 1.5, top-k 900, top-p 0.96, no smoothing.
    """

    cfg: float = 1.5
    top_k: int | tuple[int, ...] = 900
    top_p: PerScale = 0.96
    temperature: PerScale = 1.0
    more_smooth: bool = False

    def __post_init__(self) -> None:
        for f in ("top_k", "top_p", "temperature"):
            value = getattr(self, f)
            if isinstance(value, list):
                object.__setattr__(self, f, tuple(value))

    def at(self, si: int) -> ScaleSampling:
        def pick(v):
            return v[si] if isinstance(v, tuple) else v
        return ScaleSampling(int(pick(self.top_k)), float(pick(self.top_p)), float(pick(self.temperature)),
                             self.more_smooth)

    def validate(self, num_scales: int) -> None:
        """Raises ValueError naming the bad setting."""
        for f in ("top_k", "top_p", "temperature"):
            v = getattr(self, f)
            if isinstance(v, tuple) and len(v) != num_scales:
                raise ValueError(f"sampling.{f} has {len(v)} values but the model has {num_scales} scales")
        for si in range(num_scales):
            s = self.at(si)
            if s.top_k < 0 or not 0.0 <= s.top_p <= 1.0 or s.temperature <= 0:
                raise ValueError(f"bad sampling settings at scale {si}: {s} (need top_k >= 0, "
                                 "0 <= top_p <= 1, temperature > 0)")


class Draw(NamedTuple):
    """What one sampling call produced for (B, l) positions."""

    tokens: Tensor  # (B, l) int64
    logits: Tensor  # (B, l, V) guided logits after top-k/top-p (-inf outside the nucleus), before temperature
    soft: Tensor | None  # (B, l, V) Gumbel-softmax weights with more_smooth, else None


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
    tokens = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(b, n)
    soft = None
    if s.more_smooth:
        tau = max(0.27 * (1 - ratio * 0.95), 0.005)
        noise = -torch.empty_like(logits).exponential_(generator=generator).log()
        soft = ((logits.mul(1 + ratio) + noise) / tau).softmax(dim=-1)
    return Draw(tokens, logits, soft)
