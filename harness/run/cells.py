"""What a study measures: its cells (variant × KV policy × acceleration × sweep point), and the checks run on
them before anything is measured (names, table owners, argument keys, files the scoring needs)."""

from __future__ import annotations

import difflib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from varbench.harness.core.registry import KV_POLICIES, VARIANTS
from varbench.variants.accel import ACCELERATIONS

from .config import StudyConfig, at_point, sweep_points
from .reference import reference_source

__all__ = ["Cell", "plan", "check_names", "check_args", "SET_BY_STUDY"]

log = logging.getLogger(__name__)
SET_BY_STUDY = ("engine", "device", "kv_policy", "acceleration", "acceleration_args")  # build_cell passes them
_WARNED: set[str] = set()


@dataclass(frozen=True)
class Cell:
    """One variant × KV policy × acceleration × sweep point, with the study as it reads at that point."""

    variant: str
    kv_policy: str
    point: dict[str, Any]
    config: StudyConfig = field(repr=False)
    acceleration: str = "none"

    @property
    def variant_args(self) -> dict[str, Any]:
        return dict(self.config.variant_args.get(self.variant, {}))

    @property
    def kv_args(self) -> dict[str, Any]:
        return dict(self.config.kv_args.get(self.kv_policy, {}))

    @property
    def accel_args(self) -> dict[str, Any]:
        return dict(self.config.accel_args.get(self.acceleration, {}))

    def describe(self) -> dict[str, Any]:
        accel = {"acceleration": self.acceleration, "accel_args": self.accel_args} if self.accelerated else {}
        return {"variant": self.variant, "kv_policy": self.kv_policy, "variant_args": self.variant_args,
                "kv_args": self.kv_args, **accel, "sweep": self.point}  # plain cells keep their old hashes

    @property
    def accelerated(self) -> bool:
        return self.acceleration != "none"

    @property
    def label(self) -> str:
        extra = [f"{k}={v}" for k, v in self.point.items()]
        return " ".join([self.variant, self.kv_policy, *([self.acceleration] if self.accelerated else []), *extra])


def _touches(key: str, variant: str, policy: str, acceleration: str) -> bool:
    """Whether a sweep axis can change a cell: variant_args.X.* only touches variant X, kv_args.P.* policy P,
    accel_args.A.* acceleration A."""
    section, _, rest = key.partition(".")
    owner = rest.partition(".")[0]
    mine = {"variant_args": variant, "kv_args": policy, "accel_args": acceleration}
    return section not in mine or owner == mine[section]


def plan(study: StudyConfig) -> list[Cell]:
    """Every distinct cell of the study, in a stable order. A sweep axis that cannot change a cell (another
    variant's or policy's arguments) is left out of its point, so that cell is measured once, not per value;
    a variant without a KV cache (factory attribute `has_kv_cache = False`, e.g. HMAR) runs with the first
    policy only; a variant runs "none" and the accelerations that apply to it (`accel_runs_on`)."""
    import varbench.variants  # noqa: F401  (registers the built-in variants)

    methods = {a: ACCELERATIONS.get(a)() for a in study.accelerations}  # defaults: what each runs on
    cells, seen = [], set()
    for point in sweep_points(study):
        config = at_point(study, point)
        for variant in study.variants:
            factory = VARIANTS.get(variant) if variant in VARIANTS else None
            cached = getattr(factory, "has_kv_cache", True)
            policies = study.kv_policies if cached else study.kv_policies[:1]  # no cache: one policy
            accelerations = [a for a in study.accelerations if a == "none" or accel_runs_on(methods[a], factory)]
            for policy in policies:
                for accel in accelerations:
                    own = {k: v for k, v in point.items() if _touches(k, variant, policy, accel)}
                    key = (variant, policy, accel, json.dumps(own, sort_keys=True, default=str))
                    if key not in seen:
                        seen.add(key)
                        cells.append(Cell(variant, policy, own, config, accel))
    return cells


def accel_runs_on(method, factory) -> bool:
    """Whether an acceleration applies to a registered variant, read off the factory before anything is built:
    its kind (`accelerates`: "scale" steps for VAR, CoDe and Infinity, "raster" for LlamaGen, None for HMAR) is
    the method's, and a scale method runs on the model's family (`accel_family`: "var" or "infinity")."""
    kind = getattr(factory, "accelerates", "scale")
    if kind is None or getattr(method, "family", "scale") != kind:
        return False
    return kind != "scale" or getattr(factory, "accel_family", "var") in getattr(method, "families", ("var",))


