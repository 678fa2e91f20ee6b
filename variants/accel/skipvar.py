"""SkipVAR (Li et al. 2025, arXiv:2506.08908): per-sample step skipping and unconditional-branch dropping.

Facts from fakerone-li/SkipVAR@607be0e (infinity/models/infinity.py `autoregressive_infer_cfg_SkipVAR`), written
here without its code: after the decision step (index 9 of Infinity's 13 scales, three steps before the end)
the latents after it and after the step before are resized to a small map (Infinity's scale-4 size, 8x8),
decoded, and two frequency features are read: the mean absolute difference of their Sobel gradient magnitudes
(`diff_hf`) and the share of FFT amplitude outside a centred circle of radius 0.4·min(H, W)/2 in the newer
image (`hf_ratio`). Released logistic-regression deciders map them to "skip the last k steps" (k in 0..3) or,
when k = 0, "drop the unconditional branch in the last k steps" (the conditional logits alone are sampled).

Here the decision is SkipVAR's training-free rule, not its learned deciders (a learned decider would train with
the project's trainer on the same two features): a sample whose high frequencies changed less than
`skip_threshold` at the decision step skips its last `skip_steps` steps; otherwise one whose high-frequency
share is below `uncond_threshold` drops its unconditional branch in the last `uncond_steps` steps. Both
thresholds and step counts, and the decision step for VAR's schedules (`decide_at`: three steps before the
end, as on Infinity), are unverified. On Infinity (infer4SkipVAR.py, `autoregressive_infer_cfg_SkipVAR`) the
decision step, the probe (f̂ resized trilinearly to scale 4's 8x8 grid, `Infinity.probe_image`) and the FFT
radius are the official ones; a skipped step is not run (`break`), an unconditional-dropped one runs the
conditional rows only (`last_stage[:B]`), as here. Decisions are per sample: a step runs while any sample
needs it, and a sample that skipped it keeps its latent.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Acceleration, StepPlan, check_fraction, check_int

__all__ = ["SkipVAR", "high_freq_features"]


def _sobel_magnitude(img: Tensor) -> Tensor:
    gray = img.float().mean(dim=1, keepdim=True)
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=img.device).view(1, 1, 3, 3)
    gx, gy = F.conv2d(gray, kx, padding=1), F.conv2d(gray, kx.transpose(2, 3), padding=1)
    return (gx**2 + gy**2).sqrt()


def _high_freq_ratio(img: Tensor, freq_ratio: float) -> Tensor:
    """(B,) share of the centred FFT amplitude of the grey image outside radius freq_ratio·min(H, W)/2."""
    gray = img.float().mean(dim=1)
    amplitude = torch.fft.fftshift(torch.fft.fft2(gray), dim=(-2, -1)).abs()
    h, w = amplitude.shape[-2:]
    y = torch.arange(h, device=img.device).view(-1, 1) - h // 2
    x = torch.arange(w, device=img.device).view(1, -1) - w // 2
    outside = (y**2 + x**2).float().sqrt() > int(freq_ratio * min(h, w) / 2)
    return (amplitude * outside).sum((-2, -1)) / (amplitude.sum((-2, -1)) + 1e-6)


def high_freq_features(new: Tensor, old: Tensor, freq_ratio: float = 0.4) -> tuple[Tensor, Tensor]:
    """Per-sample (diff_hf, hf_ratio) of two decoded images (B, 3, H, W)."""
    diff = (_sobel_magnitude(new) - _sobel_magnitude(old)).abs().mean((1, 2, 3))
    return diff, _high_freq_ratio(new, freq_ratio)


class SkipVAR(Acceleration):
    name = "skipvar"
    defaults: ClassVar[dict[str, Any]] = {"decide_at": -4, "skip_threshold": 0.05, "skip_steps": 1,
                                          "uncond_threshold": 0.5, "uncond_steps": 2, "probe_side": 8,
                                          "freq_ratio": 0.4}
    unverified: ClassVar[tuple[str, ...]] = ("decide_at", "skip_threshold", "skip_steps", "uncond_threshold",
                                             "uncond_steps")
    families = ("var", "infinity")
    # On Infinity the decision step (index 9 of 13 = -4), the 8x8 probe and freq_ratio 0.4 are the official code's;
    # the rule's thresholds and step counts stand in for its learned deciders.
    family_unverified: ClassVar[dict[str, tuple[str, ...]]] = {
        "infinity": ("skip_threshold", "skip_steps", "uncond_threshold", "uncond_steps")}

    def check(self) -> None:
        if isinstance(self.args["decide_at"], bool) or not isinstance(self.args["decide_at"], int):
            raise ValueError(f"acceleration 'skipvar': decide_at must be a scale index (negative: from the end), "
                             f"got {self.args['decide_at']!r}")
        for arg in ("skip_threshold", "uncond_threshold"):
            v = self.args[arg]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"acceleration 'skipvar': {arg} must be a number >= 0 (0 = never), got {v!r}")
        for arg in ("skip_steps", "uncond_steps"):
            check_int(self.name, arg, self.args[arg])
        check_int(self.name, "probe_side", self.args["probe_side"], 1)
        check_fraction(self.name, "freq_ratio", self.args["freq_ratio"])

    def _decision_step(self, variant) -> int:
        s, d = len(variant.patch_nums), self.args["decide_at"]
        return d % s if -s <= d < s else -1

    def supports(self, variant) -> None:
        super().supports(variant)
        s, d = len(variant.patch_nums), self._decision_step(variant)
        if not 1 <= d < s - 1:
            raise ValueError(f"acceleration 'skipvar': decide_at {self.args['decide_at']} must name a scale with a "
                             f"scale before and after it (1..{s - 2}, or -{s - 1}..-2)")
        for arg in ("skip_steps", "uncond_steps"):
            if self.args[arg] > s - 1 - d:
                raise ValueError(f"acceleration 'skipvar': {arg} = {self.args[arg]} but only {s - 1 - d} steps "
                                 f"follow the decision step")

    def begin(self, variant, labels: Tensor, join: bool = False):
        state = super().begin(variant, labels, join)  # joined: the drafter's decisions hold
        zeros = torch.zeros(len(labels), dtype=torch.long, device=labels.device)
        state.per_model.setdefault("skipvar", {"skip": zeros, "uncond": zeros.clone()})
        return state

    # -- decision --------------------------------------------------------------------------------
    def after_commit(self, variant, state, si: int) -> None:
        d, mine = self._decision_step(variant), state.accel.per_model["skipvar"]
        if si == d - 1:
            mine["before"] = state.f_hat.clone()
        elif si == d:
            self._decide(variant, state, mine)

    def _probe(self, variant, f_hat: Tensor) -> Tensor:
        side = min(self.args["probe_side"], variant.patch_nums[-1])
        if hasattr(variant, "probe_image"):  # Infinity: its latent layout and the official trilinear resize
            return variant.probe_image(f_hat, side)
        small = F.interpolate(f_hat, size=(side, side), mode="area")
        with variant._autocast():
            return variant.vae.decode(small.to(variant.vae.post_quant_conv.weight.dtype))

    def _decide(self, variant, state, mine: dict) -> None:
        diff, ratio = high_freq_features(self._probe(variant, state.f_hat), self._probe(variant, mine.pop("before")),
                                         self.args["freq_ratio"])
        skip = diff < self.args["skip_threshold"]
        uncond = ~skip & (ratio < self.args["uncond_threshold"])
        mine["skip"] = skip.long() * self.args["skip_steps"]
        mine["uncond"] = uncond.long() * self.args["uncond_steps"]
        state.accel.decisions.update({"diff_hf": diff.tolist(), "hf_ratio": ratio.tolist(),
                                      "skip_steps": mine["skip"].tolist(), "uncond_steps": mine["uncond"].tolist()})

    # -- steps -----------------------------------------------------------------------------------
    def _late(self, variant, si: int, counts: Tensor) -> Tensor:
        """(B,) bool: samples whose last `counts[b]` steps include scale si."""
        return si >= len(variant.patch_nums) - counts

    def plan(self, variant, state, step) -> StepPlan:
        acc, si = state.accel, step.si
        mine = acc.per_model["skipvar"]
        skip = self._late(variant, si, mine["skip"])
        if bool(skip.all()):
            return StepPlan(skip=True, rows=acc.rows)
        active = ~skip
        uncond = self._late(variant, si, mine["uncond"])
        if bool(uncond[active].all()) and acc.rows != "uncond":
            return StepPlan(rows="cond")
        return StepPlan(rows=acc.rows, unguided=uncond if bool(uncond.any()) else None)

    def frozen_rows(self, variant, state, si: int) -> Tensor | None:
        skip = self._late(variant, si, state.accel.per_model["skipvar"]["skip"])
        if not bool(skip.any()):
            return None
        state.accel.skipped[:, si] |= skip
        return skip


def skipvar(**kwargs: Any) -> SkipVAR:
    """SkipVAR (Li et al. 2025, arXiv:2506.08908): per-sample late-step skipping / unconditional-branch dropping.

    The training-free rule on SkipVAR's two frequency features (not its learned deciders): skip the last
    skip_steps steps when the high frequencies converged (diff_hf < skip_threshold), else drop the unconditional
    branch in the last uncond_steps steps when the high-frequency share is low. Thresholds, step counts and the
    decision step are unverified; skip_threshold=0 and uncond_threshold=0 disable it."""
    return SkipVAR(**kwargs)
