"""LlamaGen's sampler (raster AR), the `Sampler` a raster variant selects: written from docs/LLAMAGEN_SPEC.md
(FoundationVision/LlamaGen@ce98ec41 autoregressive/models/generate.py `sample`, and the HF transformers v3.2
`top_k_top_p_filtering` it calls).

Its order differs from VAR's (sampling.py) in three places: guidance is uncond + (cond − uncond)·cfg on the raw
logits, applied only when cfg > 1; the temperature divides the logits BEFORE the filters (so it changes the
top-p nucleus); top-p sorts descending and drops the tokens whose cumulative probability exceeds p, shifted by one
(the token crossing p stays). One multinomial draws over the (l·B, V) rows, position-major, from the stream the
loop hands over, which on a CPU with `torch.manual_seed(s)` equals the official global-generator draw. top_k = 1
still draws (greedy by construction, but it consumes the stream as the official code does).

Settings read in LlamaGen's terms: `t` (sampling.cfg · step.cfg_ratio) is LlamaGen's cfg_scale; a raster
variant marks the steps past `cfg_interval` with cfg_ratio 0, so they sample the conditional rows alone, as the
official loop does. top_p is off at 1 (LlamaGen's value) and at 0 (SampleConfig's "off").
Speculative decoding verifies drafts against these Draw.logits with sampling_verify.verify_drafts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import Draw, ScaleSampling, non_finite_error

__all__ = ["TEMPERATURE_FLOOR", "filter_hf_top_k_top_p_", "guide_raster", "sample_raster"]

TEMPERATURE_FLOOR = 1e-5  # the official max(temperature, 1e-5)


def guide_raster(logits: Tensor, guided: bool, cfg_scale: float) -> Tensor:
    """(B, l, V) logits to sample from: with `guided` (2B rows, conditional first), uncond + (cond − uncond)·cfg
    when cfg > 1, else the conditional rows as they are."""
    if not guided:
        return logits
    b = logits.shape[0] // 2
    cond, uncond = logits[:b], logits[b:]
    return uncond + (cond - uncond) * cfg_scale if cfg_scale > 1.0 else cond


def filter_hf_top_k_top_p_(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """HF v3.2 filtering over the last dim, in place: top-k sets logits below the k-th largest to -inf (ties kept);
    top-p (0 < p < 1) removes, in descending order, tokens whose cumulative probability exceeds p, shifted right by
    one so that the first is always kept."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        threshold = torch.topk(logits, k)[0][..., -1, None]
        logits.masked_fill_(logits < threshold, -torch.inf)
    if 0.0 < top_p < 1.0:
        descending, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(descending.softmax(dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), -torch.inf)
    return logits


def sample_raster(logits: Tensor, guided: bool, t: float, s: ScaleSampling, generator: torch.Generator | None,
                  ratio: float = 0.0) -> Draw:
    """The `Sampler` of raster AR (LlamaGen). `ratio` is unused (no per-scale schedule); `s.more_smooth` is
    ignored (the official sampler has none). Draw.logits are the filtered, temperature-scaled logits: their
    softmax is the distribution drawn from (what a later verify step compares drafts against)."""
    b, n, vocab = logits.shape[0] // (2 if guided else 1), logits.shape[1], logits.shape[2]
    scaled = guide_raster(logits, guided, t) / max(s.temperature, TEMPERATURE_FLOOR)
    if s.top_k > 0 or 0.0 < s.top_p < 1.0:
        filter_hf_top_k_top_p_(scaled, s.top_k, s.top_p)
    # Position-major rows: one multinomial over (l·B) rows consumes the stream as l per-position calls over the B
    # rows do (the exponential race, row after row), which is ZipAR's official order for a multi-row step
    # (ThisisBillhe/ZipAR@2a5695ca generate_zipar.py samples each fed position in turn); l = 1 is unchanged.
    probs = scaled.softmax(dim=-1).transpose(0, 1).reshape(-1, vocab)  # (l·B, V)
    try:  # multinomial checks its input; diagnosing only on failure keeps the step free of host syncs
        tokens = torch.multinomial(probs, num_samples=1, generator=generator).view(n, b).T.contiguous()  # (B, l)
    except RuntimeError:
        err = non_finite_error(logits, scaled, s)  # the input or the temperature, named as VAR's sampler does
        if err is not None:
            raise err from None
        raise
    return Draw(tokens, scaled, None)
