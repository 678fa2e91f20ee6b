"""HMAR (Kumbong et al., CVPR 2025, arXiv:2506.04421) as a variant of the one scale loop.

Matches NVlabs/HMAR@595a9df models/hmar.py `HMAR.generate` (mask=True, kv_cache=False) and its sampling defaults
(utils/sampling_arg_util.py, config/evaluate/*.yaml); written from docs/HMAR_SPEC.md §1, §5-§6, nothing copied.

Per scale: one next-scale pass (base + ns blocks, guidance t = cfg·si/(S-1)), then `len(mask_schedule[si]) - 1`
masked steps (base + mask blocks, t = cfg·1e-6 as hard-coded officially). After the pass the least confident
sum(s[1:]) tokens are masked (confidence = softmax of the top-k/top-p filtered logits at the drawn token, stable
ascending order, so ties go to the lower index as official CPU torch does for these row lengths); each masked step
redraws them, then keeps the more confident and re-masks the sum(s[step+1:]) least confident. Every pass sees only
its own scale's tokens (Markov attention), so there is no KV cache (kv_bytes 0). `more_smooth` is ignored, as
officially. The schedule is a constructor argument: changing it needs no retraining.

Unverified (docs/HMAR_SPEC.md §9): the released hmar-d*.pth files were not downloaded; their layout (8 ns + 8 mask
blocks at every depth) is inferred from the code and the file sizes, and the loader reads the split from the keys
anyway. The 512 px default schedule (below) and the GPU behaviour (CUDA random stream, argsort ties, TF32) are
unverified too. The per-depth sampling presets were read in the official YAMLs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from varbench.harness.core.loop import Step, StepOutput
from varbench.harness.core.sampling import Draw, SampleConfig

from .factory import register_model
from .hmar_model import HMARConfig, HMARModulations, HMARNet, init_random_hmar_
from .loading import Layout, load_checkpoint, load_vqvae, random_vqvae
from .var import VAR, EngineConfig
from .var_model import PATCH_NUMS
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["HMAR", "HMARState", "HMAR_FILES", "HMAR_SAMPLING", "MASK_SCHEDULES", "MASK_STEP_CFG_RATIO",
           "build_hmar", "load_hmar_net", "resolve_mask_schedule", "mask_token_input", "hmar_flops_per_image"]

HMAR_FILES = {d: f"hf:nvidia/HMAR/hmar-d{d}.pth" for d in (16, 20, 24, 30)}

# FID protocol per depth: config/evaluate/hmar-d*.yaml (read in the code; the d30 sample yaml says 1.7/1000/0.99).
HMAR_SAMPLING = {16: SampleConfig(cfg=1.7, top_k=1000, top_p=0.99), 20: SampleConfig(cfg=1.9, top_k=950, top_p=0.99),
                 24: SampleConfig(cfg=2.1, top_k=900, top_p=0.99), 30: SampleConfig(cfg=1.6, top_k=650, top_p=0.99)}

MASK_STEP_CFG_RATIO = 1e-6  # official `ratio_step`: guidance is practically off in masked steps

# Named schedules per scale layout (total tokens L). "official": utils/sampling_arg_util.py, the eval default
# (14 passes). "benchmark": benchmark/inference.py; its 512 px entry is the only 512 px schedule published and is
# the 512 px default here, unverified (no 512 px checkpoint was released). "none" (any layout): no masked steps.
MASK_SCHEDULES: dict[str, dict[int, tuple[tuple[int, ...], ...]]] = {
    "official": {680: ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,))},
    "benchmark": {680: ((1,), (1, 3), (1, 3, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,)),
                  2240: ((1,), (1, 3), (1, 1, 2, 5), (5, 11), (36,), (81,), (169,), (324,), (576,), (1024,))},
}


def resolve_mask_schedule(schedule: str | Sequence[Sequence[int]] | None,
                          patch_nums: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """A validated schedule: one tuple of token counts per scale, summing to pn²; its length is the scale's
    number of passes (1 = the next-scale pass alone). None = "official" (else "benchmark", else "none")."""
    seq_len = sum(pn * pn for pn in patch_nums)
    if schedule is None:
        schedule = next((n for n in ("official", "benchmark") if seq_len in MASK_SCHEDULES[n]), "none")
    if isinstance(schedule, str):
        if schedule == "none":
            return tuple((pn * pn,) for pn in patch_nums)
        if schedule not in MASK_SCHEDULES:
            raise ValueError(f"unknown mask schedule {schedule!r}; choose from none, {', '.join(MASK_SCHEDULES)} "
                             "or give one list of token counts per scale")
        if seq_len not in MASK_SCHEDULES[schedule]:
            raise ValueError(f"mask schedule {schedule!r} has no entry for patch_nums {tuple(patch_nums)}")
        return MASK_SCHEDULES[schedule][seq_len]
    out = tuple(tuple(int(n) for n in s) for s in schedule)
    if len(out) != len(patch_nums):
        raise ValueError(f"mask_schedule has {len(out)} entries but the model has {len(patch_nums)} scales")
    for si, (s, pn) in enumerate(zip(out, patch_nums)):
        if not s or min(s) < 0 or sum(s) != pn * pn:
            raise ValueError(f"mask_schedule[{si}] = {list(s)} must be non-negative counts summing to "
                             f"{pn}² = {pn * pn}")
        if pn == 1 and len(s) > 1:
            raise ValueError(f"mask_schedule[{si}]: a 1×1 scale has no masked steps (official generate skips them)")
    return out


def mask_token_input(vae: VQVAE, idx_per_scale: Sequence[Tensor], patch_nums: Sequence[int]) -> Tensor:
    """Teacher-forcing masked-path input (B, L-1, Cvae): for scales 1.., each scale's own tokens through bicubic,
    φ and area (not accumulated), the official `idxBl_to_mask_input`."""
    maps = [_own_scale_features(vae, si, patch_nums, idx_per_scale[si]) for si in range(1, len(patch_nums))]
    return torch.cat([g.flatten(2).transpose(1, 2) for g in maps], dim=1)


def _own_scale_features(vae: VQVAE, si: int, patch_nums: Sequence[int], idx: Tensor) -> Tensor:
    """area(φ_si(bicubic(codebook[idx] -> side)) -> pn) of one (B, pn²) token map, (B, Cvae, pn, pn) (§5)."""
    pn, side = patch_nums[si], patch_nums[-1]
    h = F.interpolate(vae.embed(idx, pn), size=(side, side), mode="bicubic")
    return F.interpolate(vae.quantize.phi(si, len(patch_nums))(h), size=(pn, pn), mode="area")


def _confidence(filtered_logits: Tensor, idx: Tensor) -> Tensor:
    """Probability of the drawn token under the filtered logits, (B, l)."""
    return filtered_logits.softmax(dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)


@dataclass
class HMARState:
    labels: Tensor  # (B,)
    cond: Tensor  # (2B, C) class embeddings, conditional rows first
    x: Tensor  # (2B, l, C) next-scale input of the current scale
    f_hat: Tensor  # (B, Cvae, H, W) fp32 latent of the finished scales
    lvl_pos: Tensor  # (1, L, C)
    mods: HMARModulations | None = None
    f_tilde: Tensor | None = None  # (B, Cvae, pn, pn) area(f_hat -> pn) of the current scale
    idx: Tensor | None = None  # (B, pn²) current token map of the scale being refined
    masked: Tensor | None = None  # (B, m) positions still masked, ascending confidence
    tokens: list[Tensor] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)  # always 0: no KV cache
    mask_trace: list[tuple[int, int, Tensor]] = field(default_factory=list)  # (si, step, positions masked in it)


class HMAR(VAR):
    """HMARNet + VQVAE behind the loop's hooks: VAR's engine (precision, conditioning cache, NHWC decode, compile)
    without its KV cache. `mask_schedule`: a name of MASK_SCHEDULES, "none" (= official mask=False), or one list
    of counts per scale. `default_sampling`: the published preset of the depth (None for random models)."""

    default_sampling: SampleConfig | None = None
    has_kv_cache = False  # Markov attention: each scale attends to itself only, so no cache to compress

    def __init__(self, net: HMARNet, vae: VQVAE, engine: EngineConfig = EngineConfig(),
                 device: str | torch.device = "cpu", name: str = "hmar",
                 mask_schedule: str | Sequence[Sequence[int]] | None = None):
        if engine.cuda_graphs:
            raise ValueError("HMAR does not capture CUDA graphs (engine.cuda_graphs): each scale runs several "
                             "passes of data-dependent masks; use compile instead")
        self.schedule = resolve_mask_schedule(mask_schedule, net.cfg.patch_nums)
        super().__init__(net, vae, engine, device, name)  # type: ignore[arg-type]  (duck-typed VARNet)
        self._step_fn = self.net.run
        if engine.compile:
            self._step_fn = torch.compile(self.net.run, dynamic=False)

    # -- hooks -----------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        last = len(self.patch_nums) - 1
        return [Step(si, sub, si / last if sub == 0 else MASK_STEP_CFG_RATIO)
                for si, s in enumerate(self.schedule) for sub in range(len(s))]

    def start(self, labels: Tensor) -> HMARState:
        with self._autocast():
            cond = self.net.class_emb(torch.cat((labels, torch.full_like(labels, self.num_classes))))
            lvl_pos = self._level_pos()
            side = self.patch_nums[-1]
            state = HMARState(labels, cond, self.net.first_input(cond, lvl_pos),
                              torch.zeros(len(labels), self.cfg.z_channels, side, side, device=self.device), lvl_pos)
            if self.engine.cache_conditioning:
                state.mods = self.net.modulations(cond)
        return state

    def forward(self, state: HMARState, step: Step) -> StepOutput:
        with self._autocast():
            mods = state.mods if state.mods is not None else self.net.modulations(state.cond)
            if step.sub == 0:
                return StepOutput(self._step_fn(state.x, mods, "ns"))
            state.mask_trace.append((step.si, step.sub, state.masked))
            g = _own_scale_features(self.vae, step.si, self.patch_nums, state.idx)  # stale masked tokens included
            x = self.net.mask_input(state.f_tilde, g, state.masked, step.si, state.lvl_pos).repeat(2, 1, 1)
            return StepOutput(self._step_fn(x, mods, "mask"))

    def commit(self, state: HMARState, step: Step, draw: Draw) -> None:
        si, sub, s = step.si, step.sub, self.schedule[step.si]
        if sub == 0:
            state.idx = draw.tokens.clone()
            if len(s) > 1:
                order = _confidence(draw.logits, state.idx).argsort(dim=1)  # the official call: unstable, ties as torch orders them
                state.masked = order[:, : sum(s[1:])]
        else:
            rows = torch.arange(len(state.idx), device=state.idx.device).unsqueeze(1)
            state.idx[rows, state.masked] = draw.tokens[rows, state.masked]
            if sub < len(s) - 1:  # confidences of the redrawn tokens, read in the updated map
                conf = _confidence(draw.logits, state.idx).gather(1, state.masked)
                state.masked = state.masked.gather(1, conf.argsort(dim=1)[:, : sum(s[sub + 1:])])
        if sub == len(s) - 1:
            self._finish_scale(state, si)

    def _finish_scale(self, state: HMARState, si: int) -> None:
        with self._autocast():
            h = self.vae.embed(state.idx, self.patch_nums[si])
            nxt = self.vae.next_input(si, self.patch_nums, state.f_hat, h)
            state.tokens.append(state.idx)
            state.kv_bytes.append(0)
            state.idx = state.masked = None
            if si < len(self.patch_nums) - 1:
                state.f_tilde = nxt  # = area(f_hat -> next pn): also the masked steps' coarse-scale input
                state.x = self.net.ns_input(nxt, si + 1, state.lvl_pos).repeat(2, 1, 1)

    def flops_per_image(self) -> float:
        return hmar_flops_per_image(self.cfg, self.schedule)


def hmar_flops_per_image(cfg: HMARConfig, schedule: Sequence[Sequence[int]]) -> float:
    """Model FLOPs of one CFG-guided generation (2 per MAC), as the official algorithm computes them: every pass
    runs `depth` blocks over its own scale's tokens for both CFG halves, AdaLN linears in every block call, the
    head; word_embed on the B conditional rows (twice in masked steps: f̃ and the token features). VAE excluded."""
    d, c, v, z = cfg.depth, cfg.width, cfg.vocab_size, cfg.z_channels
    total = 0.0
    for si, (pn, s) in enumerate(zip(cfg.patch_nums, schedule)):
        n = pn * pn
        per_half = d * (24 * c * c * n + 4 * c * n * n + 12 * c * c) + 2 * c * v * n + 4 * c * c
        total += len(s) * 2 * per_half + (len(s) - 1) * 2 * (2 * z * c * n) + (2 * z * c * n if si else 0)
    return total


HMAR_LAYOUT = Layout("hmar", "HMAR", HMARConfig.from_state_dict, HMARNet,
                     lambda c: (f"depth-{c.depth} HMAR (width {c.width}, {c.n_base} base + {c.n_layers_train} ns + "
                                f"{c.n_layers_train} mask blocks)"), "hmar_d{depth}")


def load_hmar_net(source: str | os.PathLike, expect_depth: int | None = None,
                  patch_nums: Sequence[int] | None = None, allow_download: bool | None = None) -> HMARNet:
    """An HMARNet (fp32, CPU) from an official-layout checkpoint, loaded strictly; checks the depth if asked."""
    return load_checkpoint(source, HMAR_LAYOUT, expect_depth, allow_download, patch_nums=patch_nums)


def build_hmar(depth: int, *, weights: str | None = None, vae: str | None = None,
               engine: EngineConfig = EngineConfig(), device: str = "cpu", seed: int = 0,
               patch_nums: Sequence[int] | None = None, n_layers_train: int = 8, vae_ch: int = 160,
               mask_schedule: str | Sequence[Sequence[int]] | None = None, allow_download: bool | None = None,
               name: str | None = None, kv_policy=None) -> HMAR:
    """An HMAR variant of the given depth.

    Args:
        weights: checkpoint source (path, hf:OWNER/REPO/FILE); None = the official nvidia/HMAR file of this depth;
            "random" = random weights (speed benchmarks, tests).
        vae: VQVAE source; None = the official vae_ch160v4096z32 (random with random weights).
        patch_nums, n_layers_train, vae_ch: architecture of random models (a checkpoint carries its own).
        mask_schedule: see `resolve_mask_schedule`; None = the official one.
        kv_policy: None or `full`. HMAR keeps no KV cache, so no compression policy applies.
    """
    if kv_policy is not None and getattr(kv_policy, "name", None) != "full":
        raise ValueError(f"HMAR has no KV cache (Markov attention: each scale attends only to its own tokens), so "
                         f"KV policy {getattr(kv_policy, 'name', kv_policy)!r} cannot apply; use None or full")
    if weights == "random":
        cfg = HMARConfig(depth=depth, n_layers_train=n_layers_train, patch_nums=tuple(patch_nums or PATCH_NUMS[680]))
        net = init_random_hmar_(HMARNet(cfg), torch.Generator().manual_seed(seed)).eval()
    else:
        if weights is None and depth not in HMAR_FILES:
            raise ValueError(f"no released HMAR-d{depth}; released depths: {sorted(HMAR_FILES)}")
        net = load_hmar_net(weights or HMAR_FILES[depth], depth, patch_nums, allow_download)
    if vae == "random" or (vae is None and weights == "random"):
        vae_model = random_vqvae(VQVAEConfig(ch=vae_ch), seed)
    else:
        vae_model = load_vqvae(vae or "vae", allow_download)
    variant = HMAR(net, vae_model, engine, device, name or f"hmar_d{depth}", mask_schedule)
    variant.weights = f"random (seed {seed})" if weights == "random" else str(weights or HMAR_FILES[depth])
    variant.default_sampling = HMAR_SAMPLING.get(depth)  # the published preset; studies pass their own
    return variant


def _arch(cfg: HMARConfig):
    """Attaches the architecture and its parameter counter (meta device) for `varbench list`."""
    def attach(fn):
        fn.config = cfg
        fn.has_kv_cache = HMAR.has_kv_cache  # read by a study's plan before anything is built
        return fn
    return attach


# The released models (nvidia/HMAR, arXiv:2506.04421): depth -> (size, paper FID, parameters, preset source).
OFFICIAL_HMAR = {
    16: ("465M", "paper FID 3.01 in 14 passes", "467,691,904", "config/evaluate/hmar-d16.yaml"),
    20: ("846M", "14 passes (paper FID not recovered)", "845,517,872", "config/evaluate/hmar-d20.yaml"),
    24: ("1.3B", "paper FID 2.10 in 14 passes", "1,384,328,960", "config/evaluate/hmar-d24.yaml"),
    30: ("2.4B", "paper FID 1.95 in 14 passes", "2,556,324,212",
         "config/evaluate/hmar-d30.yaml; the sample yaml says 1.7/1000/0.99"),
}
for _depth, (_size, _fid, _params, _source) in OFFICIAL_HMAR.items():
    _s = HMAR_SAMPLING[_depth]
    register_model(f"hmar_d{_depth}", build_hmar, HMARConfig(depth=_depth),
                   f"HMAR-d{_depth} (Kumbong et al. 2025, arXiv:2506.04421), {_size}, ImageNet 256 px, {_fid}.\n\n"
                   f"    Weights nvidia/HMAR hmar-d{_depth}.pth ({_params} parameters). Defaults: official mask "
                   f"schedule; sample with HMAR_SAMPLING[{_depth}] = cfg {_s.cfg}, top-k {_s.top_k}, top-p "
                   f"{_s.top_p} ({_source}).", has_kv_cache=HMAR.has_kv_cache, accelerates=None, fixed={"depth": _depth})
register_model("test_hmar", build_hmar, HMARConfig(depth=2, n_layers_train=1),
               "Tiny random HMAR (arXiv:2506.04421 layout; depth 2 = 1 base + 1 ns + 1 mask block, width 128, "
               "VQVAE ch 32).\n\n    For tests and CPU smoke runs, < 1 s per batch; official mask schedule, no "
               "sampling preset.", has_kv_cache=HMAR.has_kv_cache, accelerates=None, fixed={"depth": 2},
               defaults={"weights": "random", "n_layers_train": 1, "vae_ch": 32})
