"""The registered Infinity models: infinity_2b, infinity_8b (released weights) and test_infinity (tiny, random).

Released files: Hugging Face FoundationVision/Infinity (infinity_2b_reg.pth + infinity_vae_d32reg.pth;
infinity_8b_weights/ + infinity_vae_d56_f8_14_patchify.pth). Sampling presets: scripts/infer.sh and
gen_one_img's defaults for 2B (cfg 4, tau 0.5, top-k 900, top-p 0.97), the 8B notebook's tau 1.0 with cfg 3.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from varbench.harness.core.checkpoints import CheckpointError
from varbench.harness.core.sampling import SampleConfig

from .bsq_vae import BSQVAE, BSQVAEConfig
from .engine import EngineConfig
from .factory import register_model
from .infinity import Infinity
from .infinity_loading import (
    INFINITY_FILES,
    load_bsq_vae,
    load_infinity_net,
    random_bsq_vae,
    random_infinity_net,
)
from .infinity_model import InfinityConfig

__all__ = ["build_infinity", "INFINITY_MODELS", "random_prompts"]

# model -> (transformer, VAE, sampling preset, released files (transformer, VAE))
INFINITY_MODELS: dict[str, tuple[InfinityConfig, BSQVAEConfig, SampleConfig | None, tuple[str, str]]] = {
    "2b": (InfinityConfig(), BSQVAEConfig(),
           SampleConfig(cfg=4.0, top_k=900, top_p=0.97, temperature=0.5), ("infinity_2b", "vae_d32")),
    "8b": (InfinityConfig(depth=40, width=3584, heads=28, bits=56, pool_heads=16),
           BSQVAEConfig(codebook_dim=14, patch_size=8, ch_mult=(1, 2, 4, 4)),
           SampleConfig(cfg=3.0, top_k=900, top_p=0.97, temperature=1.0), ("infinity_8b", "vae_d56")),
    "test": (InfinityConfig(depth=2, width=64, heads=2, text_channels=64, text_maxlen=16, bits=16, pool_heads=2,
                            chunks=1),
             BSQVAEConfig(codebook_dim=16, ch=8, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1),
             None, ("", "")),  # random test models sample with the study's settings
}


def random_prompts(text_channels: int, count: int = 8, seed: int = 0) -> list[Tensor]:
    """Stand-ins for T5 outputs: `count` prompts of 3.. tokens, N(0, 0.25²) (as the fixture's)."""
    gen = torch.Generator().manual_seed(seed)
    return [0.25 * torch.randn(3 + i % 6, text_channels, generator=gen) for i in range(count)]


def _source(given: str | os.PathLike | None, role: str, model: str) -> str | os.PathLike:
    if given is not None:
        return given
    if role == "infinity_8b":
        raise CheckpointError(f"infinity_{model} needs its sharded weights: download {INFINITY_FILES[role]} and "
                              "pass weights=PATH_TO_THE_FOLDER")
    return INFINITY_FILES[role]


def build_infinity(model: str = "2b", *, weights: str | os.PathLike | None = None,
                   vae: str | os.PathLike | BSQVAE | None = None,
                   prompts: str | os.PathLike | Sequence[Tensor] | Sequence[str] | dict | None = None,
                   negative: Tensor | str | None = None, text_encoder=None,
                   engine: EngineConfig = EngineConfig(), device: str = "cpu", seed: int = 0, h_div_w: float = 1.0,
                   pn: str | None = None, cfg_insertion_layer: int = 0, xattn: str = "bf16",
                   allow_download: bool | None = None, name: str | None = None, kv_policy=None,
                   acceleration: str | None = None, acceleration_args: dict | None = None) -> Infinity:
    """An Infinity variant.

    Args:
        model: "2b", "8b" or "test" (architecture, VAE and sampling preset of INFINITY_MODELS).
        weights: transformer file (2B), shard folder (8B), hf:OWNER/REPO/FILE, or "random".
        vae: BSQ VAE file, a built BSQVAE, or "random"; None = the released file of the model.
        prompts: T5 embeddings, one (len, Ct5) tensor per prompt (or a .pt file of them), or prompt strings for
            `text_encoder`; labels index them. The test model defaults to 8 random stand-ins.
        negative: a negative prompt (embedding or string), which replaces the learned unconditional text.
        text_encoder: encodes string prompts: a name of text_encoders.TEXT_ENCODERS, a .pt file of precomputed
            {prompt: embedding}, or an encoder; None = flan_t5_xl (the test model: a tiny random T5).
        h_div_w, pn: aspect ratio (nearest template) and size (0.06M, 0.25M, 0.60M, 1M; default 1M, test 0.06M).
        cfg_insertion_layer: 0 = guidance on logits; k < 0 = on the hidden state after block depth + k.
        xattn: "bf16" (the official cross-attention numerics) or "fp32".
        kv_policy: a KV-cache policy object from `KV_POLICIES` (None or `full` keeps every entry); compressing
            ones evict per CFG half, batch row and head, and need a square schedule (h_div_w 1.0).
        acceleration, acceleration_args: a registered acceleration that runs on Infinity (fastvar, skipvar) and
            its arguments, with the official Infinity defaults (variants/accel/); None or "none": plain Infinity.
    """
    if kv_policy is not None and not hasattr(kv_policy, "prepare"):
        raise ValueError(f"{kv_policy!r} is not a KV policy: build one with KV_POLICIES.get(name)(**args)")
    if model not in INFINITY_MODELS:
        raise ValueError(f"unknown Infinity model {model!r}; choose from {', '.join(INFINITY_MODELS)}")
    arch, vae_arch, preset, (net_file, vae_file) = INFINITY_MODELS[model]
    random = (model == "test" and weights is None) or weights == "random"
    if random:
        net = random_infinity_net(arch, seed)
    else:
        net = load_infinity_net(_source(weights, net_file, model), arch, f"infinity_{model}", allow_download)
    if isinstance(vae, BSQVAE):
        vae_model = vae
    elif vae == "random" or (vae is None and random):
        vae_model = random_bsq_vae(vae_arch, seed)
    else:
        vae_model = load_bsq_vae(_source(vae, vae_file, model), allow_download)
    if prompts is None and model == "test":
        prompts = random_prompts(arch.text_channels, seed=seed)
    strings = isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts)
    if strings or isinstance(negative, str):
        encoder = _encoder(text_encoder, model, arch.text_channels, allow_download, device)
        prompts = encoder.encode(list(prompts)) if strings else prompts
        negative = encoder.encode([negative])[0] if isinstance(negative, str) else negative
    variant = Infinity(net, vae_model, engine, device, name or f"infinity_{model}", prompts, negative, h_div_w,
                       pn or ("0.06M" if model == "test" else "1M"), cfg_insertion_layer, xattn, kv_policy)
    variant.default_sampling = preset
    variant.weights = f"random (seed {seed})" if random else str(weights or INFINITY_FILES[net_file])
    if kv_policy is not None:
        kv_policy.prepare(variant)  # offline calibration (ScaleKV, HACK) of this model and schedule, unless loaded
    if acceleration is not None or acceleration_args:
        from .accel import apply_acceleration

        apply_acceleration(variant, acceleration or "none", **(acceleration_args or {}))
    return variant


