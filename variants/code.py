"""CoDe, collaborative decoding (Chen, Ma, Fang, Wang, CVPR 2025, arXiv:2411.17787) over the one scale loop.

Matches czg1225/CoDe@bfb204de (models/var.py `autoregressive_infer_cfg_draft` / `_refine`, sample_CoDe.py);
written from docs/CODE_SPEC.md, nothing copied. A large VAR (the drafter) generates scales 0..N-1, then its KV
cache is freed and a small VAR (the refiner) prefills its own cache in ONE block-causal pass over the SOS and
the drafter's next-scale inputs of scales 1..N, samples scale N from that pass and finishes N+1..S-1 with the
ordinary cached loop, adding to the drafter's f_hat. Each model draws from its own stream seeded with g_seed;
the refiner first re-draws (and throws away) scales 0..N-1 from its conditional prefill logits, as the
official code does, so that its stream stays aligned with single-model VAR (CODE_SPEC §4-§5).

`CoDe` composes two `VAR` variants and delegates the loop's hooks to them; it is not another loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varbench.harness.core.loop import Step, StepOutput
from varbench.harness.core.registry import register_variant
from varbench.harness.core.sampling import Draw, SampleConfig

from .var import VAR, EngineConfig, VARState, build_var
from .var_model import VARConfig

__all__ = ["CoDe", "CoDeState", "CODE_SAMPLING", "FINETUNED_STEPS", "build_code", "code_flops_per_image"]

# sample_CoDe.py (the paper's FID protocol): cfg 1.5, top-k 600 at every scale, top-p 0.96 on untempered
# logits, temperature 1.1 on the 7 smallest scales and 1.0 on the last 3 (CODE_SPEC §6).
CODE_SAMPLING = SampleConfig(cfg=1.5, top_k=600, top_p=0.96, temperature=(1.1,) * 7 + (1.0,) * 3)

# Draft steps with released fine-tuned pairs on HF Zigeng/VAR_CoDe (drafter_N.pth / refiner_N.pth).
FINETUNED_STEPS = (6, 7, 8, 9)

STAGE_NAMES = ("drafter", "refiner")  # also the names of the two random streams


@dataclass
class CoDeState:
    labels: Tensor  # (B,)
    drafter: VARState
    refiner: VARState | None = None  # started at the handover, after the drafter's cache is freed
    hub: list[Tensor] = field(default_factory=list)  # non-embedded inputs (B, Cvae, pn, pn) of scales 1..N

    @property
    def f_hat(self) -> Tensor:  # one tensor: the refiner adds onto the drafter's latent in place
        return self.drafter.f_hat

    @property
    def kv_bytes(self) -> list[int]:
        """Bytes each scale's model held in its cache after that scale (drafter's, then refiner's)."""
        return self.drafter.kv_bytes + (self.refiner.kv_bytes if self.refiner else [])

    @property
    def kv_bytes_current(self) -> list[int]:
        """Bytes of each scale's own keys and values (the refiner's prefill: scales 0..N in one forward)."""
        return self.drafter.kv_bytes_current + (self.refiner.kv_bytes_current if self.refiner else [])


