"""Infinity's BSQ tokenizer: the CNN VAE and the multi-scale binary spherical quantizer, written from
docs/INFINITY_SPEC.md §2 (FoundationVision/Infinity@4c27bbb5 infinity/models/bsq_vae/{flux_vqgan,
multiscale_bsq,vae}.py). Parameter names match the official state dict (`.conv.` / `.norm.` wrappers,
the quantizer's `lfq.mask` buffer under both `quantizer.` and its alias `quantize.`), so the released d32
and d56 files load strictly. Nothing is copied from that code.

Latents are kept 5-D (B, d, 1, H, W) where the official code interpolates them, because PyTorch's trilinear
kernel with T = 1 is what the official numerics are (bilinear would sum in another order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BSQVAEConfig", "BSQVAE", "bits_to_codes", "quantize_bsq", "resize", "patchify", "unpatchify"]


@dataclass(frozen=True)
class BSQVAEConfig:
    """Architecture; the default is the 2B model's d32 tokenizer (infinity_vae_d32reg.pth)."""

    codebook_dim: int = 32  # bits per latent position
    patch_size: int = 16  # image pixels per latent position (log2 = number of down/upsamplings)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2

    @property
    def resamplings(self) -> int:
        return int(math.log2(self.patch_size))

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> BSQVAEConfig:
        """Reads the architecture off an official-layout state dict (KeyError if it is not one)."""
        ch = sd["encoder.conv_in.conv.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.conv.weight"].shape[0] // ch for i in levels)
        blocks = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block.")}
        downs = sum(f"encoder.down.{i}.downsample.conv.conv.weight" in sd for i in levels)
        return cls(sd["encoder.conv_out.conv.weight"].shape[0], 2**downs, ch, mult, len(blocks))


def _norm_groups(c: int) -> int:
    return 32 if c % 32 == 0 else 24 if c % 24 == 0 else 1


class _Conv(nn.Module):
    """The official wrapper: the conv sits under `.conv` (3×3, padding 1 unless stated)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Norm(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(_norm_groups(c), c, eps=1e-6, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)  # the official op sequence (F.silu may round differently)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _Norm(c_in), _Conv(c_in, c_out)
        self.norm2, self.conv2 = _Norm(c_out), _Conv(c_out, c_out)
        if c_in != c_out:
            self.nin_shortcut = _Conv(c_in, c_out, 1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(_swish(self.norm2(self.conv1(_swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = _Conv(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, then a stride-2 conv


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = _Conv(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.block_2 = ResnetBlock(c, c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = _Conv(3, ch)
        in_mult, levels, c = (1, *mult), [], ch
        for i, m in enumerate(mult):
            c, blocks = ch * in_mult[i], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, ch * m))
                c = ch * m
            levels.append(_level(blocks, _Downsample(c) if i < cfg.resamplings else None, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _mid(c)
        self.norm_out, self.conv_out = _Norm(c), _Conv(c, cfg.codebook_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        c = ch * mult[-1]
        self.conv_in = _Conv(cfg.codebook_dim, c)
        self.mid = _mid(c)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):  # built coarse to fine, indexed by level (up[i])
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, ch * mult[i]))
                c = ch * mult[i]
            levels.insert(0, _level(blocks, _Upsample(c) if 1 <= i <= cfg.resamplings else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _Norm(c), _Conv(c, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _LFQ(nn.Module):
    """Holds the `lfq.mask` buffer (2^(d-1) … 1) of the official quantizer; BSQ itself has no parameters."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64))


class _Quantizer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lfq = _LFQ(d)


def quantize_bsq(z: Tensor) -> tuple[Tensor, Tensor]:
    """BSQ of (B, d, ...) latents over dim 1: (quantized, bits). quantized = u + (ẑ − u) with u = z/‖z‖ and
    ẑ = ±1/√d (the straight-through form: ẑ up to one fp32 rounding); bit 1 ↔ positive."""
    u = F.normalize(z, dim=1, eps=1e-12)
    zhat = torch.where(u > 0, 1.0, -1.0).to(u.dtype) * (1 / math.sqrt(z.shape[1]))
    q = u + (zhat - u)
    return q, (q > 0).to(torch.uint8)


def bits_to_codes(bits: Tensor) -> Tensor:
    """(B, d, ...) {0,1} bits to BSQ codes ±1/√d, re-normalised over d as the official decode side does."""
    d = bits.shape[1]
    codes = bits.float() * (2 / math.sqrt(d)) - 1 / math.sqrt(d)
    return F.normalize(codes, dim=1, eps=1e-12)


