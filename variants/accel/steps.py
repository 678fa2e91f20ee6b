"""How a VAR model runs one step and one commit under an acceleration's plan (called from variants/var.py).

Nothing here samples or loops: the loop (harness/core/loop.py) still calls forward, draws, and commits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from varbench.harness.core.loop import Step, StepOutput

from .base import StepPlan, narrow_cache, rows_slice

__all__ = ["accelerated_forward", "freeze_rows", "skipped_output"]


def accelerated_forward(variant, state, step: Step) -> StepOutput:
    """VAR.forward under `variant.acceleration`: skip, drop a CFG half, or run the blocks with a plan."""
    accel, acc = variant.acceleration, state.accel
    si, b = step.si, len(state.labels)
    plan: StepPlan = accel.plan(variant, state, step)
    n = variant.patch_nums[si] ** 2
    if plan.skip:
        acc.skipped[:, si] = True
        acc.tokens_per_scale[si] = acc.rows_per_scale[si] = 0
        return skipped_output(b, n, state.x.device)
    if plan.rows != acc.rows:
        if acc.rows != "both":
            raise ValueError(f"acceleration {accel.name!r}: scale {si} asks for CFG rows {plan.rows!r} after "
                             f"an earlier scale kept only {acc.rows!r}; a dropped half cannot come back")
        acc.rows = plan.rows
    rows = rows_slice(plan.rows, b)
    if state.cache_rows != plan.rows:  # this model's cache: narrowed once, when its first unguided step runs
        state.cache, state.cache_rows = narrow_cache(state.cache, rows), plan.rows
    with variant._autocast():
        mods = state.mods if state.mods is not None else variant.net.modulations(state.cond)
        head = state.head_mod if state.head_mod is not None else variant.net.head_modulation(state.cond)
        if plan.rows != "both":
            mods = [tuple(t[rows] for t in m) for m in mods]
            head = tuple(t[rows] for t in head)
        if plan.blocks is None:  # the engine's own step (compiled where the engine compiles)
            logits = variant._step_fn(state.x[rows], mods, head, state.cache)
        else:  # a plan's Python-side choices run eagerly
            logits = variant.net.logits(variant.net.run_blocks(state.x[rows], mods, state.cache, plan=plan.blocks),
                                        head)
    if plan.unguided is not None and plan.rows == "both":
        logits[b:][plan.unguided] = logits[:b][plan.unguided]
    acc.rows_per_scale[si] = logits.shape[0]
    acc.tokens_per_scale.setdefault(si, n)  # a token-subset plan records its own count
    return StepOutput(logits, guided=plan.rows == "both")


def skipped_output(batch: int, n: int, device: torch.device) -> StepOutput:
    """A step every sample skips. The loop (harness/core/loop.py) samples every step it runs; until it lets a
    variant skip one, a skipped step hands it a one-entry vocabulary: the draw costs B·n trivial rows, takes
    token 0 everywhere, and the commit adds nothing (`freeze_rows` keeps every latent as it was)."""
    return StepOutput(torch.zeros(batch, n, 1, device=device), guided=False)


def freeze_rows(variant, state, si: int, h: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
    """Adds scale si to f_hat except for the samples the acceleration freezes at si; returns the next input
    (as VQVAE.next_input) and the frozen (B,) mask (None when no sample is frozen)."""
    frozen = variant.acceleration.frozen_rows(variant, state, si)
    if frozen is None:
        return variant.vae.next_input(si, variant.patch_nums, state.f_hat, h), None
    before = state.f_hat.clone()
    variant.vae.next_input(si, variant.patch_nums, state.f_hat, h)
    state.f_hat[frozen] = before[frozen]
    if si < len(variant.patch_nums) - 1:
        nxt = F.interpolate(state.f_hat, size=(variant.patch_nums[si + 1],) * 2, mode="area")
    else:
        nxt = state.f_hat
    tokens[frozen] = -1  # a frozen sample generated nothing at this scale
    return nxt, frozen
