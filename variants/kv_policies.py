"""KV-cache policies: which cached keys and values a KV-cached variant keeps for later scales.

`full` keeps everything and is the baseline of every compression policy; the compressing policies
(streaming, h2o, snapkv, pyramidkv, scalekv, hack) plug into the same registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from varbench.harness.registry import register_kv_policy

__all__ = ["FullKV", "full"]


@dataclass(frozen=True)
class FullKV:
    """Keeps every entry: the cache grows by each scale's tokens (VAR's own behaviour)."""

    name: str = "full"
    unverified: bool = False


@register_kv_policy
def full() -> FullKV:
    """Full KV cache, no compression (Tian et al. 2024, arXiv:2404.02905): the baseline policy."""
    return FullKV()
