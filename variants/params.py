"""The one parameter counter: of a module, or exactly of an architecture built on the meta device (no
memory, any size), which is what `varbench list` shows."""

from __future__ import annotations

import torch
from torch import nn

from .hmar_model import HMARConfig, HMARNet
from .infinity_model import InfinityConfig, InfinityNet
from .llamagen_model import LlamaGenConfig, LlamaGenNet
from .var_model import VARConfig, VARNet

__all__ = ["OneNetwork", "param_count"]

_NETS: dict[type, type[nn.Module]] = {VARConfig: VARNet, HMARConfig: HMARNet, LlamaGenConfig: LlamaGenNet,
                                         InfinityConfig: InfinityNet}


def param_count(model: nn.Module | VARConfig | HMARConfig | LlamaGenConfig | InfinityConfig) -> int:
    """Parameters of a module, or of the network a config describes (built on the meta device)."""
    if isinstance(model, nn.Module):
        return sum(p.numel() for p in model.parameters())
    if type(model) not in _NETS:
        raise TypeError(f"cannot count the parameters of a {type(model).__name__}; give a module or one of "
                        f"{', '.join(t.__name__ for t in _NETS)}")
    with torch.device("meta"):
        return param_count(_NETS[type(model)](model))


class OneNetwork:
    """The Variant protocol's network fields for a variant that runs one transformer, `self.net` (VAR, HMAR,
    Infinity, LlamaGen; CoDe composes two variants and reports both)."""

    name: str
    net: nn.Module

    @property
    def models(self) -> dict[str, OneNetwork]:
        """The networks this variant runs, by role: itself."""
        return {self.name: self}

    def param_count(self) -> int:
        """Parameters of the transformer (the tokenizer, shared by a family, and any text encoder excluded)."""
        return param_count(self.net)

    def param_bytes(self) -> int:
        """Bytes of the transformer's weights as held (linears in the compute precision, the rest fp32)."""
        return sum(p.numel() * p.element_size() for p in self.net.parameters())