def resize(f: Tensor, size: tuple[int, int], mode: str = "trilinear") -> Tensor:
    """(B, d, 1, H, W) latents to (B, d, 1, h, w): trilinear (non-antialiased) or area, skipped at equal size."""
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    return F.interpolate(f, size=(1, *size), mode=mode)


def patchify(f: Tensor, p: int) -> Tensor:
    """(B, d, 1, H, W) latents to (B, H·W/p², d·p²) tokens, row-major; channel c·p² + p·i + j holds latent
    channel c at (p·y + i, p·x + j)."""
    x = f.squeeze(2)
    if p > 1:
        x = F.pixel_unshuffle(x, p)
    return x.flatten(2).transpose(1, 2)


def unpatchify(bits: Tensor, p: int) -> Tensor:
    """Sampled (B, h, w, d·p²) bits to (B, d, 1, p·h, p·w) latent-layout bits."""
    x = bits.permute(0, 3, 1, 2)
    if p > 1:
        x = F.pixel_shuffle(x, p)
    return x.unsqueeze(2)


class BSQVAE(nn.Module):
    """Encoder, decoder and the (parameter-free) multi-scale BSQ of Infinity's tokenizer."""

    def __init__(self, cfg: BSQVAEConfig = BSQVAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantizer = _Quantizer(cfg.codebook_dim)
        self.quantize = self.quantizer  # the official alias: the buffer appears under both names

    def encode_latent(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) image in [-1, 1] to (B, d, H/patch, W/patch) fp32 raw features."""
        return self.encoder(img)

    def encode_bits(self, z: Tensor, schedule: tuple[tuple[int, int], ...]) -> tuple[list[Tensor], Tensor]:
        """Multi-scale BSQ of raw features (B, d, H, W) on a latent schedule: per scale (B, 1, h, w, d) bits,
        and the quantized latent f (B, d, H, W) = Σ upsampled quantized residuals."""
        residual = z.unsqueeze(2)
        f = torch.zeros_like(residual)
        size = tuple(z.shape[-2:])
        bits = []
        for h, w in schedule:
            q, b = quantize_bsq(resize(residual, (h, w), "area"))
            q_up = resize(q, size)
            residual = residual - q_up
            f = f + q_up
            bits.append(b.permute(0, 2, 3, 4, 1))  # (B, 1, h, w, d)
        return bits, f.squeeze(2)

    def teacher_inputs(self, z: Tensor, schedule: tuple[tuple[int, int], ...],
                       flipped: list[Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
        """The training path (BitwiseSelfCorrection.flip_requant): per scale, the labels (B, h·w, d) and the
        transformer inputs of scales 1.. (B, L − 1, d). `flipped`: per scale (B, 1, h, w, d) bits that replace the
        quantized residual (bitwise self-correction's re-quantisation of flipped bits); None quantizes cleanly."""
        target = z.unsqueeze(2)
        size = tuple(z.shape[-2:])
        cum = torch.zeros_like(target)
        labels, inputs = [], []
        for si, (h, w) in enumerate(schedule):
            q, bits = quantize_bsq(resize(target - cum, (h, w), "area"))
            labels.append(bits.flatten(2).transpose(1, 2).reshape(z.shape[0], h * w, -1))
            if flipped is not None:
                q = bits_to_codes(flipped[si].permute(0, 4, 1, 2, 3))
            cum = cum + resize(q, size)
            if si + 1 < len(schedule):
                inputs.append(patchify(resize(cum, schedule[si + 1]), 1))
        return labels, torch.cat(inputs, dim=1)

    def decode(self, f: Tensor) -> Tensor:
        """(B, d, H, W) latent to a (B, 3, 16H, 16W) image clamped to [-1, 1]."""
        return self.decoder(f).clamp_(-1, 1)


def decode_flops(cfg: BSQVAEConfig, latent_hw: tuple[int, int]) -> float:
    """FLOPs (2 per MAC) of the decoder's convolutions for one latent of size (h, w); norms excluded."""
    h, w = latent_hw
    c = cfg.ch * cfg.ch_mult[-1]
    macs = 9 * cfg.codebook_dim * c * h * w + 2 * 2 * 9 * c * c * h * w  # conv_in, mid blocks
    for i in reversed(range(len(cfg.ch_mult))):
        for b in range(cfg.num_res_blocks + 1):
            c_out = cfg.ch * cfg.ch_mult[i]
            macs += 9 * (c * c_out + c_out * c_out) * h * w + (c * c_out * h * w if c != c_out else 0)
            c = c_out
        if 1 <= i <= cfg.resamplings:
            h, w = 2 * h, 2 * w
            macs += 9 * c * c * h * w
    return float(2 * (macs + 9 * c * 3 * h * w))
