"""The speculative verify step of the sampling layer: accept drafted tokens with min(1, p/q), resample the first
rejected one from norm(max(0, p − q)) (issue 16, item 2).

The rule is speculative sampling (Leviathan et al., arXiv:2211.17192, Algorithm 1 and Appendix A.1; Chen et al.,
arXiv:2302.01318, Algorithm 2): for a draft x ~ q, accept with probability min(1, p(x)/q(x)), else draw from
norm(max(0, p − q)); the token that comes out is distributed as p exactly. SJD (arXiv:2410.01699; docs/VARIANTS.md
§9) applies it along a Jacobi window with q = the draft's probability at the previous iteration and keeps the
rest of the window as the next drafts, which is why `tokens` keeps the unverified drafts after the replacement.

LANTERN (arXiv:2410.03355; docs/VARIANTS.md §10) relaxes only the acceptance: the ratio uses p̃(x), the target
mass pooled over the draft's latent neighbourhood, in place of p(x) (`p_accept_probs`). Its official code
(jadohu/LANTERN@3a56e451 models/ea_model_llamagen.py `evaluate_posterior_v1`, the branch with a real q) builds
the replacement from the ORIGINAL p, norm(max(0, p − q')), where q' is q with the draft's neighbourhood set to 0;
the paper's §3 text was not reachable offline, so that part is checked against the code only (unverified). Here
the residual is norm(max(0, p − q)) with the q given, and a caller reproduces LANTERN's q' through `residual_q`
(the official code also differs by family: models/ea_model_lumina_mgpt.py zeroes the neighbourhood in p instead,
and where the residual is all zero it draws uniformly, where this step draws from p).

Random stream (documented so that runs are reproducible): one `torch.rand((B, L))` from `generator`, row-major,
one uniform per drafted position whether or not the position is reached, then one `torch.multinomial` over the B
rows' replacement distributions (rows that accepted every draft draw too, and the draw is discarded). Drawing a
fixed amount keeps the step free of host syncs in the draw and its consumption a function of the shapes only.
When every draft of a row is accepted, the "bonus" token of Algorithm 1 needs the target's logits at position
L + 1, which the caller samples with the family's ordinary sampler.

The loop (harness/core/loop.py) calls `draw_speculative` for a step whose StepOutput carries `Drafts`: the family's
sampler first draws every fed position (the Jacobi update and the bonus token), then `verify_drafts` runs on the
first L positions, both from the loop's stream in that order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .sampling import Draw, NonFiniteLogitsError, Sampler, ScaleSampling

__all__ = ["Drafts", "Relaxation", "ResidualQ", "SpeculativeDraw", "Verified", "draw_speculative", "verify_drafts"]

Q_SUM_TOLERANCE = 1e-3  # proposal rows must sum to 1 within this (bf16/fp16 softmax outputs are off by ~1e-3)

# The relaxed target mass p̃(x_i) at each draft, (B, L), from (p (B, L, V), drafts (B, L)).
Relaxation = Callable[[Tensor, Tensor], Tensor]
# What to subtract from p for the replacement, (B, L, V), from (p (B, L, V), drafts (B, L)).
ResidualQ = Callable[[Tensor, Tensor], Tensor]


class Verified(NamedTuple):
    """What one verify call produced for B rows of L drafts."""

    tokens: Tensor  # (B, L) int64: accepted prefix, then the replacement, then the unverified drafts as given
    accepted: Tensor  # (B,) int64: drafts accepted before the first rejection
    n_new: Tensor  # (B,) int64: accepted + 1 where a replacement was drawn (a rejection happened)
    valid: Tensor  # (B, L) bool: True on the first n_new positions, the tokens that are final
    replacement: Tensor  # (B,) int64: the token drawn at the first rejection (meaningless where n_new == accepted)


class Drafts(NamedTuple):
    """Drafted tokens a step carries to the sampling layer: candidates for the step's first L fed positions."""

    tokens: Tensor  # (B, L) int64
    q_probs: Tensor  # (B, L, V) the distribution each draft was drawn from
    relax: Tensor | Relaxation | None = None  # LANTERN's p~ (verify_drafts' p_accept_probs); None = exact
    residual_q: Tensor | ResidualQ | None = None  # verify_drafts' residual_q; None = q_probs