class CoDe:
    """Drafter for scales 0..N-1, refiner for N..S-1 (N = draft_steps; N = S is the drafter alone).

    `discard_draws=False` skips the refiner's thrown-away draws and lets it continue the drafter's stream
    instead: on CPU the same tokens (a draw consumes the stream by shape only, CODE_SPEC §5, §7), without the
    wasted head rows and sampling calls; the default is the official order.
    """

    def __init__(self, drafter: VAR, refiner: VAR, draft_steps: int, name: str = "code",
                 discard_draws: bool = True):
        if drafter.patch_nums != refiner.patch_nums:
            raise ValueError(f"drafter and refiner scale schedules differ: {drafter.patch_nums} vs "
                             f"{refiner.patch_nums}")
        if not 1 <= draft_steps <= len(drafter.patch_nums):
            raise ValueError(f"draft_steps must be in 1..{len(drafter.patch_nums)}, got {draft_steps}")
        if drafter.device != refiner.device or drafter.engine != refiner.engine:
            raise ValueError("drafter and refiner must share one device and one engine configuration")
        if refiner.vae is not drafter.vae:  # the token maps and f_hat are handed over as is
            raise ValueError("drafter and refiner must share one VQVAE module: build the refiner with "
                             "build_var(..., vae=drafter.vae) or VAR(net, drafter.vae, ...)")
        self.drafter, self.refiner, self.draft_steps, self.name = drafter, refiner, draft_steps, name
        self.discard_draws = discard_draws
        self.models = {"drafter": drafter, "refiner": refiner}
        self.patch_nums, self.device, self.engine = drafter.patch_nums, drafter.device, drafter.engine
        self.num_classes, self.vae, self.dtype = drafter.num_classes, drafter.vae, drafter.dtype
        self.cfg: VARConfig = drafter.cfg  # the schedule; per-model numbers come from `stages()` and `models`
        self.net = nn.ModuleList([drafter.net, refiner.net])  # parameter counts cover both models
        self.weights = f"drafter {drafter.weights}; refiner {refiner.weights}"

    @property
    def handover(self) -> bool:
        return self.draft_steps < len(self.patch_nums)

    def stages(self) -> list[tuple[str, tuple[int, ...]]]:
        """(model name, scale indices it samples), in run order; the refiner's prefill belongs to scale N."""
        n, s = self.draft_steps, len(self.patch_nums)
        out = [("drafter", tuple(range(n)))]
        return out + [("refiner", tuple(range(n, s)))] if self.handover else out

    depth = property(lambda self: self.drafter.depth)
    has_kv_cache: bool = True
    default_sampling: SampleConfig | None = None  # code_d30_d16: CODE_SAMPLING
    vae_decode_flops = VAR.vae_decode_flops
    kv_report = VAR.kv_report
    param_count = VAR.param_count
    param_bytes = VAR.param_bytes

    def flops_per_image(self) -> float:
        return code_flops_per_image(self.drafter.cfg, self.refiner.cfg, self.draft_steps, self.discard_draws)

    # -- hooks -----------------------------------------------------------------------------------
    def steps(self) -> Sequence[Step]:
        last = len(self.patch_nums) - 1
        refined = STAGE_NAMES[1] if self.discard_draws else STAGE_NAMES[0]
        return [Step(si, 0, si / last, refined if si >= self.draft_steps else STAGE_NAMES[0])
                for si in range(last + 1)]

    def start(self, labels: Tensor) -> CoDeState:
        d = self.drafter
        # The drafter's static cache only needs its own scales (CUDA graphs capture every scale: full size).
        short = self.handover and d is not self.refiner and not self.engine.cuda_graphs
        return CoDeState(labels, d.start(labels, d.net.begin_ends[self.draft_steps - 1][1] if short else None))

    def forward(self, state: CoDeState, step: Step) -> StepOutput:
        if step.si < self.draft_steps:
            return self.drafter.forward(state.drafter, step)
        if step.si == self.draft_steps:
            return self._prefill(state)
        return self.refiner.forward(state.refiner, step)

    def commit(self, state: CoDeState, step: Step, draw: Draw) -> None:
        si = step.si
        if si >= self.draft_steps:
            self.refiner.commit(state.refiner, step, draw)
            return
        self.drafter.commit(state.drafter, step, draw)
        if self.handover:
            # The next scale's input before word_embed: what VQVAE.next_input returned inside the commit.
            side = self.patch_nums[si + 1]
            state.hub.append(F.interpolate(state.drafter.f_hat, size=(side, side), mode="area"))
            if si == self.draft_steps - 1:
                self.drafter.release_cache(state.drafter)  # freed before the refiner allocates its own

    def tokens(self, state: CoDeState) -> list[Tensor]:
        return state.drafter.tokens + (state.refiner.tokens if state.refiner else [])

    def decode(self, state: CoDeState) -> Tensor:
        """(B, 3, H, W) float32 image in [0, 1] of the shared f_hat; frees the last model's cache."""
        model, mstate = (self.refiner, state.refiner) if self.handover else (self.drafter, state.drafter)
        images = model.decode(mstate)
        model.release_cache(mstate)  # the official code ends with kv_caching(False) as well
        return images

    # -- handover --------------------------------------------------------------------------------
    def _prefill(self, state: CoDeState) -> StepOutput:
        """The refiner's one block-causal pass over scales 0..N (CODE_SPEC §4): fills its KV cache, returns
        the guided scale-N logits to sample and the conditional logits of scales < N to draw and discard."""
        r, n = self.refiner, self.draft_steps
        rs = state.refiner = r.start(state.labels)
        rs.f_hat = state.drafter.f_hat
        net = r.net
        b = len(state.labels)
        with r._autocast():
            embedded = [net.embed_input(x, si + 1, rs.lvl_pos).repeat(2, 1, 1) for si, x in enumerate(state.hub)]
            x = torch.cat([rs.x, *embedded], dim=1)  # (2B, end[N], C): SOS + the drafted inputs of scales 1..N
            p = x.shape[1]
            mods = rs.mods if rs.mods is not None else net.modulations(rs.cond)
            head = rs.head_mod if rs.head_mod is not None else net.head_modulation(rs.cond)
            hidden = net.run_blocks(x, mods, rs.cache, net.attn_bias_for_masking[:, :, :p, :p])
            begin = net.begin_ends[n][0]
            logits = net.logits(hidden[:, begin:], head)  # (2B, pn_N², V): only scale N is guided
            discard = ()
            if self.discard_draws:
                # The official code evaluates the head on every position; only the conditional rows of scales
                # < N are read (for the discarded draws), so only those are computed here.
                cond = net.logits(hidden[:b, :begin], (head[0][:b], head[1][:b]))  # (B, begin, V)
                discard = tuple((si, cond[:, lo:hi]) for si, (lo, hi) in enumerate(net.begin_ends[:n]))
        state.hub = []  # consumed; the refiner's cache holds what it needs now
        return StepOutput(logits, discard=discard)


