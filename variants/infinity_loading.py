"""Building Infinity transformers and BSQ VAEs from the released files, or with random weights.

As for VAR (variants/loading.py): the architecture is read off the state dict, the model is built on the meta
device and the file is loaded strictly, with errors that name the file and what differs. The 2B transformer is
one `torch.save`d state dict (infinity_2b_reg.pth); the 8B's is a Hugging Face style sharded folder
(infinity_8b_weights/ with a `*.index.json` weight map); the VAEs are `{"vae": state_dict}` files
(infinity_vae_d32reg.pth, infinity_vae_d56_f8_14_patchify.pth).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor

from varbench.harness.core.checkpoints import (
    CheckpointError,
    load_strict,
    read_state_dict,
    resolve_source,
)

from .bsq_vae import BSQVAE, BSQVAEConfig
from .infinity_model import InfinityConfig, InfinityNet
from .loading import identify

__all__ = ["load_infinity_net", "load_bsq_vae", "random_infinity_net", "random_bsq_vae", "read_sharded",
           "infinity_params", "describe_infinity", "INFINITY_FILES"]

# The released files (Hugging Face FoundationVision/Infinity), by role.
INFINITY_FILES = {
    "infinity_2b": "hf:FoundationVision/Infinity/infinity_2b_reg.pth",
    "infinity_8b": "FoundationVision/Infinity/infinity_8b_weights (a folder of shards; pass its local path)",
    "vae_d32": "hf:FoundationVision/Infinity/infinity_vae_d32reg.pth",
    "vae_d56": "hf:FoundationVision/Infinity/infinity_vae_d56_f8_14_patchify.pth",
}


def infinity_params(cfg: InfinityConfig) -> int:
    """Exact parameter count of an architecture (built on the meta device: no memory at any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in InfinityNet(cfg).parameters())


def describe_infinity(cfg: InfinityConfig) -> str:
    return f"Infinity of depth {cfg.depth}, width {cfg.width}, {cfg.bits} bits per token"


def read_sharded(folder: Path) -> dict[str, Tensor]:
    """A state dict from a sharded folder: its `*.index.json` weight map names the shard of every key."""
    indexes = sorted(folder.glob("*.index.json"))
    if not indexes:
        raise CheckpointError(f"{folder} is a folder without a *.index.json weight map: not a sharded checkpoint")
    weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
    sd: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise CheckpointError(f"{path} is a safetensors shard: pip install safetensors to read it") from None
            sd.update(load_file(str(path)))
        else:
            sd.update(read_state_dict(path))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise CheckpointError(f"{folder}: shards lack {len(missing)} keys of the weight map, e.g. {missing[0]}")
    return sd


def _read(source: str | os.PathLike, allow_download: bool | None) -> tuple[Path, dict[str, Tensor]]:
    """The state dict of a file, a `{"vae": state_dict}` file or a shard folder (always weights_only)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path, read_sharded(path)
    path = resolve_source(source, allow_download)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile):
        return path, read_state_dict(path)  # raises the harness's error naming what is wrong with the file
    if isinstance(obj, Mapping) and set(obj) == {"vae"}:
        obj = obj["vae"]
    if not isinstance(obj, Mapping) or set(obj) in ({"state_dict"}, {"model"}):
        return path, read_state_dict(path)
    if not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return path, dict(obj)


def _is_infinity(sd: dict[str, Tensor]) -> bool:
    return "text_norm.weight" in sd and any(k.startswith("block_chunks.") for k in sd)


def _what(sd: dict[str, Tensor]) -> str:
    if _is_infinity(sd):
        return "an Infinity transformer"
    if any(k.startswith("encoder.") for k in sd) and any("lfq.mask" in k for k in sd):
        return "a BSQ VAE"
    kind = identify(sd)
    if kind != "unknown":
        return {"var": "a VAR state dict", "hmar": "an HMAR checkpoint", "vqvae": "a VAR VQVAE"}[kind]
    return f"an unknown layout (first keys: {', '.join(list(sd)[:4])})"


def load_infinity_net(source: str | os.PathLike, expect: InfinityConfig | None = None, name: str = "Infinity",
                      allow_download: bool | None = None) -> InfinityNet:
    """An InfinityNet (fp32, CPU, eval) from a released file or shard folder; with `expect`, a file of another
    architecture is refused with the difference named."""
    path, sd = _read(source, allow_download)
    if not _is_infinity(sd):
        raise CheckpointError(f"{path} is not an Infinity transformer state dict: it looks like {_what(sd)}")
    try:
        cfg = InfinityConfig.from_state_dict(sd)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path} is missing {err} needed to read the Infinity architecture") from None
    if expect is not None and cfg != expect:
        diff = ", ".join(f"{f.name} {getattr(cfg, f.name)} (want {getattr(expect, f.name)})" for f in fields(cfg)
                         if getattr(cfg, f.name) != getattr(expect, f.name))
        raise CheckpointError(f"{path} holds an {describe_infinity(cfg)} ({infinity_params(cfg):,} parameters), "
                              f"but {name} is an {describe_infinity(expect)} ({infinity_params(expect):,}): {diff}")
    with torch.device("meta"):
        net = InfinityNet(cfg)
    load_strict(net, sd, str(path), describe_infinity(cfg))
    return net.float().eval()


_CONVS = ("conv_in", "conv_out", "conv1", "conv2", "nin_shortcut", "downsample.conv", "upsample.conv")
_NORMS = ("norm1", "norm2", "norm_out")


def _wrapped_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Maps plain conv/norm names (`encoder.conv_in.weight`) to the official wrappers (`.conv.` / `.norm.`), as
    the official load_cnn does, and fills the quantizer's alias (`quantize.` = `quantizer.`) from either name."""
    out = {}
    for key, value in sd.items():
        head, _, leaf = key.rpartition(".")
        if head.endswith(_CONVS) and not head.endswith(".conv.conv") and leaf in ("weight", "bias"):
            key = f"{head}.conv.{leaf}"
        elif head.endswith(_NORMS):
            key = f"{head}.norm.{leaf}"
        out[key] = value
    for name, alias in (("quantizer.lfq.mask", "quantize.lfq.mask"), ("quantize.lfq.mask", "quantizer.lfq.mask")):
        if name in out and alias not in out:
            out[alias] = out[name]
    return out