class SpeculativeDraw(NamedTuple):
    """A Draw (same first three fields) over the step's L + 1 positions, after verification."""

    tokens: Tensor  # (B, L + 1): per row the `final` verified tokens, then the sampler's draws (Jacobi states)
    logits: Tensor  # (B, L + 1, V) the sampler's logits, whose softmax is p at each fed position
    soft: Tensor | None
    verified: Verified  # verify_drafts' result on the first L positions
    final: Tensor  # (B,) int64: tokens that are final per row, accepted + 1 (the replacement or the bonus)


def draw_speculative(sampler: Sampler, logits: Tensor, guided: bool, t: float, s: ScaleSampling,
                     generator: torch.Generator | None, ratio: float, drafts: Drafts) -> SpeculativeDraw:
    """One speculative step's sampling: the family's sampler draws all L + 1 positions (L drafts + 1), then the L
    drafts are verified against its p. Where a row accepted every draft, its bonus token is the sampler's draw at
    position L, from the exact target (Algorithm 1's extra token); past a row's first rejection the sampler's draws
    stand as the next drafts (SJD's Jacobi update)."""
    n = drafts.tokens.shape[1]
    if logits.shape[1] != n + 1:
        raise ValueError(f"a step with {n} drafts must feed {n + 1} positions (the drafts and the one before them); "
                         f"got logits for {logits.shape[1]}")
    draw: Draw = sampler(logits, guided, t, s, generator, ratio)
    verified = verify_drafts(draw.logits[:, :n], drafts.q_probs, drafts.tokens, generator, drafts.relax,
                             drafts.residual_q)
    valid = torch.cat([verified.valid, torch.zeros_like(verified.valid[:, :1])], dim=1)  # (B, L + 1)
    verified_tokens = torch.cat([verified.tokens, draw.tokens[:, n:]], dim=1)
    tokens = torch.where(valid, verified_tokens, draw.tokens)  # (B, L + 1)
    return SpeculativeDraw(tokens, draw.logits, draw.soft, verified, verified.accepted + 1)


def _check_inputs(p_logits: Tensor, q_probs: Tensor, drafts: Tensor) -> None:
    """Raises ValueError (NonFiniteLogitsError for the logits) naming what is wrong. One host sync when valid."""
    if (p_logits.dim() != 3 or 0 in p_logits.shape or q_probs.shape != p_logits.shape
            or drafts.shape != p_logits.shape[:2]):
        raise ValueError(f"verify_drafts expects p_logits (B, L, V) with B, L, V >= 1, q_probs of the same shape "
                         f"and drafts (B, L); "
                         f"got {tuple(p_logits.shape)}, {tuple(q_probs.shape)}, {tuple(drafts.shape)}")
    if drafts.dtype != torch.int64:
        raise ValueError(f"drafts must be int64 token ids, got {drafts.dtype}")
    vocab = p_logits.shape[-1]
    p_bad = p_logits.isnan().any() | p_logits.isposinf().any() | p_logits.isneginf().all(dim=-1).any()
    q = q_probs.float()
    q_bad = (~q.isfinite()).any() | (q < 0).any() | ((q.sum(dim=-1) - 1).abs() > Q_SUM_TOLERANCE).any()
    d_bad = ((drafts < 0) | (drafts >= vocab)).any()
    if not bool(p_bad | q_bad | d_bad):  # the one sync of the valid path
        return
    if bool(p_bad):
        raise NonFiniteLogitsError("non-finite logits reached the verify step (a NaN, a +inf, or a row of -inf "
                                   "in p_logits)", "input")
    if bool(q_bad):
        raise ValueError("q_probs must be finite, non-negative probabilities whose rows sum to 1 "
                         f"(within {Q_SUM_TOLERANCE:g}): the distribution each draft was drawn from")
    raise ValueError(f"drafts must be token ids in [0, {vocab}); got values from {int(drafts.min())} "
                     f"to {int(drafts.max())}")


def _relaxed_mass(relaxed: Tensor | Relaxation, p: Tensor, drafts: Tensor) -> Tensor:
    """p̃(x_i) at each draft, (B, L) float32, from a (B, L, V) tensor or a callable."""
    if callable(relaxed):
        mass = relaxed(p, drafts)
        if mass.shape != drafts.shape:
            raise ValueError(f"the relaxation callable must return the relaxed mass at each draft, shape "
                             f"{tuple(drafts.shape)}; got {tuple(mass.shape)}")
    else:
        if relaxed.shape != p.shape:
            raise ValueError(f"relaxed probabilities must have p's shape {tuple(p.shape)}; got "
                             f"{tuple(relaxed.shape)}")
        mass = relaxed.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    mass = mass.float()
    if bool((~mass.isfinite()).any() | (mass < 0).any()):
        raise ValueError("the relaxed target mass must be finite and non-negative")
    return mass