def check_names(study: StudyConfig) -> None:
    """Fails at once (KeyError with "did you mean") on an unknown variant or KV policy."""
    import varbench.variants  # noqa: F401  (registers the built-in variants and policies)

    for name in study.variants:
        VARIANTS.get(name)
    for name in study.kv_policies:
        KV_POLICIES.get(name)
    for name in study.accelerations:
        ACCELERATIONS.get(name)
    if study.baseline is not None and study.baseline not in study.variants:
        raise ValueError(f"baseline {study.baseline!r} is not one of the study's variants {list(study.variants)}")
    check_args(study)
    q = study.quality
    if q is not None and q.metrics:  # files the scoring needs: missing ones fail now, not after the sampling
        from varbench.harness.eval.extractors import resolve_weights

        resolve_weights(q.extractor, q.extractor_weights)
        if q.reference is None and any(m not in ("isc", "clip") for m in q.metrics):
            reference_source(None)
        if q.reference not in (None, "synthetic") and not Path(q.reference).exists():
            raise FileNotFoundError(f"quality.reference {q.reference!r} does not exist")
    if q is not None and q.prompts is not None:  # the prompt file, read now: a missing one fails before sampling
        from .text import study_prompts, takes_prompts

        study_prompts(q)
        if not any(takes_prompts(v) for v in study.variants):
            raise ValueError(f"quality.prompts = {q.prompts!r}, but no variant of this study takes prompts "
                             f"({', '.join(study.variants)}): text-to-image variants do (e.g. infinity_2b)")


def check_args(study: StudyConfig) -> None:
    """Fails before any measurement on a [variant_args.X] / [kv_args.P] table (or sweep axis) that names no
    variant / KV policy, on a variant argument its factory does not take, and on KV arguments its policy
    rejects, and likewise for [accel_args.A]; every message lists the valid names or keys."""
    owners = {"variant_args": (study.variants, VARIANTS), "kv_args": (study.kv_policies, KV_POLICIES),
              "accel_args": (study.accelerations, ACCELERATIONS)}
    for section, (names, registry) in owners.items():
        for owner in getattr(study, section):
            _check_owner(section, owner, names, registry)
    for key in study.sweep:
        section, _, rest = key.partition(".")
        if section in owners and rest:
            _check_owner(section, rest.partition(".")[0], *owners[section])
    checked: set[str] = set()
    for cell in plan(study):
        _check_variant_keys(cell.variant, cell.variant_args)
        kv_key = json.dumps([cell.kv_policy, cell.kv_args], sort_keys=True, default=str)
        if kv_key not in checked:  # building a policy validates its arguments and calibrates nothing yet
            checked.add(kv_key)
            try:
                KV_POLICIES.get(cell.kv_policy)(**cell.kv_args)
            except (TypeError, ValueError) as err:
                raise ValueError(f"kv_args.{cell.kv_policy}: {err}") from None
        accel_key = json.dumps([cell.acceleration, cell.accel_args], sort_keys=True, default=str)
        if accel_key not in checked:
            checked.add(accel_key)
            try:
                ACCELERATIONS.get(cell.acceleration)(**cell.accel_args)
            except (TypeError, ValueError) as err:
                raise ValueError(f"accel_args.{cell.acceleration}: {err}") from None


def _check_owner(section: str, owner: str, names: tuple[str, ...], registry) -> None:
    """A table's owner must be one of the study's names; a registered one the study does not run only warns
    (a study file's table for a variant that `--variants` left out)."""
    if owner in names:
        return
    kind = {"variant_args": "variant", "kv_args": "KV policy", "accel_args": "acceleration"}[section]
    if owner in registry:
        message = f"[{section}.{owner}]: {kind} {owner!r} is not in this study ({', '.join(names)}), its " \
                  f"arguments are unused"
        if message not in _WARNED:  # the CLI and run_study both check: say it once
            _WARNED.add(message)
            log.warning(message)
        return
    close = difflib.get_close_matches(owner, [*names, *registry.list()], n=1)
    hint = f" (did you mean {section}.{close[0]}?)" if close else ""
    raise ValueError(f"[{section}.{owner}]: no {kind} is called {owner!r}{hint}; this study's: {', '.join(names)}")


def _check_variant_keys(variant: str, args: dict[str, Any]) -> None:
    """Variant arguments against the registered factory's signature; a factory taking **kwargs is not checked
    (its builder reports unknown ones)."""
    reserved = sorted(set(args) & set(SET_BY_STUDY))
    if reserved:
        raise ValueError(f"variant_args.{variant}: {', '.join(map(repr, reserved))} cannot be a variant argument: "
                         f"the study sets it (its [engine] table, `device`, `kv_policies`, `accelerations`)")
    params = inspect.signature(VARIANTS.get(variant)).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.name not in SET_BY_STUDY]
    for key in sorted(args):
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"variant_args.{variant}: unknown key {key!r}{hint}; valid keys: "
                             f"{', '.join(valid) or '(none)'}")
