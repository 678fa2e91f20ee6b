"""varbench.harness: the one sampling loop, the evaluator and the command line.

Public API: `generate` (the scale loop), `SampleConfig`, `VARIANTS` / `create_variant` (the registry).
"""

from .loop import Generation, ScaleVariant, Step, StepOutput, generate
from .registry import VARIANTS, Registry, register_variant
from .sampling import SampleConfig

__version__ = "0.1.0"

__all__ = ["Generation", "ScaleVariant", "Step", "StepOutput", "generate", "VARIANTS", "Registry",
           "register_variant", "SampleConfig", "create_variant"]


def create_variant(name: str, **kwargs):
    """Builds a registered variant by name (importing the built-in variants on first use)."""
    import varbench.variants  # noqa: F401  (registers the built-in variants)

    return VARIANTS.get(name)(**kwargs)