def _encoder(given, model: str, channels: int, allow_download: bool | None, device: str):
    """The text encoder for string prompts (see build_infinity)."""
    from .text_encoders import PrecomputedEncoder, load_t5_encoder, text_encoder, tiny_t5_encoder

    if given is not None and not isinstance(given, (str, os.PathLike)):
        return given
    if given is None:
        return tiny_t5_encoder(channels) if model == "test" else load_t5_encoder(allow_download=allow_download,
                                                                                  device=device)
    if str(given).endswith(".pt"):
        return PrecomputedEncoder(given)
    return text_encoder(str(given), **({"channels": channels} if given == "test_t5" else {}))


def _listed(cfg: InfinityConfig) -> InfinityConfig | None:
    """The architecture for `varbench list`'s parameter count once variants/params.py counts InfinityConfig
    (until then None, which lists "?" instead of failing)."""
    from . import params

    return cfg if InfinityConfig in getattr(params, "_NETS", {}) else None


# accelerates="scale": the scale-step methods (variants/accel/) plan for these cells; `accel_family` narrows them to
# the ones that run on Infinity (apply_acceleration refuses the others, naming those that run).
_FACTORIES = [
    register_model("infinity_2b", build_infinity, _listed(INFINITY_MODELS["2b"][0]),
                   "Infinity-2B, bitwise next-scale text-to-image, 1024 px (arXiv:2412.04431). Weights: "
                   "FoundationVision/Infinity infinity_2b_reg.pth + infinity_vae_d32reg.pth; prompts as T5 "
                   "embeddings.", has_kv_cache=True, accelerates="scale", fixed={"model": "2b"}),
    register_model("infinity_8b", build_infinity, _listed(INFINITY_MODELS["8b"][0]),
                   "Infinity-8B, 1024 px, 2x2 patchify VAE (arXiv:2412.04431). Weights: FoundationVision/Infinity "
                   "infinity_8b_weights/ (sharded; pass the folder) + infinity_vae_d56_f8_14_patchify.pth.",
                   has_kv_cache=True, accelerates="scale", fixed={"model": "8b"}),
    register_model("test_infinity", build_infinity, _listed(INFINITY_MODELS["test"][0]),
                   "Tiny random Infinity (depth 2, width 64, 16 bits, 256 px at pn 0.06M, 8 random prompts) for "
                   "tests and CPU smoke runs.", has_kv_cache=True, accelerates="scale", fixed={"model": "test"}),
]
for _factory in _FACTORIES:
    _factory.accel_family = Infinity.accel_family  # type: ignore[attr-defined]
