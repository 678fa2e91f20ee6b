"""`varbench train KIND ...` (and `python -m varbench.harness.train`): the command line of the trainer, one
option per TrainConfig field, with the checks that stop a run that would train on a random tokenizer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import trainer as trainer_module
from .trainer import KINDS, TrainConfig, train

__all__ = ["main"]


# What `varbench train --help` says of each TrainConfig field (every option gets a line; a test checks it).
_HELP = {
    "depth": "transformer depth of var and hmar (width 32·depth on the zoo preset, 64·depth on imagenet256)",
    "preset": "model and data sizes: zoo (the shipped 64 px models), tiny (tests) or imagenet256 (VAR's official)",
    "batch_size": "global batch, split over the torchrun ranks",
    "lr": "peak learning rate (0: the kind's default, 1e-3)",
    "weight_decay": "AdamW weight decay (not on biases, gains, embeddings or position tensors)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "warmup_steps": "linear warm-up steps (-1: steps // 50, at least 1)",
    "min_lr_ratio": "the schedule decays to this fraction of the peak rate",
    "schedule": "decay after warm-up: cosine or linear",
    "grad_clip": "gradient-norm clipping threshold (0: off)",
    "ckpt_every": "write OUT/last.pt and OUT/model.pt every N steps (and at the end)",
    "log_every": "one OUT/log.jsonl line per N steps",
    "seed": "seed of the init, the batch order and the label dropout",
    "data_seed": "seed of the synthetic data set",
    "num_train": "synthetic training images (rendered, and for var/hmar tokenised, before the first step)",
    "num_heldout": "synthetic held-out images scored at the end",
    "data": "an ImageNet-style folder DIR/train/<class>/*.jpg (+ DIR/val/) instead of the synthetic set",
    "workers": "DataLoader worker processes for --data (0: load in the training process)",
    "cond_drop": "var/hmar label dropout probability (the null class for classifier-free guidance)",
    "vqvae": "var/hmar/vqvae-decoder: the frozen tokenizer's weights (required; the zoo's is {zoo_vqvae})",
    "init": "var/hmar: start from this model.pt instead of a fresh init (hmar: an HMAR or VAR state dict)",
    "from_scale": "var: loss only on scales >= N, a CoDe-style refiner (usually with --init a trained VAR)",
    "stage": "hmar: 1 = next-scale path, 2 = masked path (needs --init STAGE1/model.pt)",
    "scale_weights": "hmar stage 1 per-token loss weights: lognormal (HMAR's) or uniform",
    "device": "cpu or cuda (cuda:N)",
    "threads": "torch CPU threads (0: torch's default)",
    "stop_at": "stop after this step with a checkpoint, although --steps sets the schedule's length",
}

_EPILOG = """builds:
  zoo                   retrain the whole shipped zoo (VQVAE, classifier, VARs, refiner, HMAR) and export it:
                        varbench train zoo --out runs/zoo --export   (see varbench train zoo --help)

examples:
  varbench train vqvae --out runs/vqvae --steps 3000
  varbench train vqvae-decoder --out runs/vqvae_dec --steps 1500 --batch-size 16 --vqvae {zoo_vqvae}
      (fine-tunes the decoder only: encoder, quant conv and codebook stay bit-identical, so the tokens do)
  varbench train var --out runs/var_d3 --steps 1500 --depth 3 --vqvae {zoo_vqvae}
  varbench train var --out runs/refiner --steps 300 --depth 2 --from-scale 5 --init runs/var_d2/model.pt \\
      --vqvae {zoo_vqvae}
  varbench train hmar --stage 1 --out runs/h1 --steps 500 --depth 5 --init runs/var_d5/model.pt \\
      --vqvae {zoo_vqvae}
  varbench train hmar --stage 2 --out runs/h2 --steps 500 --depth 5 --init runs/h1/model.pt \\
      --vqvae {zoo_vqvae}
  torchrun --nproc_per_node 2 -m varbench.harness.train var ...   (the same options, one process per rank)"""


def _zoo_vqvae() -> str:
    """Where the shipped zoo's tokenizer lies: the package's variants/zoo/vqvae.pt, or $VARBENCH_ZOO's."""
    from varbench.variants.zoo import zoo_dir

    return str(zoo_dir() / "vqvae.pt")


