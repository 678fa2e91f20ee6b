"""How the engine runs a model: compute precision and each speed feature, switchable one by one.
`EngineConfig.reference()` switches every feature off, which gives the official code's numerics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EngineConfig", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    precision: str = "fp32"  # compute precision of linears, attention and the VAE decoder: fp32, bf16, fp16
    static_kv_cache: bool = True  # preallocated cache written in place (else torch.cat per scale)
    weights_in_precision: bool = True  # hold weights in `precision` (else fp32 weights under autocast)
    cache_conditioning: bool = True  # AdaLN outputs once per call (else once per scale, as the official code)
    compile: bool = False  # torch.compile the per-scale network step
    cuda_graphs: bool = False  # capture the per-scale step as CUDA graphs (CUDA only)
    channels_last_vae: bool = True  # NHWC VAE decode

    def __post_init__(self) -> None:
        if self.precision not in DTYPES:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(DTYPES)}")

    @classmethod
    def reference(cls, precision: str = "fp32") -> EngineConfig:
        """The same loop with every engine feature off: the official code's algorithm and numerics."""
        return cls(precision, static_kv_cache=False, weights_in_precision=False, cache_conditioning=False,
                   compile=False, cuda_graphs=False, channels_last_vae=False)