def load_bsq_vae(source: str | os.PathLike, allow_download: bool | None = None) -> BSQVAE:
    """A BSQ VAE (fp32, CPU, eval) from a released `{"vae": state_dict}` file."""
    path, sd = _read(source, allow_download)
    if not any(k.startswith("encoder.conv_in") for k in sd) or not any("lfq.mask" in k for k in sd):
        raise CheckpointError(f"{path} is not a BSQ VAE state dict: it looks like {_what(sd)}")
    sd = _wrapped_names(sd)
    try:
        cfg = BSQVAEConfig.from_state_dict(sd)
    except KeyError as err:
        raise CheckpointError(f"{path} is missing {err} needed to read the BSQ VAE architecture") from None
    with torch.device("meta"):
        vae = BSQVAE(cfg)
    load_strict(vae, sd, str(path), f"BSQ VAE d{cfg.codebook_dim} (patch {cfg.patch_size})")
    return vae.float().eval()


@torch.no_grad()
def random_infinity_net(cfg: InfinityConfig, seed: int = 0) -> InfinityNet:
    """An InfinityNet with O(1) random weights (the fixture's rules, docs meta.json): every path matters."""
    gen = torch.Generator().manual_seed(seed)
    net = InfinityNet(cfg)
    for name, p in net.named_parameters():
        n = torch.randn(p.shape, generator=gen)
        if name.endswith("scale_mul_1H11"):
            p.copy_(math.log(4.0) + 0.25 * n)
        elif name in ("cfg_uncond", "pos_start", "lvl_embed.weight"):
            p.copy_(0.5 * n)
        elif name == "text_norm.weight" or name.endswith("ca_norm.weight"):
            p.copy_(1 + 0.1 * n)
        elif name in ("word_embed.weight", "text_proj_for_sos.ca.mat_q"):
            p.copy_(n)
        elif name.endswith("ada_gss"):
            p.copy_(0.3 * n)
        elif p.ndim >= 2:
            p.copy_(n / math.sqrt(p.shape[1]))
        else:
            p.copy_(0.1 * n)
    return net.eval()


@torch.no_grad()
def random_bsq_vae(cfg: BSQVAEConfig, seed: int = 0) -> BSQVAE:
    """A BSQ VAE with random weights (unit-variance convs, GroupNorm near identity)."""
    gen = torch.Generator().manual_seed(seed)
    vae = BSQVAE(cfg)
    for name, p in vae.named_parameters():
        n = torch.randn(p.shape, generator=gen)
        if ".norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * n)
        elif p.ndim > 1:
            gain = 0.5 if name.startswith("decoder.conv_out") else 1.0
            p.copy_(gain * n / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.05 * n)
    return vae.eval()
