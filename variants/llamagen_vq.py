"""LlamaGen's image tokenizer (VQ-16 / VQ-8), written from docs/LLAMAGEN_SPEC.md (FoundationVision/LlamaGen@ce98ec41
tokenizer/tokenizer_image/vq_model.py); nothing is copied.

A taming-style encoder/decoder around an l2-normalised codebook of 8-dim codes: a token is the nearest
normalised code to the normalised latent, and decoding looks the normalised codes up. The ops follow the official
ones (x·sigmoid(x), explicit-softmax attention, the |z|² + |e|² − 2 z·e distance) so that the fp32 results agree to
rounding. Parameter names match the official state dict (`quantize.codebook_used` only where the file has it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LlamaGenVQ", "VQConfig", "vq_decode_flops"]


@dataclass(frozen=True)
class VQConfig:
    """VQ-16 by default (ch_mult of 5 levels: 16x down); VQ-8 has ch_mult (1, 2, 2, 4)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    embed_dim: int = 8
    codebook_usage: bool = True  # the training-only `codebook_used` buffer (65536 slots) is in the file

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> VQConfig:
        """Reads the architecture off an official VQ state dict (KeyError if it is not one)."""
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks.")})
        mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels)
        blocks = {k.split(".")[4] for k in sd if k.startswith("encoder.conv_blocks.0.res.")}
        size, dim = sd["quantize.embedding.weight"].shape
        return cls(ch, mult, len(blocks), sd["encoder.conv_out.weight"].shape[0], size, dim,
                   "quantize.codebook_used" in sd)


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(_swish(self.norm2(self.conv1(_swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head attention over the h·w positions, scale C^-1/2, as explicit matmuls and softmax."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        h_ = self.norm(x)
        b, c, h, w = x.shape
        q = self.q(h_).reshape(b, c, h * w).permute(0, 2, 1)
        k = self.k(h_).reshape(b, c, h * w)
        weights = F.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)
        out = torch.bmm(self.v(h_).reshape(b, c, h * w), weights.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Resample(nn.Module):
    def __init__(self, c: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0) if down else nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom padding only
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attn: list[nn.Module], resample: _Resample | None) -> nn.Module:
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        setattr(level, "downsample" if resample.down else "upsample", resample)
    return level


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i, block in enumerate(level.res):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, last = cfg.ch, cfg.ch_mult, len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = ch
        for i, m in enumerate(mult):
            blocks = [ResnetBlock(c_in if j == 0 else ch * m, ch * m) for j in range(cfg.num_res_blocks)]
            attn = [AttnBlock(ch * m) for _ in range(cfg.num_res_blocks)] if i == last else []
            self.conv_blocks.append(_level(blocks, attn, _Resample(ch * m, True) if i != last else None))
            c_in = ch * m
        self.mid = _mid(c_in)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, top = cfg.ch, cfg.ch_mult, len(cfg.ch_mult) - 1
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            c_out = ch * mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(c_out) for _ in range(cfg.num_res_blocks + 1)] if i == top else []
            self.conv_blocks.append(_level(blocks, attn, _Resample(c_out, False) if i != 0 else None))
            c_in = c_out
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _Quantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        if cfg.codebook_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def indices(self, z: Tensor) -> Tensor:
        """(B, C, h, w) latents -> (B, h·w) nearest normalised codes (first minimum on ties)."""
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), p=2, dim=-1)
        e = self.codebook()
        d = torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * torch.einsum(
            "bd,dn->bn", flat, e.t())
        return torch.argmin(d, dim=1).view(z.shape[0], -1)


class LlamaGenVQ(nn.Module):
    def __init__(self, cfg: VQConfig = VQConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = _Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_indices(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, (H/16)·(W/16)) raster token map."""
        return self.quantize.indices(self.quant_conv(self.encoder(img)))

    def codes_to_latent(self, tokens: Tensor, side: int) -> Tensor:
        """(B, side²) tokens -> (B, embed_dim, side, side) normalised codes (the official get_codebook_entry)."""
        z = self.quantize.codebook()[tokens]
        return z.reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2).contiguous()

    def decode_latent(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def decode_code(self, tokens: Tensor, side: int) -> Tensor:
        """(B, side²) raster tokens -> (B, 3, 16·side, 16·side) image, nominally in [-1, 1] (not clamped)."""
        return self.decode_latent(self.codes_to_latent(tokens, side))


def vq_decode_flops(cfg: VQConfig, side: int) -> float:
    """FLOPs of decoding one side×side token map, counted by FlopCounterMode on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        shadow = LlamaGenVQ(cfg)
        z = torch.zeros(1, cfg.embed_dim, side, side)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        shadow.decode_latent(z)
    return float(counter.get_total_flops())
