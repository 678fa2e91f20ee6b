"""THE scale loop: every variant generates through `generate`, and differs only in its hooks.

A variant describes its schedule as a sequence of `Step`s (VAR: one per scale; HMAR: extra masked steps inside
a scale; CoDe: the drafter's steps on one random stream, the refiner's on another) and answers three
questions per step: what are the logits (`forward`), what do the drawn tokens change (`commit`), and, at the
end, what image do the tokens make (`decode`). The loop owns everything the papers compare on equal terms:
classifier-free guidance, top-k/top-p/temperature, the random streams and their consumption order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ContextManager, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from .sampling import Draw, SampleConfig, draw_tokens, guide

__all__ = ["Step", "StepOutput", "ScaleVariant", "Variant", "Generation", "generate", "resolve_labels"]


@dataclass(frozen=True)
class Step:
    """One network evaluation followed by one sampling call."""

    si: int  # scale index
    sub: int = 0  # step within the scale (HMAR's masked steps); 0 is the scale's own pass
    cfg_ratio: float = 0.0  # guidance t = cfg · cfg_ratio (VAR: si / (S - 1))
    stream: str = "main"  # random stream the step draws from; each stream starts at g_seed


class StepOutput(NamedTuple):
    logits: Tensor  # (2B, l, V) fp32, conditional rows first; (B, l, V) when guided is False
    guided: bool = True
    # Draws to make and throw away before this step's own, as (scale index, (B, l, V) logits): CoDe's refiner
    # re-draws the drafted scales so that its stream stays aligned with single-model VAR.
    discard: tuple[tuple[int, Tensor], ...] = ()


@runtime_checkable
class ScaleVariant(Protocol):
    """What the loop needs from a variant. State lives in the object `start` returns."""

    patch_nums: tuple[int, ...]
    device: torch.device

    def steps(self) -> Sequence[Step]: ...
    def start(self, labels: Tensor) -> object: ...
    def forward(self, state: object, step: Step) -> StepOutput: ...
    def commit(self, state: object, step: Step, draw: Draw) -> None: ...
    def tokens(self, state: object) -> list[Tensor]: ...
    def decode(self, state: object) -> Tensor: ...


@runtime_checkable
class Variant(ScaleVariant, Protocol):
    """What the evaluator (bench, study, reports) reads of a variant besides the loop's hooks; nothing else of a
    variant is read from outside it. VAR implements it (variants/var.py), HMAR inherits it, CoDe composes it."""

    name: str
    weights: str  # what weights it runs: a file, a zoo entry with its sha256, or "random (seed N)"
    engine: object  # its EngineConfig
    dtype: torch.dtype  # compute precision
    num_classes: int
    depth: int
    has_kv_cache: bool  # whether KV policies apply
    default_sampling: SampleConfig | None  # the family's published sampling preset, if one is fixed
    models: dict  # the networks it runs, by role (one; CoDe: drafter and refiner)

    def stages(self) -> list[tuple[str, tuple[int, ...]]]: ...  # (model, scales it samples), in run order
    def param_count(self) -> int: ...
    def param_bytes(self) -> int: ...  # as held in memory
    def flops_per_image(self) -> float: ...  # the network's, VAE decode excluded
    def vae_decode_flops(self) -> float: ...
    def kv_report(self, state: object) -> dict[str, list[int]]: ...  # kv_bytes(_current)_per_scale


class Generation(NamedTuple):
    images: Tensor  # (B, 3, H, W) float in [0, 1]
    tokens: list[Tensor]  # one (B, pn²) int64 map per scale
    labels: Tensor  # (B,)
    state: object  # the variant's final state (caches, per-scale statistics)


def resolve_labels(labels: Tensor | int | None, batch: int, num_classes: int, device: torch.device,
                   generator: torch.Generator | None) -> Tensor:
    """Labels as the official sampler reads them: None draws uniform classes from the call's generator
    (its first use), an int fills the batch (a negative one means the null class), a tensor is used as is."""
    if labels is None:
        uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
        return torch.multinomial(uniform, batch, replacement=True, generator=generator)
    if isinstance(labels, int):
        return torch.full((batch,), num_classes if labels < 0 else labels, device=device)
    return labels.to(device)


class _Streams(dict):
    """Random streams by name, each a generator on the model's device seeded with g_seed on first use."""

    def __init__(self, g_seed: int | None, device: torch.device):
        super().__init__()
        self.g_seed, self.device = g_seed, device

    def __missing__(self, name: str) -> torch.Generator | None:
        if self.g_seed is None:
            return None  # the global RNG, as the official code does without a seed
        gen = torch.Generator(device=self.device).manual_seed(self.g_seed)
        self[name] = gen
        return gen


def _no_timer(name: str) -> ContextManager:
    return contextlib.nullcontext()


@torch.inference_mode()
def generate(variant: ScaleVariant, labels: Tensor | int | None, sampling: SampleConfig,
             g_seed: int | None = 0, batch: int | None = None,
             timer: Callable[[str], ContextManager] | None = None) -> Generation:
    """Generates a batch of images.

    Args:
        variant: the model and its hooks.
        labels: (B,) class indices, an int for the whole batch, or None to draw them (needs `batch`).
        sampling: guidance and sampler settings (per scale where given as tuples).
        g_seed: seed of every random stream; None uses the global RNG.
        batch: batch size when labels is None or an int.
        timer: optional context-manager factory, called with "scale{si}" around each step and with
            "decode" around the VAE decode (e.g. `RegionTimer.region`).
    """
    steps = variant.steps()
    sampling.validate(len(variant.patch_nums))
    streams = _Streams(g_seed, variant.device)
    first_stream = steps[0].stream if steps else "main"
    num_classes = getattr(variant, "num_classes", 1000)
    labels = resolve_labels(labels, batch or 0, num_classes, variant.device, streams[first_stream])
    state = variant.start(labels)
    last = len(variant.patch_nums) - 1
    timer = timer or _no_timer
    for step in steps:
        with timer(f"scale{step.si}"):
            out = variant.forward(state, step)
            gen = streams[step.stream]
            for si, thrown_away in out.discard:  # plain draws: the official prefill never smooths them
                draw_tokens(thrown_away, replace(sampling.at(si), more_smooth=False), gen, si / last)
            logits = guide(out.logits, sampling.cfg * step.cfg_ratio) if out.guided else out.logits
            draw = draw_tokens(logits, sampling.at(step.si), gen, step.si / last)
            variant.commit(state, step, draw)
    with timer("decode"):
        images = variant.decode(state)
    return Generation(images, variant.tokens(state), labels, state)
