"""Model-size presets: the trained zoo's tokenizer and transformer sizes, a test preset, and the official
ImageNet 256 px sizes. Variants (variants/zoo.py) build their architectures from these; the trainer
(harness/train) trains at them."""

from __future__ import annotations

from dataclasses import dataclass

from .hmar_model import HMARConfig
from .var_model import PATCH_NUMS, VARConfig
from .vqvae import VQVAEConfig

__all__ = ["ModelSizes", "ZOO", "TINY", "IMAGENET256", "ZOO_IMAGE_SIZE", "ZOO_PATCH_NUMS", "ZOO_NUM_CLASSES",
           "ZOO_VAR_DEPTHS", "ZOO_CODE_DRAFT_STEPS", "sizes", "var_config", "hmar_config", "hmar_n_layers_train"]

ZOO_CODE_DRAFT_STEPS = 5  # CoDe on the zoo: the refiner makes scales 6x6 and 8x8 (see variants/zoo.py)
ZOO_IMAGE_SIZE = 64
ZOO_PATCH_NUMS: tuple[int, ...] = PATCH_NUMS[155]  # (1, 2, 3, 4, 5, 6, 8): L = 155 tokens on an 8x8 latent
ZOO_NUM_CLASSES = 10
ZOO_VAR_DEPTHS: tuple[int, ...] = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class ModelSizes:
    """One preset: the tokenizer and how VAR transformers on top of it are sized."""

    name: str
    vqvae: VQVAEConfig
    width_per_depth: int = 64  # VAR width = 64·depth and heads = depth (head dim 64), as in the released VARs
    patch_nums: tuple[int, ...] = ZOO_PATCH_NUMS
    num_classes: int = ZOO_NUM_CLASSES
    image_size: int = ZOO_IMAGE_SIZE  # px: the VQVAE's downsampling (2^(levels−1)) times patch_nums[-1]


# The zoo: an 8x VQVAE (64 px -> 8x8 latent; three downsamples), vocab 512, Cvae 16, one res block per level;
# VARs of width 32·depth (head dim 32). Width 64·depth was tried first: after 500 steps d4 and d5 ended above
# d3 (held-out CE 1.729 and 1.741 against 1.674, and d4 stayed above d3 at a 1/width lr), so at this data and
# budget the sizes past ~2 M parameters had nothing left to learn: the loss fit needs the range below it.
ZOO = ModelSizes("zoo", VQVAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, vocab_size=512, z_channels=16,
                                    num_phi=4, hit_rows=len(ZOO_PATCH_NUMS)), width_per_depth=32)
# Test preset: same schedule and image size, a much thinner tokenizer and width 32·depth.
TINY = ModelSizes("tiny", VQVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, vocab_size=64, z_channels=8,
                                      num_phi=4, hit_rows=len(ZOO_PATCH_NUMS)), width_per_depth=32)
# Real size, for ImageNet folders (`train --data`): the official tokenizer vae_ch160v4096z32 (VQVAEConfig's
# defaults: ch 160, ch_mult (1,1,2,2,4), 2 res blocks, vocab 4096, Cvae 32) and VARConfig's defaults (the 256 px
# schedule of 10 scales, 1000 classes); width 64·depth, heads = depth; 16x downsampling · 16 = 256 px
# (docs/VAR_SPEC.md §1).
_OFFICIAL_VAR = VARConfig()
IMAGENET256 = ModelSizes("imagenet256", VQVAEConfig(), width_per_depth=64, patch_nums=_OFFICIAL_VAR.patch_nums,
                         num_classes=_OFFICIAL_VAR.num_classes, image_size=256)
_PRESETS = {p.name: p for p in (ZOO, TINY, IMAGENET256)}


def sizes(preset: str) -> ModelSizes:
    try:
        return _PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown size preset {preset!r}; known: {', '.join(_PRESETS)}") from None


def var_config(preset: str, depth: int) -> VARConfig:
    p = sizes(preset)
    return VARConfig(depth=depth, width=p.width_per_depth * depth, heads=depth, patch_nums=p.patch_nums,
                     vocab_size=p.vqvae.vocab_size, z_channels=p.vqvae.z_channels, num_classes=p.num_classes)


def hmar_n_layers_train(depth: int) -> int:
    """Blocks of each private HMAR path (ns and mask): half the depth, at least 1, at most 8. The official build
    uses 8 at every released depth (16-30, HMAR_SPEC §1), which this gives; for the zoo's small depths a fixed 8
    is impossible, and half keeps a shared base as d16's 8 + 8 does (d1: 0 base + 1, d2: 1 + 1, d5: 3 + 2)."""
    return min(8, max(1, depth // 2))


def hmar_config(preset: str, depth: int) -> HMARConfig:
    """An HMAR of the preset's sizes: VAR's width and heads per depth, plus `hmar_n_layers_train(depth)`."""
    p = sizes(preset)
    return HMARConfig(depth=depth, width=p.width_per_depth * depth, heads=depth,
                      n_layers_train=hmar_n_layers_train(depth), patch_nums=p.patch_nums,
                      vocab_size=p.vqvae.vocab_size, z_channels=p.vqvae.z_channels, num_classes=p.num_classes)
