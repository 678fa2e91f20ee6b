"""VAR (Tian et al. 2024, arXiv:2404.02905) as a variant of the one scale loop, with the fast engine.

The engine is the baseline every speedup is measured against, so it is the fastest honest implementation:
a static preallocated KV cache written in place, SDPA, weights held in the compute precision (no autocast
re-casting them at every call), AdaLN computed once per call instead of once per scale, no host syncs in the
step, optional torch.compile and CUDA-graph capture of the per-scale step, and a channels-last low-precision
VAE decode. `EngineConfig.reference()` switches every feature off, which gives the official code's algorithm
and numerics (concatenated cache, fp32 weights under autocast): the yardstick the engine is checked against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varbench.harness.core.kv_cache import ConcatKVCache, StaticKVCache
from varbench.harness.core.loop import Step, StepOutput
from varbench.harness.core.registry import register_variant
from varbench.harness.core.sampling import Draw, SampleConfig

from .accel import Acceleration, AccelState, accelerated_forward, apply_acceleration, freeze_rows
from .engine import DTYPES, EngineConfig
from .factory import register_model
from .loading import load_var_net, load_vqvae, random_var_net, random_vqvae
from .params import OneNetwork, param_count
from .var_model import PATCH_NUMS, Modulation, VARConfig, VARNet, flops_per_image
from .vqvae import VQVAE, VQVAEConfig, decode_flops

__all__ = ["EngineConfig", "VAR", "VARState", "build_var", "param_count", "DTYPES"]

@dataclass
class VARState:
    labels: Tensor  # (B,)
    cond: Tensor  # (2B, C) class embeddings, conditional rows first, then the null class
    x: Tensor  # (2B, l, C) input of the next step
    f_hat: Tensor  # (B, Cvae, H, W) fp32 accumulated latent
    cache: StaticKVCache | ConcatKVCache
    lvl_pos: Tensor  # (1, L, C)
    mods: list[Modulation] | None = None  # cached AdaLN outputs (engine)
    head_mod: tuple[Tensor, Tensor] | None = None
    tokens: list[Tensor] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)  # bytes the cache holds for later scales after each scale
    kv_bytes_current: list[int] = field(default_factory=list)  # bytes of each scale's own keys and values
    accel: AccelState | None = None  # the acceleration's per-call state (variants/accel/), None without one
    cache_rows: str = "both"  # CFG rows `cache` holds: an acceleration may drop a half for the late scales


class VAR(OneNetwork):
    """A VAR transformer + VQVAE behind the loop's hooks, and what the evaluator reads of it (the `Variant`
    protocol of harness/core/loop.py). HMAR subclasses it; CoDe composes two."""

    has_kv_cache: bool = True  # KV policies apply (HMAR: False)
    default_sampling: SampleConfig | None = None  # the family's published preset, where one is fixed

    def __init__(self, net: VARNet, vae: VQVAE, engine: EngineConfig = EngineConfig(),
                 device: str | torch.device = "cpu", name: str = "var", kv_policy=None):
        engine = engine.resolved(device)  # "auto" precision made concrete for the device
        self.name, self.engine, self.device = name, engine, torch.device(device)
        self.weights = "modules given by the caller"  # build_var names the checkpoint (or random seed)
        if engine.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        # None or `full`: the static cache. A compressing policy (variants/kv_policies.py) sizes the cache to its
        # budget and evicts after each scale; the Python-side lengths it keeps cannot live in a CUDA graph.
        if getattr(kv_policy, "compresses", False) and engine.cuda_graphs:
            raise ValueError(f"KV policy {kv_policy.name!r} evicts per scale; it cannot run with cuda_graphs")
        self.kv_policy = kv_policy
        self.acceleration: Acceleration | None = None  # set by apply_acceleration (variants/accel/)
        self.joins_acceleration = False  # a CoDe refiner shares the drafter's per-call state
        self.dtype = DTYPES[engine.precision]
        self.net, self.vae = net.to(self.device).eval(), vae.to(self.device).eval()
        self.cfg: VARConfig = net.cfg
        self.patch_nums: tuple[int, ...] = self.cfg.patch_nums
        self.num_classes = self.cfg.num_classes
        if engine.weights_in_precision and self.dtype != torch.float32:
            _hold_in(self.net, self.dtype)
            # The quantizer (codebook, φ) stays fp32: f_hat accumulates in fp32 as in the official code.
            self.vae.decoder.to(self.dtype)
            self.vae.post_quant_conv.to(self.dtype)
        if engine.channels_last_vae:
            self.vae.decoder.to(memory_format=torch.channels_last)
        self._static_cache: StaticKVCache | None = None  # the buffer kept between calls (`kv_buffer`)
        self._lvl_pos: Tensor | None = None
        self._step_fn = self._network_step
        if engine.compile:  # one static-shape graph per scale (and per batch size): allow that many
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4 * len(self.patch_nums))
            self._step_fn = torch.compile(self._network_step, dynamic=False)
        self._graphs: _ScaleGraphs | None = None

    # -- hooks -----------------------------------------------------------------------------------
    def steps(self) -> Sequence[Step]:
        last = len(self.patch_nums) - 1
        return [Step(si, 0, si / last) for si in range(len(self.patch_nums))]

    def start(self, labels: Tensor, kv_tokens: int | None = None) -> VARState:
        """`kv_tokens`: positions the cache is sized for (None: every scale; CoDe's drafter runs only its own)."""
        with self._autocast():
            cond = self.net.class_emb(torch.cat((labels, torch.full_like(labels, self.num_classes))))
            lvl_pos = self._level_pos()
            state = VARState(labels, cond, self.net.first_input(cond, lvl_pos),
                             torch.zeros(len(labels), self.cfg.z_channels, self.patch_nums[-1], self.patch_nums[-1],
                                         device=self.device), self._cache(2 * len(labels), kv_tokens), lvl_pos)
            if self.engine.cache_conditioning:
                state.mods, state.head_mod = self.net.modulations(cond), self.net.head_modulation(cond)
        if self.acceleration is not None:
            state.accel = self.acceleration.begin(self, labels, self.joins_acceleration)
        if self.engine.cuda_graphs:
            self._graphs = _ScaleGraphs.ready(self._graphs, self, state)
        return state

    def forward(self, state: VARState, step: Step) -> StepOutput:
        if state.accel is not None:
            return accelerated_forward(self, state, step)
        with self._autocast():
            mods = state.mods if state.mods is not None else self.net.modulations(state.cond)
            head = state.head_mod if state.head_mod is not None else self.net.head_modulation(state.cond)
            if self._graphs is not None:
                return StepOutput(self._graphs.replay(step.si, state))
            return StepOutput(self._step_fn(state.x, mods, head, state.cache))

    def commit(self, state: VARState, step: Step, draw: Draw) -> None:
        si, pn = step.si, self.patch_nums[step.si]
        codebook = self.vae.quantize.embedding.weight
        if state.accel is not None and bool(state.accel.skipped[:, si].all()):  # every sample skipped the scale
            state.tokens.append(torch.full_like(draw.tokens, -1))
            state.kv_bytes.append(state.cache.nbytes())
            state.kv_bytes_current.append(0)
            return
        with self._autocast():
            h = draw.soft @ codebook.unsqueeze(0) if draw.soft is not None else F.embedding(draw.tokens, codebook)
            h = h.transpose(1, 2).reshape(len(draw.tokens), -1, pn, pn)  # (B, Cvae, pn, pn)
            if state.accel is None:
                nxt = self.vae.next_input(si, self.patch_nums, state.f_hat, h)
            else:  # some samples may skip this scale (SkipVAR decides per sample)
                nxt, _ = freeze_rows(self, state, si, h, draw.tokens)
                self.acceleration.after_commit(self, state, si)
            state.tokens.append(draw.tokens)
            state.kv_bytes.append(state.cache.nbytes())
            state.kv_bytes_current.append(state.cache.current_nbytes())
            if si < len(self.patch_nums) - 1:
                state.x = self.net.embed_input(nxt, si + 1, state.lvl_pos).repeat(2, 1, 1)

    def tokens(self, state: VARState) -> list[Tensor]:
        return state.tokens

    def decode(self, state: VARState) -> Tensor:
        """(B, 3, H, W) float32 image in [0, 1]."""
        f = state.f_hat.to(self.vae.post_quant_conv.weight.dtype)
        if self.engine.channels_last_vae:
            f = f.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            img = self.vae.decode(f)
        return img.float().add_(1).mul_(0.5).contiguous()

    # -- engine ----------------------------------------------------------------------------------
    def _network_step(self, x: Tensor, mods: list[Modulation], head: tuple[Tensor, Tensor], cache) -> Tensor:
        """One scale through every block (KV-cached) and the head: (2B, l, C) -> (2B, l, V) fp32 logits."""
        return self.net.logits(self.net.run_blocks(x, mods, cache), head)

    def _cache(self, batch2: int, kv_tokens: int | None = None) -> StaticKVCache | ConcatKVCache:
        if getattr(self.kv_policy, "compresses", False):  # budget-sized buffers, compacted in place per scale
            self._static_cache = self.kv_policy.cache(self, batch2, self._static_cache, kv_tokens)
            return self._static_cache
        if not self.engine.static_kv_cache:
            return ConcatKVCache(self.cfg.depth)
        capacity = kv_tokens or self.cfg.seq_len
        c = self._static_cache
        if not isinstance(c, StaticKVCache) or c.k.shape[1] != batch2 or c.capacity != capacity:
            self._static_cache = c = None  # free the old buffer before allocating the new one
            c = StaticKVCache(self.cfg.depth, batch2, self.cfg.heads, capacity,
                              self.cfg.width // self.cfg.heads, self.dtype, self.device)
            self._static_cache, self._graphs = c, None
        c.reset()
        return c

    # -- what the evaluator reads (the Variant protocol) ---------------------------------------------
    @property
    def depth(self) -> int:
        return self.cfg.depth

    def stages(self) -> list[tuple[str, tuple[int, ...]]]:
        """(model name, scale indices it samples), in run order."""
        return [(self.name, tuple(range(len(self.patch_nums))))]

    def flops_per_image(self) -> float:
        """Model FLOPs of the network per generated image, VAE decode excluded."""
        return flops_per_image(self.cfg)

    def vae_decode_flops(self) -> float:
        side = self.patch_nums[-1]
        return decode_flops(self.vae.cfg, (1, self.vae.cfg.z_channels, side, side))

    def kv_report(self, state) -> dict[str, list[int]]:
        """Bytes the cache holds for later scales after each scale, and each scale's own keys and values."""
        return {"kv_bytes_per_scale": list(getattr(state, "kv_bytes", [])),
                "kv_bytes_current_per_scale": list(getattr(state, "kv_bytes_current", []))}

    @property
    def kv_buffer(self) -> StaticKVCache | None:
        """The preallocated cache kept for the next call of the same shape (None before the first)."""
        return self._static_cache

    def set_kv_policy(self, policy) -> None:
        """Runs later calls with another KV policy (a calibration pass records with its own); the buffer kept
        for the old one is dropped."""
        if getattr(policy, "compresses", False) and self.engine.cuda_graphs:
            raise ValueError(f"KV policy {policy.name!r} evicts per scale; it cannot run with cuda_graphs")
        self.kv_policy, self._static_cache, self._graphs = policy, None, None

    def release_cache(self, state: VARState) -> None:
        """Frees the KV cache of `state` and the buffer kept for the next call, as the official code's
        kv_caching(False) does (CoDe drops the drafter's after drafting). With CUDA graphs the buffer stays:
        the captured graphs replay reads and writes at its addresses."""
        state.cache = ConcatKVCache(self.cfg.depth)  # empty: holds 0 bytes
        if not self.engine.cuda_graphs:
            self._static_cache = None

    def _level_pos(self) -> Tensor:
        if not self.engine.cache_conditioning:
            return self.net.level_pos()
        if self._lvl_pos is None:
            self._lvl_pos = self.net.level_pos()
        return self._lvl_pos

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.engine.weights_in_precision:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _hold_in(net: VARNet, dtype: torch.dtype) -> None:
    """Casts the weights every linear layer reads to `dtype`; embeddings, positions, per-head scales and the
    shared AdaLN gains stay fp32 because they add into the fp32 residual stream."""
    for module in net.modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)
    for block in net.blocks:
        attn = block.attn
        attn.q_bias.data, attn.v_bias.data = attn.q_bias.data.to(dtype), attn.v_bias.data.to(dtype)
        attn.zero_k_bias = attn.zero_k_bias.to(dtype)


class _ScaleGraphs:
    """One CUDA graph per scale over static inputs: the step's kernels launch as one replay (the official
    code at batch 1 is launch-bound by about 6×, docs/PERF_NOTES.md)."""

    def __init__(self, variant: VAR, state: VARState):
        b2, c = state.cond.shape
        dev = variant.device
        self.batch2 = b2
        self.inputs = [torch.zeros(b2, pn * pn, c, device=dev) for pn in variant.patch_nums]
        self.mods = [tuple(t.clone() for t in m) for m in state.mods]
        self.head = tuple(t.clone() for t in state.head_mod)
        self.ends = [end for _, end in variant.net.begin_ends]
        cache = state.cache
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS workspaces, compiled kernels)
            cache.reset()
            for x in self.inputs:
                variant._step_fn(x, self.mods, self.head, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.outputs, pool = [], [], None
        cache.reset()
        for x in self.inputs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs.append(variant._step_fn(x, self.mods, self.head, cache))
            pool = graph.pool()
            self.graphs.append(graph)
        cache.reset()

    @classmethod
    def ready(cls, graphs: _ScaleGraphs | None, variant: VAR, state: VARState) -> _ScaleGraphs:
        if state.mods is None:
            raise ValueError("cuda_graphs needs cache_conditioning")
        if graphs is None or graphs.batch2 != state.cond.shape[0]:
            graphs = cls(variant, state)
        for static, fresh in zip(graphs.mods + [graphs.head], state.mods + [state.head_mod]):
            for s, f in zip(static, fresh):
                s.copy_(f)
        return graphs

    def replay(self, si: int, state: VARState) -> Tensor:
        self.inputs[si].copy_(state.x)
        self.graphs[si].replay()
        state.cache.length = self.ends[si]  # the graph wrote the slots; keep the Python-side count true
        return self.outputs[si]


def build_var(depth: int, *, weights: str | None = None, vae: str | VQVAE | None = None,
              engine: EngineConfig = EngineConfig(), device: str = "cpu", seed: int = 0,
              patch_nums: Sequence[int] | None = None, shared_aln: bool = False, vae_ch: int = 160,
              allow_download: bool | None = None, name: str | None = None, kv_policy=None,
              config: VARConfig | None = None, acceleration: str | None = None,
              acceleration_args: dict | None = None) -> VAR:
    """A VAR variant of the given depth.

    Args:
        weights: checkpoint source (path, hf:OWNER/REPO/FILE); None = the official file for this depth;
            "random" = random weights (speed benchmarks, tests).
        vae: VQVAE source, or a built VQVAE to share (CoDe's two models); None = the official
            vae_ch160v4096z32 (random with random weights).
        patch_nums: scale schedule (default: the 256 px one, or read from the checkpoint).
        shared_aln, vae_ch: architecture of random models; `config` gives a random model's whole architecture.
        kv_policy: a KV-cache policy object from `KV_POLICIES` (None or `full` keeps every entry).
        acceleration, acceleration_args: a registered acceleration (`ACCELERATIONS`, variants/accel/) by name,
            and its arguments; None or "none" runs plain VAR.
    """
    if weights == "random":
        cfg = config or VARConfig(depth=depth, shared_aln=shared_aln, patch_nums=tuple(patch_nums or PATCH_NUMS[680]))
        net = random_var_net(cfg, seed)
    else:
        net = load_var_net(weights or f"var_d{depth}", depth, patch_nums, allow_download)
    if isinstance(vae, VQVAE):
        vae_model = vae
    elif vae == "random" or (vae is None and weights == "random"):
        vae_model = random_vqvae(VQVAEConfig(ch=vae_ch), seed)
    else:
        vae_model = load_vqvae(vae or "vae", allow_download)
    if kv_policy is not None and not hasattr(kv_policy, "prepare"):
        raise ValueError(f"{kv_policy!r} is not a KV policy: build one with KV_POLICIES.get(name)(**args)")
    variant = VAR(net, vae_model, engine, device, name or f"var_d{depth}", kv_policy)
    variant.weights = f"random (seed {seed})" if weights == "random" else str(weights or f"var_d{depth}")
    if kv_policy is not None:
        kv_policy.prepare(variant)  # offline calibration (ScaleKV, HACK) of this model, unless loaded
    if acceleration is not None or acceleration_args:
        apply_acceleration(variant, acceleration or "none", **(acceleration_args or {}))
    return variant


def _arch(cfg: VARConfig):
    """Attaches the architecture to a factory so that listing can count parameters on the meta device."""
    def attach(fn):
        fn.config = cfg
        return fn
    return attach


@register_variant
@_arch(VARConfig(depth=16))
def var(depth: int = 16, **kwargs) -> VAR:
    """VAR of any depth on the 256 px schedule (width 64·depth, heads = depth); `varbench bench --depth D`.
    Official weights exist for depths 16, 20, 24 and 30 (listed with depth 16's parameter count)."""
    return build_var(depth, **kwargs)


# The released models (FoundationVision/VAR README): depth -> what the listing says of it.
OFFICIAL_VAR = {16: "310M, ImageNet 256 px (README FID 3.55)", 20: "600M, ImageNet 256 px (README FID 2.95)",
                24: "1.0B, ImageNet 256 px (README FID 2.33)", 30: "2.0B, ImageNet 256 px (README FID 1.97)"}
for _depth, _what in OFFICIAL_VAR.items():
    register_model(f"var_d{_depth}", build_var, VARConfig(depth=_depth), f"VAR-d{_depth}, {_what}. "
                   f"Weights: FoundationVision/var var_d{_depth}.pth.", fixed={"depth": _depth})
register_model("var_d36", build_var, VARConfig(depth=36, shared_aln=True, patch_nums=PATCH_NUMS[2240]),
               "VAR-d36-s, 2.3B, ImageNet 512 px, shared AdaLN (README FID 2.63). Weights: FoundationVision/var "
               "var_d36.pth.", fixed={"depth": 36}, defaults={"patch_nums": PATCH_NUMS[2240], "shared_aln": True})
register_model("test_var", build_var, VARConfig(depth=2),
               "Tiny random VAR (depth 2, width 128, VQVAE ch 32) for tests and CPU smoke runs; < 1 s per batch.",
               fixed={"depth": 2}, defaults={"weights": "random", "vae_ch": 32})
