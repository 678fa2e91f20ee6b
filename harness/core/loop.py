"""THE scale loop: every variant generates through `generate`, and differs only in its hooks.

A variant describes its schedule as a sequence of `Step`s (VAR: one per scale; HMAR: extra masked steps inside
a scale; CoDe: the drafter's steps on one random stream, the refiner's on another) and answers three
questions per step: what are the logits (`forward`), what do the drawn tokens change (`commit`), and, at the
end, what image do the tokens make (`decode`). The loop owns everything the papers compare on equal terms:
classifier-free guidance, top-k/top-p/temperature, the random streams and their consumption order.

A step may feed several positions (a raster model's parallel rows or drafted window) and may carry `Drafts`, which
the sampling layer verifies against the step's own distribution (sampling_verify.draw_speculative) with the
step's stream. The loop walks `steps()` by index, so a variant whose step count depends on what was accepted
(SJD) returns a list it appends to while committing; every fixed schedule is walked exactly as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ContextManager, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from .sampling import CFG_MAX, Draw, NonFiniteLogitsError, Sampler, SampleConfig, bad_logits, draw_tokens, sample_scale
from .sampling_verify import Drafts, SpeculativeDraw, draw_speculative

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
    # Drafted tokens for the first L of the step's L + 1 positions, verified in the sampling layer: commit then
    # gets a SpeculativeDraw (sampling_verify.py) instead of a Draw.
    drafts: Drafts | None = None


@runtime_checkable
class ScaleVariant(Protocol):
    """What the loop needs from a variant. State lives in the object `start` returns."""

    patch_nums: tuple[int, ...]
    device: torch.device

    # optional: `sampler`, the family's Sampler (sampling.py); without one the loop samples as VAR does.
    # optional: `reads_sampling = True`: `start(labels, sampling)` is given the call's SampleConfig (Infinity
    # decides its batch, unconditional half and hidden-state guidance from the per-scale cfg)

    def steps(self) -> Sequence[Step]: ...  # walked by index: a list the variant appends to while committing
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
    reads_sampling = getattr(variant, "reads_sampling", False)
    state = variant.start(labels, sampling) if reads_sampling else variant.start(labels)
    last = len(variant.patch_nums) - 1
    sampler: Sampler = getattr(variant, "sampler", None) or sample_scale
    timer = timer or _no_timer
    for step in steps:
        with timer(f"scale{step.si}"):
            out = variant.forward(state, step)
            try:
                draw = _draw(out, step, sampling, streams[step.stream], last, sampler)
            except NonFiniteLogitsError as err:  # only on failure: the diagnosis reads tensors (device syncs)
                raise NonFiniteLogitsError(_diagnose(variant, sampling, step, out, err), err.cause) from None
            variant.commit(state, step, draw)
    with timer("decode"):
        images = variant.decode(state)
    return Generation(images, variant.tokens(state), labels, state)


def _draw(out: StepOutput, step: Step, sampling: SampleConfig, gen: torch.Generator | None, last: int,
          sampler: Sampler) -> Draw | SpeculativeDraw:
    """One step's sampling: the throw-away draws first (CoDe's, always VAR's sampler), then the step's own (with
    its drafts verified, where it carries any)."""
    for si, thrown_away in out.discard:  # plain draws: the official prefill never smooths them
        draw_tokens(thrown_away, replace(sampling.at(si), more_smooth=False), gen, si / max(last, 1))
    t = sampling.cfg_at(step.si) * step.cfg_ratio
    if out.drafts is not None:
        return draw_speculative(sampler, out.logits, out.guided, t, sampling.at(step.si), gen,
                                step.si / max(last, 1), out.drafts)
    return sampler(out.logits, out.guided, t, sampling.at(step.si), gen, step.si / max(last, 1))


def _where(variant: ScaleVariant, step: Step) -> str:
    pn = variant.patch_nums[step.si]
    where = f"scale {step.si} ({pn}x{pn} tokens)"
    where += f", masked step {step.sub}" if step.sub else ""
    return where + (f", stream {step.stream!r}" if step.stream != "main" else "")


def _diagnose(variant: ScaleVariant, sampling: SampleConfig, step: Step, out: StepOutput,
              err: NonFiniteLogitsError) -> str:
    """Names the likely cause of non-finite logits at a step: the model (and a non-finite weight, if one is
    found), the guidance scale, or the temperature. The sampler filters its input in place, but only to -inf
    and never a whole row, so the model's own logits can still be judged here."""
    where = f"sampling failed at {_where(variant, step)}"
    if err.cause == "temperature":
        return f"{where}: {err}"
    if bad_logits(out.logits) or any(bad_logits(t) for _, t in out.discard):
        weight = _first_non_finite_weight(variant, step.stream)
        hint = (f"check the weights (e.g. {weight})" if weight else
                "every weight is finite, so the forward pass overflowed: check the inputs, the KV policy and the "
                f"precision ({getattr(variant, 'dtype', 'unknown dtype')})")
        return f"{where}: non-finite logits from the model: {hint}"
    if out.guided:
        t, peak = sampling.cfg_at(step.si) * step.cfg_ratio, float(out.logits.abs().amax())
        return (f"{where}: classifier-free guidance with sampling.cfg = {sampling.cfg!r} (t = {t:.4g} at this "
                f"scale, on model logits up to |{peak:.3g}|) overflowed fp32; use a smaller cfg (valid: "
                f"[0, {CFG_MAX:g}]; the papers use 1.5 to 4)")
    return f"{where}: {err} (sampling at this scale: {sampling.at(step.si)})"


def _first_non_finite_weight(variant: ScaleVariant, stream: str) -> str | None:
    """'a NaN in <parameter> of <model>' for the first parameter holding a NaN or an inf (the model drawing on the
    step's stream first: CoDe's streams are its roles), else the first buffer holding a NaN (buffers such as
    attention masks hold -inf on purpose)."""
    models = getattr(variant, "models", None) or {getattr(variant, "name", "the model"): variant}
    roles = sorted(models, key=lambda role: role != stream)
    nets = [(role, getattr(models[role], "net", models[role])) for role in roles]
    nets = [(role, net) for role, net in nets if isinstance(net, torch.nn.Module)]
    for role, net in nets:
        for name, p in net.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                return f"{'a NaN' if bool(p.isnan().any()) else 'an inf'} in {name} of {role}"
    for role, net in nets:
        for name, b in net.named_buffers():
            if b.is_floating_point() and bool(b.isnan().any()):
                return f"a NaN in buffer {name} of {role}"
    return None
