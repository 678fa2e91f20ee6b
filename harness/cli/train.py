"""`varbench train KIND ...` and `varbench train zoo ...`: the trainer's and the zoo build's own command lines
(each owns its flags and its --help)."""

from __future__ import annotations

import argparse

KINDS = ("vqvae", "vqvae-decoder", "var", "hmar", "classifier")


def run(argv: list[str]) -> int:
    from varbench.harness.train import main as train_main  # it hands `train zoo ...` to the zoo build

    return train_main(argv)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", add_help=False,  # its --help is the trainer's
                       help=f"train {', '.join(KINDS)} on the synthetic set or an ImageNet folder (--data), or "
                       "retrain the zoo (`train zoo`): varbench train --help")
    p.set_defaults(passthrough=run)