def verify_drafts(p_logits: Tensor, q_probs: Tensor, drafts: Tensor, generator: torch.Generator | None,
                  p_accept_probs: Tensor | Relaxation | None = None,
                  residual_q: Tensor | ResidualQ | None = None) -> Verified:
    """Verifies B chains of L drafted tokens against the target, all rows and positions at once.

    Args:
        p_logits: (B, L, V) the target's logits at the drafted positions as the family's sampler filters and
            scales them (`Draw.logits`), so that their softmax is p.
        q_probs: (B, L, V) the distribution each draft was drawn from (rows sum to 1).
        drafts: (B, L) int64 drafted tokens, position i drawn from q_probs[:, i].
        generator: the stream the loop owns; consumed as the module docstring says.
        p_accept_probs: None for exact speculative sampling. Else LANTERN's relaxation, used in the acceptance ratio
            only: a (B, L, V) tensor of relaxed target probabilities p̃, or a callable (p, drafts) -> (B, L)
            giving p̃ at each draft.
        residual_q: (B, L, V) what to subtract from p to build the replacement distribution, or a callable
            (p, drafts) -> (B, L, V) when it depends on p; None = q_probs. LANTERN's code passes q with the
            draft's neighbourhood zeroed.

    Returns:
        Verified: per row, the accepted prefix plus one replacement at the first rejection.
    """
    _check_inputs(p_logits, q_probs, drafts)
    b, n, _ = p_logits.shape
    p = p_logits.float().softmax(dim=-1)  # (B, L, V)
    if callable(residual_q):
        residual_q = residual_q(p, drafts)
    if residual_q is not None and residual_q.shape != p_logits.shape:
        raise ValueError(f"residual_q must have p_logits' shape {tuple(p_logits.shape)}; got "
                         f"{tuple(residual_q.shape)}")
    q = q_probs.float()
    at_draft = drafts.unsqueeze(-1)
    if p_accept_probs is None:
        p_x = p.gather(-1, at_draft).squeeze(-1)  # (B, L)
    else:
        p_x = _relaxed_mass(p_accept_probs, p, drafts)  # (B, L) LANTERN's p~ in the ratio only
    q_x = q.gather(-1, at_draft).squeeze(-1)  # (B, L)

    uniforms = torch.rand((b, n), generator=generator, device=p.device)  # (B, L), one per position
    # u < min(1, p/q) written without the division: P(u·q < p) = min(1, p/q) for u ~ U[0, 1); p(x) = 0 never
    # accepts, q(x) = 0 < p(x) always does.
    accept = uniforms * q_x < p_x  # (B, L)
    accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # (B,) length of the all-accepted prefix
    rejected = accepted < n  # (B,)

    # The replacement distribution at position `accepted`, the first rejection (clamped to L - 1 for the rows
    # that rejected nothing, whose draw is discarded).
    at_rejection = accepted.clamp(max=n - 1).view(b, 1, 1).expand(b, 1, p.shape[-1])
    p_r = p.gather(1, at_rejection).squeeze(1)  # (B, V)
    q_r = (q if residual_q is None else residual_q.float()).gather(1, at_rejection).squeeze(1)  # (B, V)
    residual = (p_r - q_r).clamp(min=0)  # (B, V)
    # An all-zero residual means p <= q everywhere, i.e. p == q: nothing to correct, so draw from p.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_r)
    replacement = torch.multinomial(residual, num_samples=1, generator=generator).squeeze(-1)  # (B,)

    positions = torch.arange(n, device=drafts.device)  # (L,)
    tokens = torch.where(rejected.unsqueeze(-1) & (positions == accepted.unsqueeze(-1)),
                         replacement.unsqueeze(-1), drafts)  # (B, L)
    n_new = accepted + rejected.long()
    valid = positions < n_new.unsqueeze(-1)  # (B, L)
    return Verified(tokens, accepted, n_new, valid, replacement)
