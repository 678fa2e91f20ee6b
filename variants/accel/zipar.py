"""ZipAR, spatially parallel decoding (He et al., arXiv:2412.04062), a training-free raster acceleration of
LlamaGen, written from ThisisBillhe/ZipAR@2a5695ca LlamaGen-ZipAR/autoregressive/models/generate_zipar.py and
gpt.py (docs/LLAMAGEN_SPEC.md, "Speculative decoding hooks"); nothing is copied.

Next-set prediction: the first row is decoded token by token (the official `prefill` + `decode_n_tokens`); then a
row starts once the row above holds `window` tokens, and every row in progress gets one token per network call.
The schedule depends on the grid and the window only, so it is built before the call (`zipar_schedule`, a
simulation of the official row bookkeeping on counts):
  - a row's input is its own latest token, at that token's sequence position (1 + raster index);
  - a new row r + 1 (r + 1 >= 2) starts from a stand-in token, the latest token of row r − 1, fed at the slot of
    row r's last cell (not yet decoded), whose output predicts the row's first token;
  - when a row completes, the next call also feeds its last token at that slot (its logits are dropped), which
    overwrites the stand-in's keys and values.
Attention is the plain causal mask over sequence positions, as the official model's `causal_mask[:, None,
input_pos]`: slots not yet decoded hold zero keys and values (the official cache is zeros, allocated per call),
so this method zeroes the engine's kept buffer at the start of a call. The tokens sampled in a call are drawn in
the order the rows started (the sampler's position-major multinomial equals the official per-position calls).
Guidance stops past `cfg_interval` as in the official code: in the first row by the token index, afterwards by
the count of tokens the parallel phase has made before the call.

Default: window 8, the official c2i script's (sample_c2i_ddp_zipar.py `--zipar-window-size`, default 8).
`window = 0` is the official switch-off (the script then imports the plain generate): plain LlamaGen, token for
token. Windows >= the grid side are refused: a row would start as the row above completes, and the official
bookkeeping then feeds two tokens at one slot in one call.

Conformance: every token equals the official code's at windows 8 and 4 (greedy, CFG, cfg_interval and the
official default sampling) and at window 0, in engine and reference modes (../conformance/zipar_tiny,
harness/conformance/zipar.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from varbench.harness.core.loop import Step, StepOutput

from .base import check_int
from .raster import RasterAcceleration

__all__ = ["ZipAR", "ZipStep", "zipar", "zipar_schedule"]


@dataclass(frozen=True)
class ZipStep:
    """One network call: the raster tokens fed (−1: the class token), their sequence positions, the raster
    tokens sampled from the last len(out) fed positions, and the parallel-phase count before it."""

    feed: tuple[int, ...]
    positions: tuple[int, ...]
    out: tuple[int, ...]
    made_before: int = -1  # tokens the parallel phase made before this call; −1 in the first row


def _first_row(grid: int) -> list[ZipStep]:
    """The class prefill, then token t fed at position t + 1 for token t + 1 (the plain raster steps)."""
    return [ZipStep((-1,), (0,), (0,))] + [ZipStep((t - 1,), (t,), (t,)) for t in range(1, grid)]


def zipar_schedule(grid: int, window: int) -> list[ZipStep]:
    """Every call of a grid x grid generation; window 0 gives the plain raster schedule."""
    if window == 0:
        return _first_row(grid * grid)
    steps = _first_row(grid)
    count = [grid] + [0] * (grid - 1)  # tokens decoded per row
    ongoing, stand_in = [1], {}  # rows in progress; row -> the raster token fed for its first prediction
    done_last, made = None, 0  # the completed row's last token, fed once more; parallel-phase tokens so far
    while sum(count) < grid * grid:
        feed, out = [], []
        if done_last is not None:
            feed.append(done_last)
        for r in ongoing:
            feed.append(stand_in.pop(r) if r in stand_in else r * grid + count[r] - 1)
            out.append(r * grid + count[r])
        positions = [1 + done_last] if done_last is not None else []
        positions += [1 + r * grid + count[r] - 1 for r in ongoing]
        steps.append(ZipStep(tuple(feed), tuple(positions), tuple(out), made))
        done_last, finished = None, []
        for r in list(ongoing):  # in the order the rows started, as the official sampling loop
            count[r] += 1
            made += 1
            if count[r] == window and r < grid - 1 and r + 1 not in ongoing:
                stand_in[r + 1] = (r - 1) * grid + count[r - 1] - 1  # the latest token of the row above r
                ongoing.append(r + 1)
            if count[r] == grid:
                done_last = r * grid + grid - 1
                finished.append(r)
        ongoing = [r for r in ongoing if r not in finished]
    return steps


class ZipAR(RasterAcceleration):
    name = "zipar"
    defaults: ClassVar[dict[str, Any]] = {"window": 8}
    unverified: ClassVar[tuple[str, ...]] = ()

    def check(self) -> None:
        check_int(self.name, "window", self.args["window"])

    def supports(self, variant) -> None:
        super().supports(variant)
        if self.args["window"] >= variant.cfg.grid:
            raise ValueError(f"acceleration 'zipar': window must be 0 (off) or below the grid side "
                             f"{variant.cfg.grid}, got {self.args['window']}")

    def schedule(self, variant) -> list[Step]:
        self._plan = zipar_schedule(variant.cfg.grid, self.args["window"])
        return [Step(0, i, self._guided(variant, z)) for i, z in enumerate(self._plan)]

    def begin(self, variant, state):
        acc = super().begin(variant, state)
        acc.work["plan"] = self._plan
        acc.work["positions"] = [torch.tensor(z.positions, device=state.tokens.device) for z in self._plan]
        if self.args["window"]:  # slots not yet decoded are read (zero), as in the official fresh cache
            state.cache.k.zero_()
            state.cache.v.zero_()
        return acc

    @staticmethod
    def _guided(variant, z: ZipStep) -> float:
        if z.made_before < 0:
            return variant.guided_at(z.out[0])
        return 0.0 if -1 < variant.cfg_interval < z.made_before else 1.0

    def forward(self, variant, state, step: Step) -> StepOutput:
        z = state.accel.work["plan"][step.sub]
        x = state.x if z.feed == (-1,) else variant.embed_rows(state, state.tokens[:, list(z.feed)])
        logits = variant.run(state, x, state.accel.work["positions"][step.sub])
        state.cache.length = max(state.cache.length, max(z.positions) + 1)
        return StepOutput(logits[:, len(z.feed) - len(z.out):], guided=state.guided)

    def commit(self, variant, state, step: Step, draw) -> None:
        z = state.accel.work["plan"][step.sub]
        variant.write_tokens(state, draw.tokens, at=torch.tensor(z.out, device=state.tokens.device))
        self.finish_step(variant, state, len(z.out))


def zipar(**kwargs: Any) -> ZipAR:
    """ZipAR, spatially parallel decoding (arXiv:2412.04062): a row starts once the row above holds `window`
    tokens, and every row in progress decodes one token per call. Args: window (0 = plain decoding)."""
    return ZipAR(**kwargs)
