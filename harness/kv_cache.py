"""KV caches for scale-wise decoding.

`StaticKVCache` is the engine's: one preallocated buffer per call shape, written in place at the positions of
the current scale, read as a prefix view (gpt-fast's KVCache idea), so no step allocates or copies the past.
`ConcatKVCache` is what the official code does (torch.cat at every scale); the reference loop uses it so that
the engine is measured against the same algorithm with only this feature switched off.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["StaticKVCache", "ConcatKVCache"]


class StaticKVCache:
    """Keys and values of every layer in two (layers, batch, heads, capacity, head_dim) buffers.

    The write position advances by the number of tokens each layer-0 update brings; all layers of one
    scale write to the same slots. Positions are Python ints fixed by the scale schedule, so no host sync.
    """

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens held after the current scale's update
        self._start = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.length = self._start = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes this scale's (B, H, l, hd) keys/values for `layer`; returns views of everything held."""
        if layer == 0:
            self._start = self.length
            self.length += k.shape[2]
            if self.length > self.capacity:
                raise RuntimeError(f"KV cache overflow: {self.length} tokens > capacity {self.capacity}")
        start, end = self._start, self.length
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes of keys and values held (for `tokens` positions; default: what is held now)."""
        n = self.length if tokens is None else tokens
        return 2 * self.k[:, :, :, :n].numel() * self.k.element_size()

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class ConcatKVCache:
    """The official code's cache: grows by concatenation at every scale (reference only)."""

    def __init__(self, layers: int):
        self.k: list[Tensor | None] = [None] * layers
        self.v: list[Tensor | None] = [None] * layers

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        old_k, old_v = self.k[layer], self.v[layer]
        self.k[layer] = k if old_k is None else torch.cat((old_k, k), dim=2)
        self.v[layer] = v if old_v is None else torch.cat((old_v, v), dim=2)
        return self.k[layer], self.v[layer]

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def nbytes(self, tokens: int | None = None) -> int:
        held = sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
        if tokens is None or self.length == 0:
            return held
        return held * tokens // self.length
