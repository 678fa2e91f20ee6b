"""StageVAR (Li et al. 2025, arXiv:2512.16483): guidance off and low-rank compute in the late stage.

From the paper (its repository sen-mao/StageVAR@7542da1 holds a README only, no code): VAR inference has a
semantic, a structure and a fidelity-refinement stage; the first two run unchanged, the last (a few final
scales) (1) drops the prompt conditioning: classifier-free guidance set to 0, one branch of the pair computed,
summaries say the null prompt's; (2) works in a low-rank feature space: a random projection (RP) instead of an
SVD gives a compact representation, and representative-token restoration (RTR) fills in the other tokens; the
rank comes from offline statistics.

The RTR details are not public, so this is varbench's reading, unverified: per sublayer of every block, a
spatially uniform grid of `rank_ratio` of the tokens (the representatives) goes through the sublayer, and every
other token takes the update of the representative most similar to it (cosine) in a seeded Gaussian random
projection of the sublayer's input to `proj_dim` dimensions. For VAR the late stage is the last `late_steps`
scales (Infinity's refinement stage is its last three scales of 13): unverified. `branch` = "uncond" (the null
class, as "CFG 0" in Infinity's convention) or "cond".

On Infinity (`accel_family` "infinity"): the late stage is its last 3 scales (40, 48, 64 of the 1M schedule: the
paper's Fig. 1 analysis has structure converging by scale 32), the late scales run the null-prompt branch (CFG
0), and the representatives keep their own 2-D RoPE positions (the plan's `index`). No code or table giving the
rank is public to us, so `late_steps`, `rank_ratio` and `proj_dim` stay unverified on Infinity too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Acceleration, StepPlan, check_fraction, check_int, grid_of

__all__ = ["StageVAR", "grid_representatives"]


def grid_representatives(pn: int, ratio: float, device: torch.device, width: int | None = None) -> Tensor:
    """Raster indices of a uniform grid over a pn×pn map (pn×width where given): per axis of n tokens,
    round(n·√ratio) (at least 1) evenly spaced centres."""
    width = width or pn

    def centres(n: int) -> Tensor:
        side = max(1, min(n, round(n * math.sqrt(ratio))))
        return ((torch.arange(side, device=device) + 0.5) * n / side).floor().long()

    return (centres(pn).view(-1, 1) * width + centres(width).view(1, -1)).flatten()


class _LowRank:
    """The BlockPlan of a late scale: each sublayer on the representatives, the rest restored from them."""

    attend = None

    def __init__(self, reps: Tensor, projection: Tensor):
        self.reps, self.projection = reps, projection
        self.index: Tensor | None = None  # positions of the tokens `fn` computes (Infinity's RoPE reads them)

    def sublayer(self, layer: int, kind: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        z = torch.nn.functional.normalize(x.float() @ self.projection, dim=-1)  # (rows, n, k)
        nearest = (z @ z[:, self.reps].transpose(1, 2)).argmax(-1)  # (rows, n): index into reps
        nearest[:, self.reps] = torch.arange(len(self.reps), device=x.device)  # a representative keeps its own
        self.index = self.reps.expand(x.shape[0], -1)
        try:
            update = fn(x[:, self.reps])
        finally:
            self.index = None
        return update.gather(1, nearest.unsqueeze(-1).expand(-1, -1, update.shape[-1]))


class StageVAR(Acceleration):
    name = "stagevar"
    defaults: ClassVar[dict[str, Any]] = {"late_steps": 2, "branch": "uncond", "rank_ratio": 0.5,
                                          "proj_dim": 16, "seed": 0}
    unverified: ClassVar[tuple[str, ...]] = ("late_steps", "branch", "rank_ratio", "proj_dim")
    families = ("var", "infinity")
    family_defaults: ClassVar[dict[str, dict[str, Any]]] = {"infinity": {"late_steps": 3}}
    family_unverified: ClassVar[dict[str, tuple[str, ...]]] = {"infinity": ("late_steps", "rank_ratio", "proj_dim")}

    def check(self) -> None:
        check_int(self.name, "late_steps", self.args["late_steps"])
        if self.args["branch"] not in ("uncond", "cond", "both"):
            raise ValueError(f"acceleration 'stagevar': branch must be uncond, cond or both (guidance kept), "
                             f"got {self.args['branch']!r}")
        check_fraction(self.name, "rank_ratio", self.args["rank_ratio"], low_open=True)
        check_int(self.name, "proj_dim", self.args["proj_dim"], 1)
        check_int(self.name, "seed", self.args["seed"])
        self._projections: dict[tuple[int, str], Tensor] = {}

    def supports(self, variant) -> None:
        super().supports(variant)
        if self.args["late_steps"] >= len(variant.patch_nums):
            raise ValueError(f"acceleration 'stagevar': late_steps = {self.args['late_steps']} leaves no early "
                             f"stage among the model's {len(variant.patch_nums)} scales")

    def _projection(self, width: int, device: torch.device) -> Tensor:
        key = (width, str(device))
        if key not in self._projections:
            gen = torch.Generator().manual_seed(self.args["seed"])
            self._projections[key] = torch.randn(width, self.args["proj_dim"], generator=gen).to(device)
        return self._projections[key]

    def plan(self, variant, state, step) -> StepPlan:
        si, acc = step.si, state.accel
        if si < len(variant.patch_nums) - self.args["late_steps"]:
            return StepPlan()
        rows = self.args["branch"]
        h, w = grid_of(variant, si)
        reps = grid_representatives(h, self.args["rank_ratio"], variant.device, w)
        if len(reps) == h * w:
            return StepPlan(rows=rows)
        acc.tokens_per_scale[si] = len(reps)
        return StepPlan(rows=rows, blocks=_LowRank(reps, self._projection(variant.cfg.width, variant.device)))


def stagevar(**kwargs: Any) -> StageVAR:
    """StageVAR (Li et al. 2025, arXiv:2512.16483): guidance off and low-rank compute in the late stage.

    Defaults for VAR (unverified, the paper's settings are Infinity's and STAR's): the last 2 scales run one CFG
    branch (the null class) on a grid of half their tokens, the others restored from the most similar
    representative in a 16-d random projection. On Infinity the late stage is its last 3 scales (the paper's
    fidelity-refinement stage), the other defaults as VAR's, all unverified. late_steps=0 disables it."""
    return StageVAR(**kwargs)