def _call_flops(cfg: VARConfig, queries: int, pairs: int, calls: int, head_rows: int, embedded: int) -> float:
    """FLOPs (2 per MAC) of `calls` network calls over `queries` tokens per CFG half, in the terms of
    var_model.flops_per_image: blocks on both halves with `pairs` query-key products per half, AdaLN once per
    call, the head on `head_rows` rows (both halves together), word_embed on `embedded` conditional inputs."""
    d, c = cfg.depth, cfg.width
    adaln = (1 if cfg.shared_aln else d) * 12 * c * c + 4 * c * c  # blocks' and head's AdaLN, per call and half
    per_half = d * (24 * c * c * queries + 4 * c * pairs) + adaln * calls
    return float(2 * per_half + 2 * c * cfg.vocab_size * head_rows + 2 * cfg.z_channels * c * embedded)


def code_flops_per_image(drafter: VARConfig, refiner: VARConfig, draft_steps: int,
                         discard_draws: bool = True) -> float:
    """Model FLOPs of one CoDe generation as this implementation computes it (VAE decode excluded).

    Drafter: cached scales 0..N-1 (it also embeds scale N's input). Refiner: the prefill over P = end[N]
    tokens with a dense masked P×P attention, the head on scale N's rows of both halves and, for the discarded
    draws, on the conditional rows of scales < N; then cached scales N+1..S-1. With N = S this is
    var_model.flops_per_image(drafter).
    """
    sizes = [pn * pn for pn in drafter.patch_nums]
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    n, s, total = draft_steps, len(sizes), ends[-1]
    drafted = ends[n - 1]
    flops = _call_flops(drafter, drafted, sum(k * e for k, e in zip(sizes[:n], ends)), n, 2 * drafted,
                        (ends[n] if n < s else total) - 1)
    if n == s:
        return flops
    p = ends[n]
    head_rows = p + sizes[n] if discard_draws else 2 * sizes[n]
    flops += _call_flops(refiner, p, p * p, 1, head_rows, p - 1)
    rest = total - p
    return flops + _call_flops(refiner, rest, sum(k * e for k, e in zip(sizes[n + 1:], ends[n + 1:])), s - 1 - n,
                               2 * rest, rest)


