"""varbench.variants: the models and their hooks into the one scale loop.

Importing this package registers the built-in variants in `varbench.harness.VARIANTS`.
"""

from . import kv_policies, var  # noqa: F401  (registers var_d16 … var_d36, test_var, and KV policies)
from . import code  # noqa: F401  (registers code_d30_d16 and test_code)
from . import hmar  # noqa: F401  (registers hmar_d16 … hmar_d30 and test_hmar)
from . import infinity_build  # noqa: F401  (registers infinity_2b, infinity_8b and test_infinity)
from . import zoo  # noqa: F401  (registers the trained zoo: var_zoo_d1 … var_zoo_d5, code_zoo_d5_d2)
from . import llamagen  # noqa: F401  (registers llamagen_b … llamagen_3b and test_llamagen)
from .var import VAR, EngineConfig, build_var

__all__ = ["VAR", "EngineConfig", "build_var", "describe"]


def describe(name: str) -> dict:
    """One row of `varbench list`: name, family, parameter count (meta device), where it is defined."""
    from varbench.harness.core.registry import VARIANTS

    from .params import param_count

    factory = VARIANTS.get(name)
    cfg = getattr(factory, "config", None)
    cfgs = cfg if isinstance(cfg, tuple) else (cfg,) if cfg else ()  # a tuple: several models (CoDe)
    family = name.removeprefix("test_").split("_")[0]
    doc = (factory.__doc__ or "").strip().splitlines()
    return {"name": name, "family": family, "params": f"{sum(map(param_count, cfgs)):,}" if cfgs else "?",
            "description": doc[0] if doc else "", "defined in": VARIANTS.origin(name)}
