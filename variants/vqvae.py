"""The multi-scale residual VQVAE tokenizer of VAR (vae_ch160v4096z32), written from docs/VAR_SPEC.md §2.

Parameter names and shapes match the official state dict (FoundationVision/VAR@78b95394 models/vqvae.py,
quant.py, basic_vae.py), so official checkpoints load strictly. Nothing is copied from that code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VQVAE", "VQVAEConfig", "phi_index", "decode_flops"]


@dataclass(frozen=True)
class VQVAEConfig:
    """Architecture of the tokenizer; the official one is the default."""

    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    num_phi: int = 4  # share_quant_resi: partially shared φ convs
    phi_ratio: float = 0.5  # φ(h) = (1 - r)·h + r·conv(h)
    hit_rows: int = 10  # rows of the training-only codebook-hit statistic (scales it was trained with)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> VQVAEConfig:
        """Reads the architecture off an official-layout state dict (raises KeyError if it is not one)."""
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        blocks = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block.")}
        vocab, cvae = sd["quantize.embedding.weight"].shape
        phis = {k.split(".")[3] for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")}
        hits = sd["quantize.ema_vocab_hit_SV"].shape[0]
        return cls(ch, mult, len(blocks), vocab, cvae, len(phis), hit_rows=hits)


def phi_index(si: int, num_scales: int, num_phi: int = 4) -> int:
    """Which shared φ conv scale `si` uses: the tick nearest to si/(S-1), first on ties.

    Evaluated in float64 NumPy as the official code does, because for S = 10 the scales 2 and 7 sit
    exactly between two ticks and only the rounding decides ([0,0,1,1,1,2,2,3,3,3]).
    """
    k = num_phi
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


def _group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, scale C^-1/2."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _group_norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale is C^-1/2
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, as in the LDM encoder


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        setattr(level, "downsample" if isinstance(resample, Downsample) else "upsample", resample)
    return level


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    """Res blocks of one resolution level, each followed by its attention block where the level has them."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        levels, c = [], cfg.ch
        for i, m in enumerate(cfg.ch_mult):
            blocks, attn, c_out = [], [], cfg.ch * m
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, c_out))
                c = c_out
                if i == n - 1:  # attention only at the lowest resolution
                    attn.append(AttnBlock(c))
            levels.append(_level(blocks, attn, Downsample(c) if i < n - 1 else None))
        self.down = nn.ModuleList(levels)
        self.mid = _mid(c)
        self.norm_out, self.conv_out = _group_norm(c), nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            blocks, attn, c_out = [], [], cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, c_out))
                c = c_out
                if i == n - 1:
                    attn.append(AttnBlock(c))
            levels.insert(0, _level(blocks, attn, Upsample(c) if i > 0 else None))
        self.up = nn.ModuleList(levels)  # indexed by resolution level, run from the last to the first
        self.norm_out, self.conv_out = _group_norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """The residual refinement conv φ(h) = (1 - r)·h + r·conv(h), shared across scales."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class Quantizer(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = nn.Module()
        self.quant_resi.qresi_ls = nn.ModuleList(Phi(cfg.z_channels, cfg.phi_ratio) for _ in range(cfg.num_phi))
        # Training statistic only; kept so that official files load strictly.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(cfg.hit_rows, cfg.vocab_size))

    def phi(self, si: int, num_scales: int) -> Phi:
        return self.quant_resi.qresi_ls[phi_index(si, num_scales, len(self.quant_resi.qresi_ls))]


class VQVAE(nn.Module):
    """Encoder, decoder and residual quantizer; the scale schedule is passed per call (256 vs 512 px)."""

    def __init__(self, cfg: VQVAEConfig = VQVAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)

    # -- tokens -> latent ------------------------------------------------------------------------
    def embed(self, idx: Tensor, pn: int) -> Tensor:
        """Codebook vectors of a (B, pn²) token map as (B, Cvae, pn, pn)."""
        return self.quantize.embedding(idx).transpose(1, 2).reshape(idx.shape[0], -1, pn, pn)

    def next_input(self, si: int, patch_nums: Sequence[int], f_hat: Tensor, h: Tensor) -> Tensor:
        """Adds scale si's residual h (B, Cvae, pn, pn) to f_hat in place; returns the next scale's input.

        The input is f_hat area-resized to the next scale (B, Cvae, pn', pn'), or f_hat itself after the last.
        """
        s, side = len(patch_nums), patch_nums[-1]
        if si < s - 1:
            f_hat.add_(self.quantize.phi(si, s)(F.interpolate(h, size=(side, side), mode="bicubic")))
            return F.interpolate(f_hat, size=(patch_nums[si + 1],) * 2, mode="area")
        f_hat.add_(self.quantize.phi(si, s)(h))
        return f_hat

    def tokens_to_fhat(self, idx_per_scale: Sequence[Tensor], patch_nums: Sequence[int]) -> Tensor:
        """Accumulated latent f_hat (B, Cvae, H, W) of a full multi-scale token pyramid."""
        f_hat = self.quantize.embedding.weight.new_zeros(
            idx_per_scale[0].shape[0], self.cfg.z_channels, patch_nums[-1], patch_nums[-1])
        for si, (idx, pn) in enumerate(zip(idx_per_scale, patch_nums)):
            self.next_input(si, patch_nums, f_hat, self.embed(idx, pn))
        return f_hat

    def tokens_to_var_input(self, idx_per_scale: Sequence[Tensor], patch_nums: Sequence[int]) -> Tensor:
        """Teacher-forcing input (B, L - 1, Cvae): each scale's input from the tokens of coarser scales."""
        f_hat = self.quantize.embedding.weight.new_zeros(
            idx_per_scale[0].shape[0], self.cfg.z_channels, patch_nums[-1], patch_nums[-1])
        inputs = [self.next_input(si, patch_nums, f_hat, self.embed(idx_per_scale[si], pn))
                  for si, pn in enumerate(patch_nums[:-1])]
        return torch.cat([x.flatten(2).transpose(1, 2) for x in inputs], dim=1)

    # -- image <-> latent ------------------------------------------------------------------------
    def decode(self, f_hat: Tensor) -> Tensor:
        """Image in [-1, 1] from an accumulated latent."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def encode_tokens(self, img: Tensor, patch_nums: Sequence[int]) -> list[Tensor]:
        """Multi-scale residual quantisation of an image in [-1, 1]: one (B, pn²) token map per scale."""
        f_rest = self.quant_conv(self.encoder(img))
        b, c, hh, ww = f_rest.shape
        codebook = self.quantize.embedding.weight
        code_sq = codebook.square().sum(dim=1)
        tokens = []
        for si, pn in enumerate(patch_nums):
            last = si == len(patch_nums) - 1
            z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            # ‖z - e‖² without the sqrt, in the official order: ‖z‖² + ‖e‖² - 2 z·e; argmin keeps the first tie.
            dist = (z.square().sum(dim=1, keepdim=True) + code_sq).addmm_(z, codebook.T, alpha=-2, beta=1)
            idx = dist.argmin(dim=1).view(b, pn * pn)
            h = self.embed(idx, pn)
            if not last:
                h = F.interpolate(h, size=(hh, ww), mode="bicubic")
            h = self.quantize.phi(si, len(patch_nums))(h)
            f_rest = f_rest - h
            tokens.append(idx)
        return tokens


def decode_flops(cfg: VQVAEConfig, latent_shape: tuple[int, ...]) -> float:
    """FLOPs of decoding one latent of `latent_shape` (its first dimension is ignored), counted by
    FlopCounterMode on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        shadow = VQVAE(cfg)
        latent = torch.zeros(1, *latent_shape[1:])
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        shadow.decode(latent)
    return float(counter.get_total_flops())
