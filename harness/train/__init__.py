"""Training: the trainer (`trainer.py`: optimiser, schedule, checkpoints, exact resume, DDP), the per-model
losses and the zoo plan (`steps.py`), ImageNet-style folders (`data.py`), the model-specific tasks
(`tasks.py`) and the zoo build and export (`zoo_build.py`). `python -m varbench.harness.train` is the trainer's
command line, as `varbench train`."""

from .trainer import HELDOUT_START, KINDS, TrainConfig, load_checkpoint, lr_factor, main, train

__all__ = ["KINDS", "TrainConfig", "HELDOUT_START", "train", "lr_factor", "load_checkpoint", "main"]
