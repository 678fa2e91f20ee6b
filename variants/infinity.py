"""Infinity (Han et al. 2024, arXiv:2412.04431): bitwise next-scale text-to-image, as a variant of the one loop.

Matches FoundationVision/Infinity@4c27bbb5 `Infinity.autoregressive_infer_cfg` (infinity/models/infinity.py) as
called by tools/run_infinity.py `gen_one_img`; written from docs/INFINITY_SPEC.md §4, nothing copied. The loop
owns the random stream and the draw: this variant selects the bitwise sampler (harness/core/sampling_bitwise.py)
and answers the hooks. Prompts are given as T5 embeddings, one (len, Ct5) tensor per prompt, and the loop's
labels index them (`num_classes` = number of prompts); `negative` replaces the learned unconditional text.

Guidance: `sampling.cfg` (a value or one per scale) in Infinity's convention (cfg·cond + (1 − cfg)·uncond, 1 =
none), `sampling.temperature` is Infinity's tau (applied before guidance). `cfg_insertion_layer` 0 guides the
logits (the released scripts); k < 0 mixes the hidden state after block depth + k instead.

Engine mode (`EngineConfig()`): static KV cache written in place, weights held in the compute precision,
conditioning (AdaLN, cross-attention keys/values of the text) computed once per call. `EngineConfig.reference()`:
concatenated cache, fp32 weights (under autocast below fp32), conditioning per scale: the official algorithm.

KV policies (variants/kv_policies.py) compose as with VAR: a compressing policy gets the self-attention cache
(`CompressedKVCache`, every engine mode), evicts after each scale's attention, and selects per batch row and
head, so the conditional and unconditional halves are compressed independently (as ScaleKV's released code does
on Infinity, docs/INFINITY_SPEC.md §8). The text cross-attention keys are not cached tokens and stay whole.
Compression needs a square schedule (h_div_w 1.0): the compressed cache counts pn² tokens per scale.

Accelerations (variants/accel/; `accel_family` picks their Infinity defaults) are consulted as on VAR: per step a
`StepPlan` (skip, one CFG half, or a BlockPlan the blocks call per sublayer), per commit the frozen samples.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varbench.harness.core.kv_cache import CompressedKVCache, ConcatKVCache, StaticKVCache
from varbench.harness.core.loop import Step, StepOutput
from varbench.harness.core.sampling import Draw, SampleConfig
from varbench.harness.core.sampling_bitwise import sample_bits

from .accel import Acceleration, AccelState
from .accel.base import narrow_cache, rows_slice
from .bsq_vae import BSQVAE, bits_to_codes, decode_flops, patchify, resize, unpatchify
from .engine import DTYPES, EngineConfig
from .infinity_model import InfinityNet, TextCond, pack_text
from .infinity_schedule import rope_angles, rope_positions, scale_schedule, template_for
from .kv_base import KVGeometry
from .params import OneNetwork

__all__ = ["Infinity", "InfinityState", "load_prompts"]


@dataclass
class InfinityState:
    labels: Tensor  # (B,) prompt indices
    batch: int  # B
    guided: bool  # the batch holds an unconditional half (bs = 2B): some scale has cfg != 1
    cfg: tuple[float, ...]  # per scale
    text: TextCond  # (bs, …) cond rows first
    x: Tensor  # (bs, l, C) input of the next scale (before its level embedding)
    f_hat: Tensor  # (B, d_vae, 1, H, W) fp32 accumulated codes
    cache: StaticKVCache | ConcatKVCache
    mods: list | None = None  # per-block AdaLN (engine: once per call)
    text_kv: list | None = None  # per-block cross-attention keys/values (engine: once per call)
    head_mod: tuple[Tensor, Tensor] | None = None
    bits: list[Tensor] = field(default_factory=list)  # (B, h·w, d) sampled bits per scale
    kv_bytes: list[int] = field(default_factory=list)
    kv_bytes_current: list[int] = field(default_factory=list)
    accel: AccelState | None = None  # the acceleration's per-call state (variants/accel/), None without one
    cache_rows: str = "both"  # CFG rows `cache` holds: an acceleration may drop a half for the late scales


def load_prompts(source: str | os.PathLike | Sequence[Tensor] | dict | None) -> tuple[list[Tensor], list[str]]:
    """Prompt embeddings from tensors, a {name: tensor} dict, or a .pt file holding either (precomputed T5
    outputs, one (len, Ct5) tensor per prompt)."""
    if source is None:
        return [], []
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"prompt embeddings file not found: {source} (a .pt file of (len, Ct5) "
                                    "tensors, a list or a dict by prompt)")
        source = torch.load(source, map_location="cpu", weights_only=True)
    names = list(source) if isinstance(source, dict) else [f"prompt {i}" for i in range(len(source))]
    rows = list(source.values()) if isinstance(source, dict) else list(source)
    if not rows or not all(isinstance(r, Tensor) and r.ndim == 2 and r.shape[0] > 0 for r in rows):
        raise ValueError("prompts must be non-empty (len, Ct5) tensors, one per prompt")
    return [r.float() for r in rows], [str(n) for n in names]


class Infinity(OneNetwork):
    """An Infinity transformer + BSQ VAE behind the loop's hooks and the evaluator's `Variant` protocol."""

    has_kv_cache: bool = True  # KV policies apply, each CFG half compressed on its own (batch rows)
    reads_sampling: bool = True  # start() reads the per-scale cfg: batch halves and hidden-state guidance
    sampler = staticmethod(sample_bits)
    default_sampling: SampleConfig | None = None
    accel_family: str = "infinity"  # the accelerations' defaults to take (variants/accel/base.py)

    def __init__(self, net: InfinityNet, vae: BSQVAE, engine: EngineConfig = EngineConfig(),
                 device: str | torch.device = "cpu", name: str = "infinity", prompts=None,
                 negative: Tensor | None = None, h_div_w: float = 1.0, pn: str = "1M",
                 cfg_insertion_layer: int = 0, xattn: str = "bf16", kv_policy=None):
        self.name, self.engine, self.device = name, engine.resolved(device), torch.device(device)
        self.weights = "modules given by the caller"
        if engine.cuda_graphs:
            raise ValueError("cuda_graphs is not implemented for Infinity yet; use compile or the plain engine")
        if kv_policy is not None and not hasattr(kv_policy, "prepare"):
            raise ValueError(f"{kv_policy!r} is not a KV policy: build one with KV_POLICIES.get(name)(**args)")
        if getattr(kv_policy, "compresses", False) and engine.cuda_graphs:
            raise ValueError(f"KV policy {kv_policy.name!r} evicts per scale; it cannot run with cuda_graphs")
        self.kv_policy = None  # set after the schedule: set_schedule re-prepares a policy for a new schedule
        self.acceleration: Acceleration | None = None  # set by apply_acceleration (variants/accel/)
        self.joins_acceleration = False
        if xattn not in ("bf16", "fp32"):
            raise ValueError(f"xattn = {xattn!r}: choose 'bf16' (the official cross-attention) or 'fp32'")
        self.cfg = net.cfg
        depth = self.cfg.depth
        if not (cfg_insertion_layer == 0 or -depth < cfg_insertion_layer < 0):
            raise ValueError(f"cfg_insertion_layer = {cfg_insertion_layer}: use 0 (guidance on the logits) or "
                             f"-{depth - 1}..-1 (mix the hidden state after block depth + k); the official 1 "
                             "silently disables guidance: use cfg = 1 for that")
        self.cfg_insertion_layer = cfg_insertion_layer
        self.dtype = DTYPES[self.engine.precision]
        self.net, self.vae = net.to(self.device).eval(), vae.to(self.device).eval()
        self.net.xattn_bf16 = xattn == "bf16"
        self.patch = round((self.cfg.bits / vae.cfg.codebook_dim) ** 0.5)  # 8B: 2×2 latent patches per token
        if self.patch**2 * vae.cfg.codebook_dim != self.cfg.bits:
            raise ValueError(f"the transformer predicts {self.cfg.bits} bits per token but the VAE has "
                             f"{vae.cfg.codebook_dim}: not a p×p patchify of it (2B: d32 VAE; 8B: d56 patchify VAE)")
        self.prompts, self.prompt_names = load_prompts(prompts)
        self.negative = None if negative is None else negative.float().to(self.device)
        self.set_schedule(h_div_w, pn)
        if self.engine.weights_in_precision and self.dtype != torch.float32:
            for module in self.net.modules():
                if isinstance(module, nn.Linear):
                    module.to(self.dtype)
            self.vae.decoder.to(self.dtype)
        self.vae.decoder.to(memory_format=torch.channels_last)
        self._static_cache: StaticKVCache | CompressedKVCache | None = None
        self.kv_policy = kv_policy
        self._check_policy()
        self._step_fn = torch.compile(self._network_step, dynamic=False) if self.engine.compile else \
            self._network_step

    def set_schedule(self, h_div_w: float = 1.0, pn: str = "1M") -> None:
        """Generates at another aspect ratio (nearest template) and size; RoPE follows the template."""
        self.schedule = scale_schedule(h_div_w, pn)
        self.template = template_for(h_div_w)
        self.patch_nums = tuple(h for h, _ in self.schedule)  # the loop counts scales; (h, w) is `schedule`
        ends = [sum(h * w for h, w in self.schedule[: i + 1]) for i in range(len(self.schedule))]
        self.begin_ends = [(e - h * w, e) for e, (h, w) in zip(ends, self.schedule)]
        cos, sin = rope_angles(rope_positions(self.schedule, self.template), self.cfg.width // self.cfg.heads)
        self._rope = cos.to(self.device), sin.to(self.device)
        self._static_cache = None
        if self.kv_policy is not None:
            self._check_policy()
            self.kv_policy.prepare(self)  # calibrations are per schedule (model_key holds its length)

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    # -- hooks -----------------------------------------------------------------------------------
    def steps(self) -> Sequence[Step]:
        return [Step(si, 0, 1.0) for si in range(len(self.schedule))]  # t = sampling.cfg_at(si)

    def start(self, labels: Tensor, sampling: SampleConfig | None = None) -> InfinityState:
        if not self.prompts:
            raise ValueError(f"{self.name} has no prompts: give prompt embeddings (prompts=[(len, Ct5) tensors] or "
                             "a .pt file), one per label")
        if int(labels.min()) < 0 or int(labels.max()) >= len(self.prompts):
            raise ValueError(f"labels index the {len(self.prompts)} prompts; got {labels.tolist()}")
        n = len(self.schedule)
        cfg = tuple(sampling.cfg_at(si) for si in range(n)) if sampling is not None else (1.0,) * n
        guided = any(c != 1 for c in cfg)
        rows = [self.prompts[i].to(self.device) for i in labels.tolist()]
        if guided:
            rows += [self.negative if self.negative is not None else self.net.cfg_uncond[: r.shape[0]] for r in rows]
        b = len(labels)
        h, w = self.schedule[-1]
        with self._autocast():
            text = self.net.encode_text(*pack_text(rows))
            state = InfinityState(labels, b, guided, cfg, text, self.net.first_input(text.cond),
                                  torch.zeros(b, self.vae.cfg.codebook_dim, 1, self.patch * h, self.patch * w,
                                              device=self.device), self._cache(len(rows)))
            if self.engine.cache_conditioning:
                state.mods, state.text_kv = self.net.modulations(text.cond), self.net.text_kv(text)
                state.head_mod = self.net.head_modulation(text.cond)
        if self.acceleration is not None:
            state.accel = self.acceleration.begin(self, labels, self.joins_acceleration)
        return state

    def forward(self, state: InfinityState, step: Step) -> StepOutput:
        if state.accel is not None:
            return self._accelerated_forward(state, step)
        si, b = step.si, state.batch
        begin, end = self.begin_ends[si]
        cfg = state.cfg[si]
        with self._autocast():
            mods = state.mods if state.mods is not None else self.net.modulations(state.text.cond)
            text_kv = state.text_kv if state.text_kv is not None else self.net.text_kv(state.text)
            head = state.head_mod if state.head_mod is not None else self.net.head_modulation(state.text.cond)
            x = state.x + self.net.lvl_embed.weight[si]
            rope = self._rope[0][begin:end], self._rope[1][begin:end]
            mix = None
            if self.cfg_insertion_layer < 0 and cfg != 1:
                mix = (self.cfg.depth + self.cfg_insertion_layer, cfg)
            h = self._step_fn(x, mods, text_kv, state.text.mask, rope, state.cache, mix)
            if self.cfg_insertion_layer == 0 and cfg != 1:
                return StepOutput(self.net.logits(h, head), True)
            return StepOutput(self.net.logits(h[:b], (head[0][:b], head[1][:b])), False)

    def _accelerated_forward(self, state: InfinityState, step: Step) -> StepOutput:
        """forward under `self.acceleration`: skip the step, run one CFG half, or run the blocks with a plan."""
        si, b, acc = step.si, state.batch, state.accel
        plan = self.acceleration.plan(self, state, step)
        h, w = self.schedule[si]
        if plan.skip:  # a one-bit draw the commit discards (the loop samples every step it runs)
            acc.skipped[:, si] = True
            acc.tokens_per_scale[si] = acc.rows_per_scale[si] = 0
            return StepOutput(torch.zeros(b, h * w, 2, device=self.device), False)
        if plan.rows != acc.rows and acc.rows != "both":
            raise ValueError(f"acceleration {self.acceleration.name!r}: scale {si} asks for CFG rows {plan.rows!r} "
                             f"after an earlier scale kept only {acc.rows!r}")
        acc.rows = plan.rows
        rows = rows_slice(plan.rows, b) if state.guided else slice(0, b)  # unguided: the conditional rows only
        if state.guided and state.cache_rows != plan.rows:  # narrowed once, at the first one-half step
            state.cache, state.cache_rows = narrow_cache(state.cache, rows), plan.rows
        both, cfg = state.guided and plan.rows == "both", state.cfg[si]
        with self._autocast():
            mods = state.mods if state.mods is not None else self.net.modulations(state.text.cond)
            text_kv = state.text_kv if state.text_kv is not None else self.net.text_kv(state.text)
            head = state.head_mod if state.head_mod is not None else self.net.head_modulation(state.text.cond)
            mods, head = [tuple(t[rows] for t in m) for m in mods], tuple(t[rows] for t in head)
            text_kv, text_mask = [(k[rows], v[rows]) for k, v in text_kv], state.text.mask[rows]
            x = state.x[rows] + self.net.lvl_embed.weight[si]
            rope = tuple(t[slice(*self.begin_ends[si])] for t in self._rope)
            mixing = both and self.cfg_insertion_layer < 0 and cfg != 1
            mix = (self.cfg.depth + self.cfg_insertion_layer, cfg) if mixing else None
            args = (x, mods, text_kv, text_mask, rope, state.cache)
            hid = self._step_fn(*args, mix) if plan.blocks is None else \
                self.net.run_blocks(*args, mix=mix, plan=plan.blocks)  # a plan's choices run eagerly
            guided = both and self.cfg_insertion_layer == 0 and cfg != 1
            logits = self.net.logits(hid, head) if guided else self.net.logits(hid[:b], (head[0][:b], head[1][:b]))
        if guided and plan.unguided is not None:  # these samples' guidance is off: uncond := cond
            logits[b:][plan.unguided] = logits[:b][plan.unguided]
        acc.rows_per_scale[si] = x.shape[0]
        acc.tokens_per_scale.setdefault(si, h * w)  # a token-subset plan records its own count
        return StepOutput(logits, guided)

    def commit(self, state: InfinityState, step: Step, draw: Draw) -> None:
        si, b, acc = step.si, state.batch, state.accel
        h, w = self.schedule[si]
        state.kv_bytes.append(state.cache.nbytes())
        skipped = acc is not None and bool(acc.skipped[:, si].all())  # every sample skipped the step: no change
        state.kv_bytes_current.append(0 if skipped else state.cache.current_nbytes())
        if skipped:
            state.bits.append(torch.full((b, h * w, self.cfg.bits), -1, dtype=torch.long, device=self.device))
            return
        bits = unpatchify(draw.tokens.view(b, h, w, -1), self.patch)  # (B, d, 1, p·h, p·w)
        codes = bits_to_codes(bits)
        frozen = None if acc is None else self.acceleration.frozen_rows(self, state, si)
        if frozen is not None:  # these samples skip the scale (SkipVAR): they add nothing and drew nothing
            codes = codes * (~frozen).view(-1, 1, 1, 1, 1).to(codes.dtype)
            draw.tokens[frozen] = -1
        state.bits.append(draw.tokens)
        self._add_codes(state, si, codes)
        if acc is not None:
            self.acceleration.after_commit(self, state, si)

    def _add_codes(self, state: InfinityState, si: int, codes: Tensor) -> None:
        """f̂ += the scale's codes (upsampled), and the next scale's input from f̂."""
        if si == len(self.schedule) - 1:
            state.f_hat = state.f_hat + codes
            return
        state.f_hat = state.f_hat + resize(codes, tuple(state.f_hat.shape[-2:]))
        nh, nw = self.schedule[si + 1]
        nxt = patchify(resize(state.f_hat, (self.patch * nh, self.patch * nw)), self.patch)  # (B, l', d)
        with self._autocast():
            state.x = self.net.embed_input(nxt).repeat(len(state.text.cond) // state.batch, 1, 1)

    def tokens(self, state: InfinityState) -> list[Tensor]:
        """(B, h·w) int64 per scale: each token's d bits as its index in the 2^d BSQ codebook, bit 0 the most
        significant (the official `lfq.mask` order); d ≤ 56 fits int64. The bits themselves are `state.bits`."""
        d = self.cfg.bits
        weights = 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64, device=self.device)
        return [(b.long() * weights).sum(-1).masked_fill_(b[..., 0] < 0, -1) for b in state.bits]  # -1: skipped

    def probe_image(self, f_hat: Tensor, side: int) -> Tensor:
        """SkipVAR's preview: f̂ resized (trilinear) to the first grid `side` tall (scale 4, 8x8), decoded."""
        h, w = next((g for g in self.schedule if g[0] >= side), self.schedule[-1])
        small = resize(f_hat, (self.patch * h, self.patch * w)).squeeze(2)
        small = small.to(self.vae.decoder.conv_in.conv.weight.dtype).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.vae.decode(small).float()

    def decode(self, state: InfinityState) -> Tensor:
        """(B, 3, H, W) float32 image in [0, 1]."""
        # Channels-last in every mode: the official f̂ has channels-last strides (its codes are a permuted view),
        # so the official decode runs the NHWC convolutions; NCHW differs by ~1e-5 (one uint8 level).
        f = state.f_hat.squeeze(2).to(self.vae.decoder.conv_in.conv.weight.dtype)
        f = f.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            img = self.vae.decode(f)
        return img.float().add_(1).div_(2).contiguous()

    # -- engine ----------------------------------------------------------------------------------
    def _network_step(self, x: Tensor, mods, text_kv, text_mask: Tensor, rope, cache, mix) -> Tensor:
        return self.net.run_blocks(x, mods, text_kv, text_mask, rope, cache, mix=mix)

    def _cache(self, batch: int) -> StaticKVCache | ConcatKVCache | CompressedKVCache:
        if getattr(self.kv_policy, "compresses", False):  # budget-sized buffers, compacted in place per scale
            self._static_cache = self.kv_policy.cache(self, batch, self._static_cache)
            return self._static_cache
        ragged = self.acceleration is not None and self.acceleration.ragged_cache(self)
        if not self.engine.static_kv_cache or ragged:  # blocks that write different counts: concatenate
            return ConcatKVCache(self.cfg.depth)
        capacity = self.begin_ends[-1][1]
        c = self._static_cache
        if not isinstance(c, StaticKVCache) or c.k.shape[1] != batch or c.capacity != capacity:
            self._static_cache = c = None  # free the old buffer before allocating the new one
            c = StaticKVCache(self.cfg.depth, batch, self.cfg.heads, capacity, self.cfg.width // self.cfg.heads,
                              self.dtype, self.device)
            self._static_cache = c
        c.reset()
        return c

    # -- KV policies -----------------------------------------------------------------------------
    @property
    def kv_geometry(self) -> KVGeometry:
        """What a KV policy reads: layers, heads, width and the (square) scale sides of the current schedule."""
        if any(h != w for h, w in self.schedule):
            raise ValueError(f"KV policy {getattr(self.kv_policy, 'name', None)!r} needs a square scale schedule "
                             f"(h_div_w 1.0); this one is {self.schedule[-1][0]}x{self.schedule[-1][1]} at its last "
                             "scale (the compressed cache counts pn² tokens per scale)")
        return KVGeometry(self.cfg.depth, self.cfg.heads, self.cfg.width, self.patch_nums)

    def _check_policy(self) -> None:
        if getattr(self.kv_policy, "compresses", False):
            self.kv_geometry  # noqa: B018  (raises on a non-square schedule)

    @property
    def kv_buffer(self) -> StaticKVCache | CompressedKVCache | None:
        """The preallocated cache kept for the next call of the same shape (None before the first)."""
        return self._static_cache

    def set_kv_policy(self, policy) -> None:
        """Runs later calls with another KV policy (a calibration pass records with its own); the buffer kept
        for the old one is dropped."""
        if getattr(policy, "compresses", False) and self.engine.cuda_graphs:
            raise ValueError(f"KV policy {policy.name!r} evicts per scale; it cannot run with cuda_graphs")
        self.kv_policy, self._static_cache = policy, None
        self._check_policy()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.engine.weights_in_precision:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- what the evaluator reads (the Variant protocol) ---------------------------------------------
    @property
    def depth(self) -> int:
        return self.cfg.depth

    def stages(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(self.name, tuple(range(len(self.schedule))))]

    def flops_per_image(self) -> float:
        """Model FLOPs (2 per MAC) of one guided generation: both halves, attention over the cache, the head on
        the guided rows; text encoding and VAE decode excluded."""
        c, f, depth, bits = self.cfg.width, self.cfg.ffn, self.cfg.depth, self.cfg.bits
        sizes = [h * w for h, w in self.schedule]
        n = sum(sizes)
        pairs = sum(k * sum(sizes[: i + 1]) for i, k in enumerate(sizes))  # (query, cached key) pairs
        text = max((p.shape[0] for p in self.prompts), default=0)
        # MACs per half: qkv + proj + cross q + proj (6C²), FFN (2CF), attention over the cache and the text
        block = 6 * c * c * n + 2 * c * f * n + 2 * c * pairs + 2 * c * text * n
        per_half = depth * block + 2 * bits * c * n  # + the head
        return float(2 * (2 * per_half + bits * c * (n - 1)))  # 2 FLOPs per MAC; word_embed on the B rows

    def vae_decode_flops(self) -> float:
        h, w = self.schedule[-1]
        return decode_flops(self.vae.cfg, (self.patch * h, self.patch * w))

    def kv_report(self, state) -> dict[str, list[int]]:
        return {"kv_bytes_per_scale": list(getattr(state, "kv_bytes", [])),
                "kv_bytes_current_per_scale": list(getattr(state, "kv_bytes_current", []))}

    def teacher_forced(self, text: Tensor, text_mask: Tensor, x_in: Tensor) -> Tensor:
        """The training forward (B, L, 2d) on this variant's schedule: inputs of scales 1.. (B, L − 1, d)."""
        n = self.begin_ends[-1][1]
        padded = -(-n // 128) * 128
        cos, sin = self._rope
        rope = F.pad(cos, (0, 0, 0, padded - n), value=1.0), F.pad(sin, (0, 0, 0, padded - n))
        with self._autocast():
            return self.net(text.to(self.device), text_mask.to(self.device), x_in.to(self.device), self.schedule,
                            rope)