def _parser() -> argparse.ArgumentParser:
    zoo_vqvae = _zoo_vqvae()
    ap = argparse.ArgumentParser(prog="varbench train", description=trainer_module.__doc__.split("\n\n")[0],
                                 epilog=_EPILOG.format(zoo_vqvae=zoo_vqvae),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=(*KINDS, "zoo"), metavar="KIND",
                    help=f"what to train: {', '.join(KINDS)}; or zoo, the whole zoo build (its own options)")
    ap.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, summary.json")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps (the schedule's length)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bars (they go to stderr; sparse lines when it is not a terminal)")
    ap.add_argument("--random-vqvae", action="store_true",
                    help="var/hmar without --vqvae: train on a seeded random tokenizer (tests and smoke runs only; "
                         "its tokens mean nothing)")
    skip = {"kind", "out", "steps", "progress"}
    for f in fields(TrainConfig):
        if f.name not in skip:
            ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
                            help=f"{_HELP[f.name].format(zoo_vqvae=zoo_vqvae)} (default: {f.default!r})")
    return ap


def _check_tokenizer(ap: argparse.ArgumentParser, ns: dict[str, Any], random_vqvae: bool) -> None:
    """var and hmar learn a tokenizer's tokens: without one they would silently train on random codes."""
    if ns["kind"] == "vqvae-decoder":
        if random_vqvae or not ns["vqvae"]:
            ap.error("vqvae-decoder fine-tunes a trained tokenizer's decoder with its tokens frozen: pass --vqvae "
                     f"PATH (the zoo's: {_zoo_vqvae()})")
        if not Path(ns["vqvae"]).is_file():
            ap.error(f"--vqvae {ns['vqvae']}: no such file")
        return
    if ns["kind"] not in ("var", "hmar"):
        if random_vqvae:
            ap.error(f"--random-vqvae applies to kinds var and hmar, not {ns['kind']}")
        return
    if ns["vqvae"] and random_vqvae:
        ap.error("give either --vqvae PATH or --random-vqvae, not both")
    for option in ("vqvae", "init"):
        if ns[option] and not Path(ns[option]).is_file():
            ap.error(f"--{option} {ns[option]}: no such file")
    if not ns["vqvae"] and not random_vqvae:
        ap.error(f"{ns['kind']} trains on a frozen tokenizer's tokens: pass --vqvae PATH (the zoo's, for the zoo "
                 f"preset: {_zoo_vqvae()}; for imagenet256 the official vae_ch160v4096z32.pth), or --random-vqvae "
                 "to train on a seeded random tokenizer (tests and smoke runs only)")


def _parse(argv: Sequence[str] | None) -> tuple[TrainConfig, bool]:
    ap = _parser()
    ns = vars(ap.parse_args(argv))
    if ns["kind"] == "zoo":  # reached only when zoo is not the first argument
        ap.error("zoo takes its own options and must come first: varbench train zoo --out DIR [--export] "
                 "(see varbench train zoo --help)")
    resume, random_vqvae = ns.pop("resume"), ns.pop("random_vqvae")
    _check_tokenizer(ap, ns, random_vqvae)
    try:
        return TrainConfig(**ns), resume
    except ValueError as err:  # a bad combination of settings: a usage error, not a traceback
        ap.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """`varbench train KIND ...` (and `varbench train zoo ...`, the zoo build's own command line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["zoo"]:
        from .zoo_build import main as zoo_main

        return zoo_main(args[1:])
    cfg, resume = _parse(args)
    summary = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
