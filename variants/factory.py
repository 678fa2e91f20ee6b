"""Registered model factories: one table row per released (or zoo) model instead of one copied function each.

`register_model("var_d16", build_var, VARConfig(depth=16), doc, fixed={"depth": 16})` registers a factory that
calls `build_var(depth=16, **kwargs)`. `fixed` arguments belong to the model (its depth) and cannot be
overridden; `defaults` can (a tiny test model's `weights="random"`). The factory carries what listing and a
study's plan read before anything is built: `config` (architecture, for parameter counts on the meta device),
`has_kv_cache`, `accelerates`, and a signature with only the arguments a caller may pass (study keys are checked against it).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

from varbench.harness.core.registry import register_variant

__all__ = ["register_model"]


def register_model(name: str, build: Callable[..., Any], config: Any, doc: str, *, has_kv_cache: bool = True,
                   accelerates: str | None = "scale", fixed: dict[str, Any] | None = None,
                   defaults: dict[str, Any] | None = None,
                   signature_of: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """Registers `name` as `build(**fixed, **defaults, **kwargs)`. `accelerates`: the family of accelerations
    (variants/accel/) the model takes: "scale" (VAR's scale steps), "raster" (next-token models), or None.
    `signature_of`: the function whose keyword arguments `build` forwards (when `build` takes **kwargs), so that
    the factory's signature lists them."""
    fixed, defaults = dict(fixed or {}), dict(defaults or {})

    def factory(**kwargs: Any) -> Any:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise TypeError(f"{name}() fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; "
                            f"pass another registered model instead")
        return build(**fixed, **{**defaults, **kwargs})

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [p if p.kind == p.VAR_KEYWORD else p.replace(default=defaults.get(p.name, p.default), kind=keyword)
              for p in inspect.signature(signature_of or build).parameters.values()
              if p.name not in fixed and p.kind != p.VAR_POSITIONAL]
    factory.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    caller = sys._getframe(1)  # where the model is registered, for `varbench list`'s "defined in" (cheap,
    # unlike inspect.stack(), which reads every frame's source: it ran once per registered model at import)
    factory.__module__ = caller.f_globals.get("__name__", build.__module__)
    factory.defined_at = f"{factory.__module__}:{caller.f_lineno}"  # type: ignore[attr-defined]
    factory.config = config  # type: ignore[attr-defined]
    factory.has_kv_cache = has_kv_cache  # type: ignore[attr-defined]
    factory.accelerates = accelerates  # type: ignore[attr-defined]
    return register_variant(factory)
