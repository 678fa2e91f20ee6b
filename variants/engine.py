"""How the engine runs a model: compute precision and each speed feature, switchable one by one.
`EngineConfig.reference()` switches every feature off, which gives the official code's numerics. It is also a
study's `[engine]` table and `varbench bench`'s flags: one engine configuration from the TOML to the model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

__all__ = ["EngineConfig", "DTYPES", "PRECISIONS"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *DTYPES)


@dataclass(frozen=True)
class EngineConfig:
    # compute precision of linears, attention and the VAE decoder: fp32, bf16, fp16, or "auto": bf16 on a GPU,
    # fp32 on a CPU (CPUs gain nothing from bf16 here); a variant resolves it for its device (`resolved`)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    static_kv_cache: bool = True  # preallocated cache written in place (else torch.cat per scale)
    weights_in_precision: bool = True  # hold weights in `precision` (else fp32 weights under autocast)
    cache_conditioning: bool = True  # AdaLN outputs once per call (else once per scale, as the official code)
    compile: bool = False  # torch.compile the per-scale network step
    cuda_graphs: bool = False  # capture the per-scale step as CUDA graphs (CUDA only)
    channels_last_vae: bool = True  # NHWC VAE decode

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"engine.precision: unknown precision {self.precision!r}; choose from "
                             f"{', '.join(PRECISIONS)}")
        for name, value in vars(self).items():
            if name != "precision" and not isinstance(value, bool):
                raise ValueError(f"engine.{name} must be true or false, got {value!r}")

    def resolved(self, device: str | torch.device) -> EngineConfig:
        """This configuration with "auto" precision made concrete for `device`."""
        if self.precision != "auto":
            return self
        return replace(self, precision="bf16" if torch.device(device).type == "cuda" else "fp32")

    @classmethod
    def reference(cls, precision: str = "fp32") -> EngineConfig:
        """The same loop with every engine feature off: the official code's algorithm and numerics."""
        return cls(precision, static_kv_cache=False, weights_in_precision=False, cache_conditioning=False,
                   compile=False, cuda_graphs=False, channels_last_vae=False)
