"""Building VAR transformers and VQVAEs from checkpoint files, or with random weights.

The architecture is read off the state dict (depth, width, heads, AdaLN layout, schedule, tokenizer channels),
the model is built on the meta device (no memory spent on a throwaway init) and the file is loaded strictly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from varbench.harness.core.checkpoints import CheckpointError, load_strict, read_state_dict, resolve_source

from .var_model import VARConfig, VARNet, init_random_
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["Layout", "load_checkpoint", "load_var_net", "load_vqvae", "random_var_net", "random_vqvae", "identify",
           "VAR_LAYOUT", "VQVAE_LAYOUT"]


def identify(sd: dict[str, Tensor]) -> str:
    """Best guess of what a state dict holds: 'var', 'hmar', 'vqvae' or 'unknown'."""
    if any(k.startswith(("base_blocks.", "ns_blocks.", "mask_blocks.")) for k in sd):
        return "hmar"
    if "pos_start" in sd and any(k.startswith("blocks.") for k in sd) and "head.weight" in sd:
        return "var"
    if "quantize.embedding.weight" in sd and "decoder.conv_in.weight" in sd:
        return "vqvae"
    return "unknown"


_FOUND = {"hmar": "an HMAR checkpoint", "vqvae": "a VQVAE state dict", "var": "a VAR state dict"}


@dataclass(frozen=True)
class Layout:
    """How one family's official checkpoints are recognised, read and built."""

    kind: str  # identify()'s answer for this family
    title: str  # "VAR", as messages name it
    read_config: Callable[..., Any]  # (state dict, **config_args) -> config; KeyError/ValueError on a bad file
    build: Callable[[Any], nn.Module]  # config -> module (called on the meta device)
    describe: Callable[[Any], str]  # config -> "depth-16 VAR (width 1024)"
    registered: str = ""  # name pattern of the registered model of a depth, e.g. "var_d{depth}"


def load_checkpoint(source: str | os.PathLike, layout: Layout, expect_depth: int | None = None,
                    allow_download: bool | None = None, **config_args: Any) -> nn.Module:
    """A model (fp32, CPU, eval) from an official-layout file: the architecture is read off the state dict, the
    model built on the meta device and the file loaded strictly; checks the depth when `expect_depth` is set."""
    path = resolve_source(source, allow_download)
    sd = read_state_dict(path)
    if identify(sd) != layout.kind:
        found = _FOUND.get(identify(sd), f"not a known layout (first keys: {', '.join(list(sd)[:4])})")
        raise CheckpointError(f"{path} is not a {layout.title} state dict: it looks like {found}")
    try:
        cfg = layout.read_config(sd, **config_args)
    except KeyError as err:
        raise CheckpointError(f"{path} is missing {err} needed to read the {layout.title} architecture") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    depth = getattr(cfg, "depth", None)
    if expect_depth is not None and depth != expect_depth:
        raise CheckpointError(
            f"{path} holds a {layout.describe(cfg)}, but a depth-{expect_depth} model was asked for; use "
            f"{layout.registered.format(depth=depth)} or pass the depth-{expect_depth} checkpoint")
    with torch.device("meta"):
        model = layout.build(cfg)
    load_strict(model, sd, str(path), layout.describe(cfg))
    return model.float().eval()  # loading assigns the file's tensors: an fp16 file would compute in fp16


VAR_LAYOUT = Layout("var", "VAR", VARConfig.from_state_dict, VARNet,
                    lambda c: f"depth-{c.depth} VAR (width {c.width})", "var_d{depth}")
VQVAE_LAYOUT = Layout("vqvae", "VQVAE", VQVAEConfig.from_state_dict, VQVAE, lambda c: f"VQVAE (ch {c.ch})")


def load_var_net(source: str | os.PathLike, expect_depth: int | None = None,
                 patch_nums: Sequence[int] | None = None, allow_download: bool | None = None) -> VARNet:
    """A VARNet (fp32, CPU) from an official-layout checkpoint; checks the depth when `expect_depth` is set."""
    return load_checkpoint(source, VAR_LAYOUT, expect_depth, allow_download, patch_nums=patch_nums)


def load_vqvae(source: str | os.PathLike, allow_download: bool | None = None) -> VQVAE:
    """A VQVAE (fp32, CPU) from an official-layout checkpoint (an fp16 file, the zoo's, computes in fp32)."""
    return load_checkpoint(source, VQVAE_LAYOUT, allow_download=allow_download)


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
