"""Training: the trainer (`trainer.py`: optimiser, schedule, checkpoints, exact resume, DDP), the per-model
losses and the zoo plan (`steps.py`), ImageNet-style folders (`data.py`), the model-specific tasks
(`tasks.py`), the zoo build and export (`zoo_build.py`), and the command line (`command.py`, run as
`python -m varbench.harness.train` and as `varbench train`)."""

from .command import main
from .trainer import HELDOUT_START, KINDS, TrainConfig, load_checkpoint, lr_factor, train

__all__ = ["KINDS", "TrainConfig", "HELDOUT_START", "train", "lr_factor", "load_checkpoint", "main"]
