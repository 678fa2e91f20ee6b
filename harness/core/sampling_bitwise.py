"""Infinity's bitwise sampler: one binary draw per bit of every token, selected by the Infinity variant as its
`sampler` (the loop, its steps and its random streams stay the same).

Matches the official sampler (FoundationVision/Infinity@4c27bbb5 infinity/models/infinity.py, the loop around
`sample_with_top_k_top_p_also_inplace_modifying_logits_`), written from docs/INFINITY_SPEC.md §4: the logits are
multiplied by 1/tau BEFORE guidance and before the filters, guidance is cfg·cond + (1 − cfg)·uncond, the
(B, l, 2d) logits are read as (B, l·d, 2) per-bit pairs [bit = 0, bit = 1], top-k is capped at 2 (so k = 1 is an
argmax that keeps ties and any k ≥ 2 is a no-op), top-p drops the minority bit when its probability is at most
1 − top_p, and one multinomial over the (B·l·d, 2) rows draws every bit of the scale from the step's generator
(row-major over batch, position, bit; equal to argmax(p / E) with E ~ Exp(1)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import Draw, NonFiniteLogitsError, ScaleSampling, bad_logits, filter_top_k_top_p_, non_finite_error

__all__ = ["sample_bits", "guide_bits"]


def guide_bits(logits: Tensor, cfg: float) -> Tensor:
    """Infinity's guidance on (2B, l, V) logits, conditional rows first: cfg·cond + (1 − cfg)·uncond."""
    b = logits.shape[0] // 2
    return cfg * logits[:b] + (1 - cfg) * logits[b:]


def sample_bits(logits: Tensor, guided: bool, t: float, s: ScaleSampling, generator: torch.Generator | None,
                ratio: float = 0.0) -> Draw:
    """Samples the bits of one scale.

    Args:
        logits: (2B, l, 2d) fp32 head outputs, conditional rows first, or (B, l, 2d) when not guided (cfg = 1 at
            this scale, or guidance already mixed into the hidden state).
        guided: whether `logits` holds both halves.
        t: the scale's guidance in Infinity's convention (1 = none).
        s: top_k, top_p and temperature (Infinity's tau) of the scale.
        generator: the step's random stream.
        ratio: unused (the loop's si / (S - 1)).

    Returns:
        Draw with tokens (B, l, d) int64 bits and logits (B, l·d, 2), the guided, tempered, filtered pairs.
    """
    if s.more_smooth:
        raise ValueError("more_smooth is VAR's codebook smoothing; Infinity's bitwise sampler has none")
    scaled = logits.mul(1 / s.temperature)
    guided_logits = guide_bits(scaled, t) if guided else scaled
    b, n, v = guided_logits.shape
    pairs = guided_logits.reshape(b, n * v // 2, 2)
    filter_top_k_top_p_(pairs, s.top_k, s.top_p)
    try:  # multinomial checks its input (one sync); diagnosing only on failure keeps success free
        bits = torch.multinomial(pairs.softmax(dim=-1).view(-1, 2), 1, True, generator=generator)
    except RuntimeError:
        err = non_finite_error(logits, scaled, s)  # the input or the temperature, named as VAR's sampler does
        if err is not None:
            raise err from None
        if bad_logits(pairs):
            raise NonFiniteLogitsError("non-finite logits reached the sampler", "input") from None
        raise
    return Draw(bits.view(b, n, v // 2), pairs, None)
