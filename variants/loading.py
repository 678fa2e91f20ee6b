"""Building VAR transformers and VQVAEs from checkpoint files, or with random weights.

The architecture is read off the state dict (depth, width, heads, AdaLN layout, schedule, tokenizer channels),
the model is built on the meta device (no memory spent on a throwaway init) and the file is loaded strictly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from varbench.harness.core.checkpoints import CheckpointError, load_strict, read_state_dict, resolve_source

from .var_model import VARConfig, VARNet, init_random_
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["load_var_net", "load_vqvae", "random_var_net", "random_vqvae", "identify"]


def identify(sd: dict[str, Tensor]) -> str:
    """Best guess of what a state dict holds: 'var', 'hmar', 'vqvae' or 'unknown'."""
    if any(k.startswith("base_blocks.") for k in sd):
        return "hmar"
    if "pos_start" in sd and any(k.startswith("blocks.") for k in sd) and "head.weight" in sd:
        return "var"
    if "quantize.embedding.weight" in sd and "decoder.conv_in.weight" in sd:
        return "vqvae"
    return "unknown"


def _not_a(expected: str, sd: dict[str, Tensor], origin: str) -> CheckpointError:
    kind = identify(sd)
    found = {"hmar": "an HMAR checkpoint", "vqvae": "a VQVAE state dict", "var": "a VAR state dict"}.get(
        kind, f"not a known layout (first keys: {', '.join(list(sd)[:4])})")
    return CheckpointError(f"{origin} is not a {expected} state dict: it looks like {found}")


def load_var_net(source: str | os.PathLike, expect_depth: int | None = None,
                 patch_nums: Sequence[int] | None = None, allow_download: bool | None = None) -> VARNet:
    """A VARNet (fp32, CPU) from an official-layout checkpoint; checks the depth when `expect_depth` is set."""
    path = resolve_source(source, allow_download)
    sd = read_state_dict(path)
    if identify(sd) != "var":
        raise _not_a("VAR", sd, str(path))
    try:
        cfg = VARConfig.from_state_dict(sd, patch_nums)
    except KeyError as err:
        raise CheckpointError(f"{path} is missing {err} needed to read the VAR architecture") from None
    if expect_depth is not None and cfg.depth != expect_depth:
        raise CheckpointError(
            f"{path} holds a depth-{cfg.depth} VAR (width {cfg.width}), but a depth-{expect_depth} model was "
            f"asked for; use var_d{cfg.depth} or pass the depth-{expect_depth} checkpoint")
    with torch.device("meta"):
        net = VARNet(cfg)
    load_strict(net, sd, str(path), f"VAR-d{cfg.depth}")
    return net.float().eval()  # loading assigns the file's tensors: an fp16 file would compute in fp16


def load_vqvae(source: str | os.PathLike, allow_download: bool | None = None) -> VQVAE:
    """A VQVAE (fp32, CPU) from an official-layout checkpoint."""
    path = resolve_source(source, allow_download)
    sd = read_state_dict(path)
    if identify(sd) != "vqvae":
        raise _not_a("VQVAE", sd, str(path))
    try:
        cfg = VQVAEConfig.from_state_dict(sd)
    except KeyError as err:
        raise CheckpointError(f"{path} is missing {err} needed to read the VQVAE architecture") from None
    with torch.device("meta"):
        vae = VQVAE(cfg)
    load_strict(vae, sd, str(path), f"VQVAE (ch {cfg.ch})")
    return vae.float().eval()  # an fp16 file (the zoo's) computes in fp32 like every other checkpoint


def random_var_net(cfg: VARConfig, seed: int = 0, logit_scale: float = 1.0) -> VARNet:
    """A VARNet with O(1) random weights (see init_random_), deterministic in `seed`."""
    return init_random_(VARNet(cfg), torch.Generator().manual_seed(seed), logit_scale).eval()


@torch.no_grad()
def random_vqvae(cfg: VQVAEConfig = VQVAEConfig(), seed: int = 0) -> VQVAE:
    """A VQVAE with random weights (default PyTorch init under a fixed seed, codebook ~ N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    vae = VQVAE(cfg)
    for p in vae.parameters():
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5 if p.ndim > 1 else 0.1 * torch.randn(p.shape, generator=gen))
    for name, m in vae.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    vae.quantize.embedding.weight.normal_(generator=gen)
    return vae.eval()
