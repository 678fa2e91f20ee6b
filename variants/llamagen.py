"""LlamaGen c2i (Sun et al. 2024, arXiv:2406.06525) as a variant of the one loop: raster next-token AR.

How a raster model fits the scale loop: the image is ONE scale (`patch_nums = (grid,)`, e.g. (16,) at 256 px with
VQ-16), sampled token by token. Step `Step(si=0, sub=n)` is the network evaluation that yields token n in raster
order (sub 0 is the class-token prefill), so `tokens()` returns the loop's one (B, grid²) map per scale, the
per-scale sampling settings have one value, and every step draws from the one "main" stream, in the official order.
`cfg_interval` marks the steps past it with cfg_ratio 0 (conditional logits only, the null rows still computed, as
the official loop does); with cfg <= 1 only the B conditional rows run (`start` reads the call's SampleConfig). The
family's sampler is `sample_raster` (harness/core/sampling_raster.py).

A step feeds `state.x` (the class embeddings, then the embeddings of the tokens last drawn) at positions
`state.pos`…, and `commit` writes whatever the draw holds (B, l) at the next l raster slots. A raster
acceleration (variants/accel/raster.py: SJD, LANTERN, ZipAR; set by `apply_acceleration`) takes over `steps`,
`forward` and `commit` through the small helpers below (`run`, `embed_rows`, `write_tokens`, `guided_at`): it
feeds several positions per step, carries drafts that the sampling layer verifies, and extends the step list.

Engine (the baseline): one KV buffer kept between calls and written in place at device-tensor positions, the
one-token step attending over the whole buffer under a causal-mask row (one shape for every step), so it can be
compiled and captured as one CUDA graph; the VQ decoder held in the compute precision (NHWC). Reference
(`EngineConfig.reference()`): the official algorithm and numerics (a fresh cache per call, positions and masks
built per step, fp32 VQ decode). Both hold the whole transformer in the compute precision, because the official
sample scripts do (`model.to(dtype=precision)`): `weights_in_precision` changes nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from varbench.harness.core.loop import Step, StepOutput
from varbench.harness.core.sampling import Draw, SampleConfig
from varbench.harness.core.sampling_raster import sample_raster

from .engine import DTYPES, EngineConfig
from .factory import register_model
from .llamagen_loading import (
    RELEASED_GPT,
    RELEASED_VQ,
    load_llamagen_net,
    load_llamagen_vq,
    random_llamagen_net,
    random_llamagen_vq,
    released_source,
)
from .llamagen_model import SIZES, LlamaGenConfig, LlamaGenNet, TokenKVCache, flops_per_image
from .llamagen_vq import LlamaGenVQ, VQConfig, vq_decode_flops
from .params import OneNetwork

__all__ = ["LLAMAGEN_SAMPLING", "TEST_CONFIG", "LlamaGen", "RasterState", "build_llamagen", "cfg_steps"]


@dataclass
class RasterState:
    labels: Tensor  # (B,)
    x: Tensor  # (2B, l, C) embeddings the next step feeds: the class tokens (conditional, then null), then codes
    cache: TokenKVCache
    tokens: Tensor  # (B, N) int64 codes in raster order; valid up to `filled`
    guided: bool = True  # rows for the null class too (cfg > 1); without guidance only the B conditional rows
    pos: int = 0  # sequence position of x's first row (0 = class token, 1 + n = image token n)
    filled: int = 0
    kv_bytes: list[int] = field(default_factory=list)
    accel: Any = None  # a raster acceleration's per-call state (variants/accel/raster.py), None without one


def cfg_steps(n_tokens: int, cfg_interval: float) -> list[bool]:
    """Which tokens are sampled with guidance: the prefill (token 0) always; decode step i (token i + 1) unless
    cfg_interval > -1 and i > cfg_interval (official generate.py's cfg_flag)."""
    return [n == 0 or not (cfg_interval > -1 and n - 1 > cfg_interval) for n in range(n_tokens)]


class LlamaGen(OneNetwork):
    """A LlamaGen transformer + VQ tokenizer behind the loop's hooks, and what the evaluator reads of it."""

    has_kv_cache: bool = False  # the scale-wise KV policies do not apply to a token cache
    raster: bool = True  # next-token decoding: the raster accelerations apply (variants/accel/raster.py)
    reads_sampling: bool = True  # start() is given the SampleConfig: no null rows when cfg <= 1, as the official
    default_sampling: SampleConfig | None = None

    def __init__(self, net: LlamaGenNet, vq: LlamaGenVQ, engine: EngineConfig = EngineConfig(),
                 device: str | torch.device = "cpu", name: str = "llamagen", cfg_interval: float = -1):
        engine = engine.resolved(device)
        self.name, self.engine, self.device = name, engine, torch.device(device)
        self.weights = "modules given by the caller"
        if engine.cuda_graphs and (self.device.type != "cuda" or not engine.static_kv_cache):
            raise ValueError("cuda_graphs needs a CUDA device and static_kv_cache (the graph holds the buffer)")
        self.dtype = DTYPES[engine.precision]
        self.cfg: LlamaGenConfig = net.cfg
        self.net, self.vq = net.to(self.device).eval(), vq.to(self.device).eval()
        if self.dtype != torch.float32:  # the official `.to(dtype)`; RoPE stays fp32 (a plain attribute there)
            rope = self.net.rope
            self.net.to(self.dtype)
            self.net.rope = rope
            if engine.weights_in_precision:  # the official decodes in fp32; the engine in the compute precision
                self.vq.decoder.to(self.dtype)
                self.vq.post_quant_conv.to(self.dtype)
        if engine.channels_last_vae:
            self.vq.decoder.to(memory_format=torch.channels_last)
        if self.cfg.vocab_size != self.vq.cfg.codebook_size:
            raise ValueError(f"the transformer predicts {self.cfg.vocab_size} codes but the VQ tokenizer has "
                             f"{self.vq.cfg.codebook_size}: they are not a pair")
        self.cfg_interval = cfg_interval
        self.sampler = sample_raster  # an instance attribute: the loop calls it as a plain function
        self.patch_nums: tuple[int, ...] = (self.cfg.grid,)
        self.num_classes = self.cfg.num_classes
        self._positions = torch.arange(self.cfg.cache_len, device=self.device)
        self._buffer: TokenKVCache | None = None  # the engine's cache, kept for the next call of the same shape
        self._step_fn = self.net.step
        if engine.compile:
            self._step_fn = torch.compile(self.net.step, dynamic=False)
        self._graph: _StepGraph | None = None
        self.acceleration = None  # a RasterAcceleration, set by apply_acceleration (variants/accel/)
        self.acceleration_record: dict = {}

    # -- hooks -----------------------------------------------------------------------------------
    def steps(self) -> Sequence[Step]:
        if self.acceleration is not None:
            return self.acceleration.steps(self)
        guided = cfg_steps(self.cfg.block_size, self.cfg_interval)
        return [Step(0, n, 1.0 if g else 0.0) for n, g in enumerate(guided)]

    def start(self, labels: Tensor, sampling: SampleConfig | None = None) -> RasterState:
        """`sampling` (the loop passes it): with cfg <= 1 the official generate() runs the B conditional rows only."""
        labels = labels.to(self.device)
        guided = sampling is None or sampling.cfg_at(0) > 1.0
        rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels  # cond first
        state = RasterState(labels, self.net.class_embed(rows), self._cache(len(rows)),
                            torch.zeros(len(labels), self.cfg.block_size, dtype=torch.long, device=self.device),
                            guided)
        if self.engine.cuda_graphs:
            self._graph = _StepGraph.ready(self._graph, self, state)
        if self.acceleration is not None:
            state.accel = self.acceleration.begin(self, state)
        return state

    def forward(self, state: RasterState, step: Step) -> StepOutput:
        if state.accel is not None:
            return self.acceleration.forward(self, state, step)
        n = state.x.shape[1]
        if self._graph is not None and n == 1:
            logits = self._graph.replay(state)
        else:
            logits = self._step_fn(state.x, self._at(state.pos, n), state.cache)
        state.cache.length = state.pos + n
        return StepOutput(logits, guided=state.guided)

    def commit(self, state: RasterState, step: Step, draw: Draw) -> None:
        if state.accel is not None:
            return self.acceleration.commit(self, state, step, draw)
        self.write_tokens(state, draw.tokens)

    # -- what a raster acceleration calls ------------------------------------------------------------
    def run(self, state: RasterState, x: Tensor, pos: int | Tensor) -> Tensor:
        """(R, l, V) logits of embeddings `x` fed at sequence positions pos…pos+l−1 (or at the (l,) positions
        given), written into the cache."""
        logits = self._step_fn(x, self._at(pos, x.shape[1]) if isinstance(pos, int) else pos, state.cache)
        if isinstance(pos, int):  # given positions: the caller knows the extent on the host and sets it
            state.cache.length = pos + x.shape[1]
        return logits

    def embed_rows(self, state: RasterState, tokens: Tensor) -> Tensor:
        """(B, l) codes -> (R, l, C) embeddings for every row the step runs (the null rows repeat them)."""
        x = self.net.token_embed(tokens)
        return torch.cat([x, x]) if state.guided else x  # the official cat([x, x]) with guidance

    def write_tokens(self, state: RasterState, tokens: Tensor, at: Tensor | None = None) -> None:
        """Makes (B, l) tokens final: at the next l raster slots (then the last one is the next input), or at the
        raster indices `at` (ZipAR's parallel rows, which feed their own inputs)."""
        n = tokens.shape[1]
        if at is None:
            state.tokens[:, state.filled: state.filled + n] = tokens
            state.pos = state.filled + n  # the next input is token filled + n − 1, at its position
            state.x = self.embed_rows(state, tokens[:, -1:])
        else:
            state.tokens[:, at] = tokens
        state.filled += n
        if state.filled == self.cfg.block_size:
            state.kv_bytes.append(state.cache.nbytes())

    def guided_at(self, token: int) -> float:
        """cfg_ratio of the step that samples raster token `token` first (official cfg_interval rule)."""
        return 1.0 if cfg_steps(token + 1, self.cfg_interval)[token] else 0.0

    def tokens(self, state: RasterState) -> list[Tensor]:
        return [state.tokens]

    def decode(self, state: RasterState) -> Tensor:
        """(B, 3, H, W) float32 in [0, 1]: the decoder's [-1, 1] image clamped, as the official save_image does."""
        z = self.vq.codes_to_latent(state.tokens, self.cfg.grid).to(self.vq.post_quant_conv.weight.dtype)
        if self.engine.channels_last_vae:
            z = z.contiguous(memory_format=torch.channels_last)
        img = self.vq.decode_latent(z)
        return img.float().clamp_(-1, 1).add_(1).mul_(0.5).contiguous()

    # -- engine ----------------------------------------------------------------------------------
    def _at(self, pos: int, n: int) -> Tensor:
        """Sequence positions pos..pos+n-1 as a device tensor: a view of a kept range (engine), or built per step
        as the official loop does (reference)."""
        if self.engine.cache_conditioning:
            return self._positions[pos: pos + n]
        return torch.arange(pos, pos + n, device=self.device)

    def _cache(self, rows: int) -> TokenKVCache:
        if not self.engine.static_kv_cache:
            return TokenKVCache(self.cfg, rows, self.dtype, self.device)  # the official setup_caches per call
        if self._buffer is None or self._buffer.rows != rows:
            self._buffer, self._graph = None, None  # free the old buffer (and its graph) first
            self._buffer = TokenKVCache(self.cfg, rows, self.dtype, self.device)
        self._buffer.reset()
        return self._buffer

    # -- what the evaluator reads (the Variant protocol) ---------------------------------------------
    @property
    def depth(self) -> int:
        return self.cfg.n_layer

    def stages(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(self.name, (0,))]

    def flops_per_image(self) -> float:
        return flops_per_image(self.cfg)

    def vae_decode_flops(self) -> float:
        return vq_decode_flops(self.vq.cfg, self.cfg.grid)

    def kv_report(self, state) -> dict[str, list[int]]:
        """Bytes of keys and values held at the end (the one scale's own: all of them)."""
        held = list(getattr(state, "kv_bytes", []))
        return {"kv_bytes_per_scale": held, "kv_bytes_current_per_scale": held}

    @property
    def kv_buffer(self) -> TokenKVCache | None:
        return self._buffer


class _StepGraph:
    """The one-token step captured as one CUDA graph over static inputs (embeddings, position) and the kept cache:
    the prefill and every decode step replay it."""

    def __init__(self, variant: LlamaGen, state: RasterState):
        self.rows, self.cache = state.x.shape[0], state.cache
        self.x = torch.zeros_like(state.x)
        self.pos = torch.zeros(1, dtype=torch.long, device=variant.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS workspaces, compiled kernels)
            for _ in range(2):
                variant._step_fn(self.x, self.pos, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = variant._step_fn(self.x, self.pos, self.cache)
        self._positions = variant._positions

    @classmethod
    def ready(cls, graph: _StepGraph | None, variant: LlamaGen, state: RasterState) -> _StepGraph:
        if graph is None or graph.rows != state.x.shape[0] or graph.cache is not state.cache:
            graph = cls(variant, state)
        return graph

    def replay(self, state: RasterState) -> Tensor:
        self.x.copy_(state.x)
        self.pos.copy_(self._positions[state.pos: state.pos + 1])
        self.graph.replay()
        return self.out


# The tiny model of the conformance fixture (../conformance/llamagen_tiny): 2 layers, 2 heads, width 64, 256 codes.
TEST_CONFIG = LlamaGenConfig(n_layer=2, n_head=2, dim=64, vocab_size=256, block_size=256)
# FID protocol per size (GETTING_STARTED.md @ce98ec41: cfg 2.0 for B and L, 1.75 for XL and XXL, 1.65 for 3B;
# sample_c2i_ddp.py: top-k 0, top-p 1.0, temperature 1.0).
LLAMAGEN_SAMPLING = {size: SampleConfig(cfg=cfg, top_k=0, top_p=1.0, temperature=1.0)
                     for size, cfg in {"b": 2.0, "l": 2.0, "xl": 1.75, "xxl": 1.75, "3b": 1.65}.items()}
_VQ_SOURCE = "hf:FoundationVision/LlamaGen/"


def build_llamagen(size: str, *, weights: str | None = None, vae: str | LlamaGenVQ | None = None,
                   image_size: int | None = None, engine: EngineConfig = EngineConfig(), device: str = "cpu",
                   seed: int = 0, cfg_interval: float = -1, n_head: int | None = None, vae_ch: int = 128,
                   allow_download: bool | None = None, name: str | None = None, kv_policy=None,
                   config: LlamaGenConfig | None = None) -> LlamaGen:
    """A LlamaGen c2i variant.

    Args:
        size: "b", "l", "xl", "xxl", "3b" (the released GPT sizes) or "test" (TEST_CONFIG).
        weights: checkpoint source (path, hf:OWNER/REPO/FILE); None = the released c2i file of this size and image
            size; "random" = random weights (speed benchmarks, tests).
        vae: VQ tokenizer source, or a built one; None = the released vq_ds16_c2i.pt (random with random weights).
        image_size: 256 or 384 (sets the 16x16 or 24x24 grid); default 256 for B and L, 384 for the others.
        cfg_interval: guidance only on decode steps i <= cfg_interval (-1: every step), as official generate().
        n_head: head count of a checkpoint of an unreleased width (a state dict does not store it).
        vae_ch, config: architecture of random models (vae_ch: the VQ width).
        kv_policy: None or `full`; the scale-wise compressing policies do not apply to a token cache.
    """
    if kv_policy is not None and getattr(kv_policy, "name", None) != "full":
        raise ValueError(f"KV policy {getattr(kv_policy, 'name', kv_policy)!r} cannot apply to LlamaGen: the "
                         "policies compress per scale, and a raster model has no KV cache of scales (its cache holds "
                         "tokens); use None or full")
    if size != "test" and size not in SIZES:
        raise ValueError(f"unknown LlamaGen size {size!r}; choose from {', '.join(SIZES)} or test")
    image_size = image_size or (RELEASED_GPT[size][0] if size in RELEASED_GPT else 256)
    if image_size % 16:
        raise ValueError(f"image_size {image_size} is not a multiple of the VQ-16 downsampling")
    if weights == "random":
        cfg = config or (TEST_CONFIG if size == "test" else
                         LlamaGenConfig(*SIZES[size], block_size=(image_size // 16) ** 2))
        net = random_llamagen_net(cfg, seed)
    else:
        if weights is None and size == "test":
            raise ValueError("test_llamagen has no released weights: pass weights='random' or a checkpoint path")
        source = weights or released_source(size, image_size)
        if size == "test":  # a file of the tiny architecture (the conformance fixture's): its head count
            net = load_llamagen_net(source, image_size, 16, None, n_head or TEST_CONFIG.n_head, allow_download)
        else:
            net = load_llamagen_net(source, image_size, 16, size, n_head, allow_download)
    if isinstance(vae, LlamaGenVQ):
        vq_model = vae
    elif vae == "random" or (vae is None and weights == "random"):
        vq_model = random_llamagen_vq(VQConfig(ch=vae_ch, codebook_size=net.cfg.vocab_size), seed)
    else:
        vq_model = load_llamagen_vq(vae or _VQ_SOURCE + RELEASED_VQ[16], allow_download)
    if vq_model.cfg.downsample != 16:
        raise ValueError(f"the c2i transformers are trained on VQ-16 codes; this tokenizer is VQ-{vq_model.cfg.downsample}")
    variant = LlamaGen(net, vq_model, engine, device, name or ("test_llamagen" if size == "test" else f"llamagen_{size}"),
                       cfg_interval)
    variant.weights = f"random (seed {seed})" if weights == "random" else str(weights or released_source(size, image_size))
    if size in LLAMAGEN_SAMPLING and weights != "random":
        variant.default_sampling = LLAMAGEN_SAMPLING[size]  # the published FID protocol; studies pass their own
    return variant


# The released c2i models (README @ce98ec41: parameters, file, FID on ImageNet 256x256 evaluation).
_RELEASED_DOC = {"b": "111M, c2i_B_{256,384}.pt (README FID 5.46 / 6.09)",
                 "l": "343M, c2i_L_{256,384}.pt (README FID 3.80 / 3.07)",
                 "xl": "775M, c2i_XL_384.pt (README FID 2.62)", "xxl": "1.4B, c2i_XXL_384.pt, FSDP (README FID 2.34)",
                 "3b": "3.1B, c2i_3B_384.pt, FSDP (README FID 2.18)"}
for _size, _what in _RELEASED_DOC.items():
    register_model(f"llamagen_{_size}", build_llamagen,
                   LlamaGenConfig(*SIZES[_size], block_size=(RELEASED_GPT[_size][0] // 16) ** 2),
                   f"LlamaGen GPT-{_size.upper()} c2i, raster AR, {_what}. Weights: FoundationVision/LlamaGen "
                   f"(vq_ds16_c2i.pt tokenizer).", has_kv_cache=False, accelerates="raster", fixed={"size": _size})
register_model("test_llamagen", build_llamagen, TEST_CONFIG,
               "Tiny random LlamaGen (2 layers, width 64, 256 codes, VQ-16 ch 32) for tests and CPU smoke runs.",
               has_kv_cache=False, accelerates="raster", fixed={"size": "test"}, defaults={"weights": "random", "vae_ch": 32})
