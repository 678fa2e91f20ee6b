"""The base of the raster (next-token) accelerations: SJD, LANTERN and ZipAR on LlamaGen (issue 16, items 2-3).

A raster acceleration is a small object the LlamaGen variant consults at every step of the one loop
(harness/core/loop.py), as a VAR model consults its `Acceleration`: it never owns a loop. Per step it answers
what the network is fed (`forward`: several positions, and drafts the sampling layer verifies with the loop's
stream) and what the draw changes (`commit`: which raster slots become final, and whether another step follows,
appended to the loop's step list). Its per-call state is a `RasterAccelState`, whose `report()` gives the recorded
metrics: network evaluations, tokens made final per step, drafts proposed and accepted, and the acceptance rate.

`apply_raster` attaches one to a raster variant (the `raster` attribute marks one) and refuses the mismatches
both ways: a raster method on a scale-wise model, and a VAR method on a raster model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from varbench.harness.core.loop import Step, StepOutput

from .base import Acceleration

__all__ = ["RasterAcceleration", "RasterAccelState", "apply_raster", "one_hot_probs"]


@dataclass
class RasterAccelState:
    """One generation's record and working state under a raster acceleration."""

    steps: list[Step]  # the loop's step list; a method whose step count depends on acceptance appends to it
    batch: int
    tokens_per_step: list[int] = field(default_factory=list)  # raster tokens made final by each network call
    drafts_proposed: int = 0  # drafted positions verified, summed over the batch's rows
    drafts_accepted: int = 0  # of them, accepted before each row's first rejection
    work: dict[str, Any] = field(default_factory=dict)  # the method's own state (carried drafts, the schedule)

    def report(self) -> dict[str, Any]:
        """The recorded metrics. Without drafts (ZipAR, or a window of 0) every decoded token is kept, so the
        acceptance rate is 1."""
        evals = len(self.tokens_per_step)
        return {"network_evals": evals, "tokens_per_step": list(self.tokens_per_step),
                "tokens_per_step_mean": sum(self.tokens_per_step) / evals if evals else 0.0,
                "drafts_proposed": self.drafts_proposed, "drafts_accepted": self.drafts_accepted,
                "acceptance_rate": self.drafts_accepted / self.drafts_proposed if self.drafts_proposed else 1.0}


class RasterAcceleration(Acceleration):
    """Base of the raster methods; subclasses override `forward` and `commit` (and `schedule` for a fixed one)."""

    family: ClassVar[str] = "raster"

    def supports(self, variant) -> None:
        if variant.engine.cuda_graphs:
            raise ValueError(f"acceleration {self.name!r} feeds several positions per step; the CUDA graph holds "
                             "the one-token step only: use an engine without cuda_graphs")

    def steps(self, variant) -> list[Step]:
        """The loop's step list for the next call, handed to `begin` (the loop asks for it before `start`)."""
        self._pending = self.schedule(variant)
        return self._pending

    def schedule(self, variant) -> list[Step]:
        """The steps known before the call: by default the prefill only, the rest appended by `commit`."""
        return [Step(0, 0, variant.guided_at(0))]

    def begin(self, variant, state) -> RasterAccelState:
        pending = getattr(self, "_pending", None)
        steps = pending if pending is not None else self.schedule(variant)
        self._pending = None
        return RasterAccelState(steps, len(state.labels))

    def forward(self, variant, state, step: Step) -> StepOutput:
        raise NotImplementedError

    def commit(self, variant, state, step: Step, draw) -> None:
        raise NotImplementedError

    def finish_step(self, variant, state, made_final: int) -> None:
        """Records a step and appends the next one while raster slots remain."""
        acc = state.accel
        acc.tokens_per_step.append(made_final)
        if state.filled < variant.cfg.block_size and len(acc.steps) == len(acc.tokens_per_step):
            acc.steps.append(Step(0, len(acc.steps), variant.guided_at(state.filled)))


def apply_raster(variant, accel: Acceleration):
    """Runs later calls of the raster `variant` with `accel` (the `none` method: plain decoding)."""
    raster = getattr(variant, "raster", False)
    family = getattr(accel, "family", "scale")
    if family == "raster" and not raster:
        raise ValueError(f"acceleration {accel.name!r} decodes raster (next-token) models such as LlamaGen; "
                         f"{getattr(variant, 'name', variant)!r} generates by scales: use none, fastvar, skipvar, "
                         "stagevar or litevar")
    if family != "raster" and accel.name != "none":
        raise ValueError(f"acceleration {accel.name!r} modifies VAR's scale steps; {variant.name!r} is a raster "
                         "(next-token) model: use none, sjd, lantern or zipar")
    if accel.name != "none":
        accel.supports(variant)
    variant.acceleration = None if accel.name == "none" else accel
    variant.acceleration_record = accel.record()
    return variant


def one_hot_probs(tokens: Tensor, vocab: int) -> Tensor:
    """(B, L) tokens -> (B, L, V) float32 distributions with all mass on each token (a deterministic draft)."""
    return torch.nn.functional.one_hot(tokens, vocab).float()
