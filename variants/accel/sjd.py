"""SJD, speculative Jacobi decoding (Teng et al., ICLR 2025, arXiv:2410.01699; docs/VARIANTS.md §9), a
training-free raster acceleration of LlamaGen, written from the paper and tyshiwo1/Accelerating-T2I-AR-with-SJD
@b389cfb2 (scheduler/jacobi_iteration_lumina_mgpt.py, test_llamagen.py); nothing is copied.

Each step feeds the last final token and a window of `window` drafted tokens after it (one network evaluation).
The sampling layer draws every fed position from the target p (harness/core/sampling_verify.draw_speculative),
then verifies the drafts in order with min(1, p(x)/q(x)), q being the distribution the draft was drawn from, and
draws the first rejected one from norm(max(0, p − q)); a row that accepts the whole window keeps the draw after
it (the bonus). Past the rejection, the draws from p become the next step's drafts with q = p (the Jacobi update:
"p_prev = its probability at the previous iteration"), and the window is refilled with new drafts at its end.
A batch advances by the fewest tokens any row made final (the official code takes the minimum over the batch,
`min(first_misaligned_token_inds)`); a row's further verified tokens stay in its window as drafts.

New drafts (`init`): "random", a uniform token (the code's default scheme), or "repeat_horizon", the token to the
left in the raster (random in column 0), which the official LlamaGen script uses; both with a one-hot q, as the
code's `scores_of_rand_tokens`. The official code draws them from the global RNG; here a generator of the
method's own, seeded with `init_seed`, draws them, so the loop's stream order is the verify step's alone.

Defaults: window 16 and init "repeat_horizon" are those of the official LlamaGen script (test_llamagen.py
`get_jacobi_param_dict`: max_num_new_tokens = 16, multi_token_init_scheme = 'repeat_horizon'), published for the
text-to-image LlamaGen only: for c2i they are unverified, as is init_seed (ours). The official Jacobi range
(jacobi_loop_interval_l = 1, _r = N − window − 2) is not reproduced: the window here runs from the prefill on and
shrinks at the end of the image, and before the first token past `cfg_interval` (one guidance setting per
network call, so that the call's tokens are guided as plain decoding guides them). The random stream's
consumption is verify_drafts' (documented there), not the official per-(row, vocab) uniforms. `window = 0`
feeds one position per step: plain LlamaGen, token for token.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from varbench.harness.core.loop import Step, StepOutput
from varbench.harness.core.sampling_verify import Drafts

from .base import check_int
from .raster import RasterAcceleration, one_hot_probs

__all__ = ["INITS", "SJD", "sjd"]

INITS = ("random", "repeat_horizon")


class SJD(RasterAcceleration):
    name = "sjd"
    defaults: ClassVar[dict[str, Any]] = {"window": 16, "init": "repeat_horizon", "init_seed": 0}
    unverified: ClassVar[tuple[str, ...]] = ("window", "init", "init_seed")

    def check(self) -> None:
        check_int(self.name, "window", self.args["window"])
        check_int(self.name, "init_seed", self.args["init_seed"])
        if self.args["init"] not in INITS:
            raise ValueError(f"acceleration {self.name!r}: init must be one of {', '.join(INITS)}, "
                             f"got {self.args['init']!r}")

    def begin(self, variant, state):
        acc = super().begin(variant, state)
        b, device = len(state.labels), state.tokens.device
        acc.work["drafts"] = torch.zeros(b, 0, dtype=torch.long, device=device)  # (B, c) carried drafts
        acc.work["q"] = torch.zeros(b, 0, variant.cfg.vocab_size, device=device)  # (B, c, V) their q
        acc.work["gen"] = torch.Generator(device=device).manual_seed(self.args["init_seed"])
        return acc

    # -- what a variant of the method changes (LANTERN) -------------------------------------------------
    def relaxation(self, variant, q: Tensor) -> tuple[Any, Any]:
        """(p_accept_probs, residual_q) for verify_drafts; SJD verifies exactly."""
        return None, None

    # -- hooks -------------------------------------------------------------------------------------------
    def forward(self, variant, state, step: Step) -> StepOutput:
        n = state.filled
        m = min(self.args["window"], variant.cfg.block_size - 1 - n)  # output m predicts token n + m <= N - 1
        first_unguided = variant.cfg_interval + 2  # cfg_steps: token t is guided unless t - 1 > cfg_interval
        if variant.cfg_interval > -1 and n < first_unguided:  # one guidance setting per step: stop the window
            m = min(m, first_unguided - 1 - n)  # before the first unguided token
        if m <= 0:
            return StepOutput(variant.run(state, state.x, n), guided=state.guided)
        drafts, q = self._window(variant, state, m)  # (B, m), (B, m, V)
        x = torch.cat([state.x, variant.embed_rows(state, drafts)], dim=1)
        relax, residual = self.relaxation(variant, q)
        return StepOutput(variant.run(state, x, n), guided=state.guided, drafts=Drafts(drafts, q, relax, residual))

    def commit(self, variant, state, step: Step, draw) -> None:
        acc = state.accel
        verified = getattr(draw, "verified", None)
        k = 1 if verified is None else int(draw.final.min())  # the batch advances by its slowest row
        if verified is not None:
            acc.drafts_proposed += verified.tokens.numel()
            acc.drafts_accepted += int(verified.accepted.sum())
            acc.work["drafts"] = draw.tokens[:, k:]
            acc.work["q"] = draw.logits[:, k:].float().softmax(dim=-1)  # the Jacobi update: next q = this p
        variant.write_tokens(state, draw.tokens[:, :k])
        self.finish_step(variant, state, k)

    # -- the draft window ----------------------------------------------------------------------------------
    def _window(self, variant, state, m: int) -> tuple[Tensor, Tensor]:
        """The step's m drafts: those carried from the last step, then new ones (one-hot q)."""
        carried, q = state.accel.work["drafts"][:, :m], state.accel.work["q"][:, :m]
        new = self._new_drafts(variant, state, carried, m - carried.shape[1])
        vocab = variant.cfg.vocab_size
        return torch.cat([carried, new], dim=1), torch.cat([q, one_hot_probs(new, vocab)], dim=1)

    def _new_drafts(self, variant, state, carried: Tensor, r: int) -> Tensor:
        """(B, r) drafts for raster tokens filled + c ..., c = carried drafts: uniform, or repeated from the left."""
        b, vocab, grid = carried.shape[0], variant.cfg.vocab_size, variant.cfg.grid
        rand = torch.randint(vocab, (b, r), generator=state.accel.work["gen"], device=carried.device)
        if self.args["init"] == "random" or r == 0:
            return rand
        known = torch.cat([state.tokens[:, :state.filled], carried], dim=1)  # final tokens, then the drafts
        cols = []
        for j in range(r):
            t = known.shape[1] + j  # raster index of this draft
            cols.append(rand[:, j] if t % grid == 0 else (cols[-1] if cols else known[:, -1]))
        return torch.stack(cols, dim=1)


def sjd(**kwargs: Any) -> SJD:
    """SJD, speculative Jacobi decoding (arXiv:2410.01699): Jacobi drafts verified with min(1, p/q) along a window
    of raster tokens. Args: window (drafts per step, 0 = plain decoding), init ('random' or 'repeat_horizon'),
    init_seed (generator of the new drafts)."""
    return SJD(**kwargs)
