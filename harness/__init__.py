"""varbench.harness: the one sampling loop, the evaluator and the command line, in layers that import
downwards only (tests/test_layers.py):

    core/         the loop, sampling, registry, KV caches, records, checkpoints, hashing, measurement
    eval/         quality metrics and extractors, consistency, metric table, fits, tables, plots, reproduce
    conformance/  replays of the official code's reference outputs, one checker per family
    run/          study config and runner, sample shards, bench, speed gate
    train/        trainer, losses, zoo plan and build
    cli/          the command line, one module per subcommand (imported by nothing)

`varbench.variants` (model families, KV policies, the zoo) sits between core and eval; `varbench.kernels`
below core. Public API: `generate` (the scale loop), `SampleConfig`, `VARIANTS` / `create_variant`.
"""

from .core.loop import Generation, ScaleVariant, Step, StepOutput, Variant, generate
from .core.registry import VARIANTS, Registry, create_variant, register_variant
from .core.sampling import SampleConfig

__version__ = "0.1.0"

__all__ = ["Generation", "ScaleVariant", "Step", "StepOutput", "Variant", "generate", "VARIANTS", "Registry",
           "register_variant", "SampleConfig", "create_variant"]
