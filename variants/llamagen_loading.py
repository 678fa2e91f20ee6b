"""Building LlamaGen's transformer and VQ tokenizer from the released files, or with random weights.

The released files (FoundationVision/LlamaGen README, Hugging Face FoundationVision/LlamaGen): DDP checkpoints nest
the weights under "model" beside the optimizer, the step and the training `args` (an argparse.Namespace, the one
non-tensor class allowed while reading with weights_only=True); the FSDP ones (XXL, 3B) are the bare state dict.
The architecture is read off the state dict (the head count from the released width, the grid from the image
size), the model is built on the meta device and the file is loaded strictly; a file of another size or kind is
refused with a message naming the file and the difference.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor
from varbench.harness.core.checkpoints import CheckpointError, load_strict, resolve_source

from .llamagen_model import SIZES, LlamaGenConfig, LlamaGenNet, causal_mask, rope_table_2d
from .llamagen_vq import LlamaGenVQ, VQConfig

__all__ = [
    "RELEASED_GPT",
    "RELEASED_VQ",
    "load_llamagen_net",
    "load_llamagen_vq",
    "random_llamagen_net",
    "random_llamagen_vq",
    "read_llamagen_file",
    "released_source",
]

_HF = "hf:FoundationVision/LlamaGen/"
# size -> image sizes with a released c2i checkpoint (README table)
RELEASED_GPT: dict[str, tuple[int, ...]] = {"b": (256, 384), "l": (256, 384), "xl": (384,), "xxl": (384,),
                                            "3b": (384,)}
RELEASED_VQ = {16: "vq_ds16_c2i.pt", 8: "vq_ds8_c2i.pt"}  # downsampling factor -> file
_DERIVED_KEYS = ("freqs_cis",)  # tables some files carry; the model recomputes them (not weights)


def released_source(size: str, image_size: int) -> str:
    """The Hugging Face source of a released c2i checkpoint, e.g. hf:FoundationVision/LlamaGen/c2i_B_256.pt."""
    if image_size not in RELEASED_GPT[size]:
        raise ValueError(f"no released LlamaGen GPT-{size.upper()} at {image_size} px; released: "
                         f"{', '.join(f'{s} px' for s in RELEASED_GPT[size])}")
    return f"{_HF}c2i_{size.upper()}_{image_size}.pt"


def read_llamagen_file(path: Path) -> dict[str, Tensor]:
    """The state dict of a LlamaGen file: bare (FSDP) or under "model" / "module" / "state_dict" (DDP, DeepSpeed),
    as the official sample script unwraps it."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the training args saved beside the weights
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} could not be read as a weights-only PyTorch checkpoint: "
                              f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}"
                              ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("model", "module", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if k not in _DERIVED_KEYS}


def _kind(sd: Mapping[str, Tensor]) -> str:
    if "tok_embeddings.weight" in sd and "layers.0.attention.wqkv.weight" in sd:
        return "a LlamaGen GPT" if "cls_embedding.embedding_table.weight" in sd else "a LlamaGen t2i GPT"
    if "quantize.embedding.weight" in sd and "encoder.conv_blocks.0.res.0.conv1.weight" in sd:
        return "a LlamaGen VQ tokenizer"
    if "pos_start" in sd or "quantize.ema_vocab_hit_SV" in sd:
        return "a VAR-family checkpoint"
    return f"not a known layout (first keys: {', '.join(list(sd)[:4])})"


def _read(source: str | os.PathLike, want: str, allow_download: bool | None) -> tuple[Path, dict[str, Tensor]]:
    path = resolve_source(source, allow_download)
    sd = read_llamagen_file(path)
    if _kind(sd) != want:
        raise CheckpointError(f"{path} is not {want} state dict: it looks like {_kind(sd)}")
    return path, sd


def load_llamagen_net(source: str | os.PathLike, image_size: int = 256, downsample: int = 16,
                      expect_size: str | None = None, n_head: int | None = None,
                      allow_download: bool | None = None) -> LlamaGenNet:
    """A c2i transformer (fp32, CPU, eval) from a released-layout file; checks the size when `expect_size` is set."""
    path, sd = _read(source, "a LlamaGen GPT", allow_download)
    try:
        cfg = LlamaGenConfig.from_state_dict(sd, n_head, (image_size // downsample) ** 2)
    except KeyError as err:
        raise CheckpointError(f"{path} is missing {err} needed to read the LlamaGen architecture") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if expect_size is not None:
        layers, heads, width = SIZES[expect_size]
        found = (cfg.n_layer, cfg.n_head, cfg.dim)
        if found != (layers, heads, width):
            other = next((f"; use llamagen_{k}" for k, v in SIZES.items() if v == found), "")
            raise CheckpointError(f"{path} holds {cfg.describe()}, but llamagen_{expect_size} is GPT-"
                                  f"{expect_size.upper()} ({layers} layers, {heads} heads, width {width}){other}")
    with torch.device("meta"):
        net = LlamaGenNet(cfg)
    load_strict(net, sd, str(path), cfg.describe())
    return _materialise_tables(net).float().eval()


def load_llamagen_vq(source: str | os.PathLike, allow_download: bool | None = None) -> LlamaGenVQ:
    """A VQ tokenizer (fp32, CPU, eval) from a released-layout file (VQ-16 or VQ-8, read off the state dict)."""
    path, sd = _read(source, "a LlamaGen VQ tokenizer", allow_download)
    try:
        cfg = VQConfig.from_state_dict(sd)
    except KeyError as err:
        raise CheckpointError(f"{path} is missing {err} needed to read the VQ architecture") from None
    with torch.device("meta"):
        vq = LlamaGenVQ(cfg)
    load_strict(vq, sd, str(path), f"VQ-{cfg.downsample} tokenizer (ch {cfg.ch}, codebook {cfg.codebook_size})")
    return vq.float().eval()


def _materialise_tables(net: LlamaGenNet) -> LlamaGenNet:
    """The non-persistent tables (RoPE, causal mask) of a net built on the meta device, computed for real."""
    net.rope = rope_table_2d(net.cfg)
    net.causal = causal_mask(net.cfg)
    return net


@torch.no_grad()
def random_llamagen_net(cfg: LlamaGenConfig, seed: int = 0, logit_std: float = 3.0) -> LlamaGenNet:
    """A net with O(1) random weights, deterministic in `seed`: linears N(0, 1/fan_in), embeddings N(0, 1), norms 1,
    the head scaled so that logits have about `logit_std` spread (the official init zeroes the head: uniform)."""
    gen = torch.Generator().manual_seed(seed)
    net = LlamaGenNet(cfg)
    for name, p in net.named_parameters():
        if name.endswith("norm.weight"):
            continue  # ones
        std = 1.0 if p.ndim == 2 and "embed" in name else p.shape[-1] ** -0.5
        p.copy_(torch.randn(p.shape, generator=gen) * std * (logit_std if name == "output.weight" else 1.0))
    return net.eval()


@torch.no_grad()
def random_llamagen_vq(cfg: VQConfig, seed: int = 0) -> LlamaGenVQ:
    """A VQ tokenizer with random weights from its own generator: convolutions N(0, 1/fan_in), biases N(0, 0.1²),
    group norms identity, codebook N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    vq = LlamaGenVQ(cfg)
    for name, p in vq.named_parameters():
        if p.ndim > 1:
            p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for m in vq.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    vq.quantize.embedding.weight.normal_(generator=gen)
    return vq.eval()
