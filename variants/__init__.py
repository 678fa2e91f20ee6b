"""varbench.variants: the models and their hooks into the one scale loop.

Importing this package registers the built-in variants in `varbench.harness.VARIANTS`.
"""

from . import var  # noqa: F401  (registers var_d16 … var_d36, test_var)
from .var import VAR, EngineConfig, build_var

__all__ = ["VAR", "EngineConfig", "build_var"]