def build_code(drafter_depth: int, refiner_depth: int, *, draft_steps: int = 8,
               drafter_weights: str | None = None, refiner_weights: str | None = None,
               weights: str | None = None, finetuned: bool = False, training_free: bool | None = None,
               vae: str | None = None,
               engine: EngineConfig = EngineConfig(), device: str = "cpu", seed: int = 0, vae_ch: int = 160,
               kv_policy=None, drafter_kv_policy=None, refiner_kv_policy=None, discard_draws: bool = True,
               allow_download: bool | None = None, name: str | None = None) -> CoDe:
    """A CoDe pair of VAR models sharing one VQVAE.

    Args:
        draft_steps: N, the number of scales the drafter generates (1..S).
        drafter_weights, refiner_weights: checkpoint sources (path, hf:OWNER/REPO/FILE, official name);
            None = the official VAR checkpoints of the two depths (training-free CoDe), or with
            `finetuned=True` the released pair hf:Zigeng/VAR_CoDe/{drafter,refiner}_{N}.pth (N in 6..9).
        training_free: the official scripts' flag, the opposite of `finetuned` (give one or agree).
        weights: "random" for random models of both depths (speed benchmarks, tests); None otherwise.
        kv_policy: KV policy of both models, unless drafter_kv_policy / refiner_kv_policy is given.
        discard_draws: the official random-stream order (see `CoDe`).
    """
    if weights not in (None, "random"):
        raise ValueError(f"CoDe has two models: pass drafter_weights= and refiner_weights= (weights= only "
                         f"takes 'random'), got weights={weights!r}")
    if training_free is not None:
        if finetuned and training_free:
            raise ValueError("finetuned=True contradicts training_free=True; give one of them")
        finetuned = not training_free
    if finetuned and weights is None:
        if draft_steps not in FINETUNED_STEPS:
            raise ValueError(f"Zigeng/VAR_CoDe released fine-tuned pairs for draft_steps in {FINETUNED_STEPS}, "
                             f"not {draft_steps}; pass drafter_weights/refiner_weights or finetuned=False")
        drafter_weights = drafter_weights or f"hf:Zigeng/VAR_CoDe/drafter_{draft_steps}.pth"
        refiner_weights = refiner_weights or f"hf:Zigeng/VAR_CoDe/refiner_{draft_steps}.pth"
    common = dict(vae=vae, engine=engine, device=device, vae_ch=vae_ch, allow_download=allow_download)
    drafter = build_var(drafter_depth, weights=weights or drafter_weights, seed=seed,
                        kv_policy=drafter_kv_policy or kv_policy, name=f"drafter_d{drafter_depth}", **common)
    common["vae"] = drafter.vae  # one VQVAE in memory for both models
    refiner = build_var(refiner_depth, weights=weights or refiner_weights, seed=seed + 1,
                        kv_policy=refiner_kv_policy or kv_policy, name=f"refiner_d{refiner_depth}", **common)
    return CoDe(drafter, refiner, draft_steps, name or f"code_d{drafter_depth}_d{refiner_depth}", discard_draws)


def _pair(drafter: VARConfig, refiner: VARConfig):
    """Attaches both architectures to a factory so that `varbench list` counts drafter + refiner parameters."""
    def attach(fn):
        fn.config = (drafter, refiner)
        return fn
    return attach


@register_variant
@_pair(VARConfig(depth=30), VARConfig(depth=16))
def code_d30_d16(**kwargs) -> CoDe:
    """CoDe (arXiv:2411.17787): VAR-d30 drafts scales 0..N-1, VAR-d16 refines the rest; N = 8 (sample_CoDe.py).

    Weights: official var_d30 + var_d16 (training-free, paper Table 6: FID 2.10 at N = 8); `finetuned=True`
    loads Zigeng/VAR_CoDe drafter_N/refiner_N (FID 1.98 at N = 8). Its `default_sampling` is CODE_SAMPLING.
    """
    variant = build_code(30, 16, **kwargs)
    variant.default_sampling = CODE_SAMPLING
    return variant


@register_variant
@_pair(VARConfig(depth=3), VARConfig(depth=2))
def test_code(**kwargs) -> CoDe:
    """Tiny random CoDe (drafter depth 3, refiner depth 2, shared VQVAE ch 32, N = 8) for tests; < 1 s per batch."""
    kwargs.setdefault("weights", "random")
    kwargs.setdefault("vae_ch", 32)
    return build_code(3, 2, **kwargs)
