"""Training-free accelerations of the scale loop, as modifiers a VAR model consults (issue 15).

Registered in `ACCELERATIONS` (a `Registry`, like `KV_POLICIES`): `fastvar` (arXiv:2503.23367, cached token
pruning), `skipvar` (arXiv:2506.08908, per-sample step skipping and unconditional-branch dropping, its
training-free rule), `stagevar` (arXiv:2512.16483, guidance off and low-rank compute in the late stage),
`litevar` (arXiv:2411.17178, windowed attention and attention shared by the CFG halves; no quantization), and
`none`. FastVAR, SkipVAR and StageVAR also run on Infinity (`accel_family = "infinity"`, with the official
Infinity settings where published); LiteVAR is refused there with the list of those that run. For raster
(next-token) models such as LlamaGen, `sjd` (arXiv:2410.01699), `lantern` (arXiv:2410.03355) and `zipar`
(arXiv:2412.04062), dispatched to variants/accel/raster.py. Each is a small object
(variants/accel/base.py `Acceleration`) with its arguments checked by name; none copies the loop.

Use: `create_variant("var_zoo_d5", acceleration="fastvar", acceleration_args={"ratios": [0.4, 0.5]})`, or on
any built variant (VAR, a CoDe pair, Infinity, with any KV policy) `apply_acceleration(variant, "fastvar", **args)`, the
one function the run layer calls. `accel_report(variant, state)` says what the method did in a call
(`Generation.state`): tokens computed per scale, rows run per scale, steps skipped per sample, decisions.
"""

from __future__ import annotations

from typing import Any

from varbench.harness.core.registry import Registry

from .base import Acceleration, AccelState, StepPlan, family_of
from .steps import accelerated_forward, freeze_rows

__all__ = ["ACCELERATIONS", "Acceleration", "AccelState", "StepPlan", "apply_acceleration", "accel_report",
           "accelerated_forward", "freeze_rows", "register_acceleration", "supporting"]

ACCELERATIONS: Registry = Registry("acceleration", "varbench.accelerations", builtins="varbench.variants.accel.methods")
register_acceleration = ACCELERATIONS.register


def apply_acceleration(variant, name: str | Acceleration | None, **args: Any):
    """Runs later calls of `variant` with the acceleration `name` (None or "none": plain VAR) and returns it.

    A CoDe pair (a variant with `models`) gets one acceleration object on each of its models; the second model
    joins the first one's per-call state, so a decision made while drafting holds while refining. HMAR has its own
    steps and is refused."""
    accel = ACCELERATIONS.get(name or "none")(**args) if not isinstance(name, Acceleration) else name
    if isinstance(name, Acceleration) and args:
        raise ValueError("give an acceleration's arguments either to its constructor or here, not both")
    if getattr(variant, "raster", False) or getattr(accel, "family", "scale") == "raster":
        from .raster import apply_raster  # raster (next-token) models: SJD, LANTERN, ZipAR (issue 16)

        return apply_raster(variant, accel)
    models = list(getattr(variant, "models", {variant.name: variant}).values())
    for model in models:
        if not hasattr(model, "joins_acceleration") or getattr(model, "has_kv_cache", True) is False:
            raise ValueError(f"accelerations apply to VAR and Infinity models; {getattr(model, 'name', model)!r} "
                             "is not one (HMAR runs its own masked steps)")
        if accel.name != "none":
            family = family_of(model)
            if family not in accel.families:
                raise ValueError(f"acceleration {accel.name!r} does not run on {family} models such as "
                                 f"{model.name!r} yet; the ones that do: {', '.join(supporting(family))}")
            accel.bind(model)
            accel.supports(model)
    for i, model in enumerate(models):
        model.acceleration = None if accel.name == "none" else accel
        model.joins_acceleration = i > 0
    variant.acceleration_record = accel.record()
    return variant


def supporting(family: str) -> list[str]:
    """The registered accelerations that run on models of `family` ("var", "infinity"); `none` runs on all."""
    return [name for name in ACCELERATIONS.list()
            if name != "none" and family in getattr(ACCELERATIONS.get(name)(), "families", ())]


def accel_report(variant, state) -> dict[str, Any]:
    """What the acceleration did in the call that ended in `state` (a VAR or CoDe state); {} without one."""
    for s in (state, getattr(state, "refiner", None), getattr(state, "drafter", None)):
        if getattr(s, "accel", None) is not None:
            return s.accel.report()
    return {}
