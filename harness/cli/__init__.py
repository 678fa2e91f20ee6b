"""`varbench`: the command line, one module per subcommand. The only package that prints.

    varbench run [STUDY.toml] [--set k=v] [--out DIR]  a study (default: the embedded one, on a CPU)
    varbench table RESULTS [--format md|csv]          the tables of recorded results
    varbench fit RESULTS|CSV --x COL --y COL [--floor] power-law fits with intervals
    varbench reproduce TABLE [--measured RESULTS]     a published table beside our measurements (--list)
    varbench train KIND --out DIR --steps N           train on the synthetic set (or --data IMAGENET_DIR); KIND:
                                                      vqvae, var (--from-scale N --init VAR.pt: a CoDe-style
                                                      refiner), hmar (--stage 1, then --stage 2 --init), classifier
    varbench train zoo --out DIR --export             retrain the shipped zoo from scratch (~75 min, 2 CPUs)
    varbench list [PATTERN]                           registered variants with parameter counts
    varbench bench [--variant NAME] [--batch N] ...   speed, memory, KV bytes, MFU as one JSON object; a record
                                                      in --out DIR (default runs/bench-<time>)
    varbench conformance DIR [--device cpu]           replay official reference outputs; exit 0 iff all pass
    varbench env                                      the environment block records carry
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from . import bench, conformance, env, fit, listing, reproduce, run, table, train
from .run import default_study_path

__all__ = ["main", "default_study_path"]

COMMANDS = (run, table, fit, reproduce, train, listing, bench, conformance, env)  # in --help order


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="varbench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from varbench.harness.core.checkpoints import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args, rest = p.parse_known_args(argv)
    if getattr(args, "passthrough", None):  # `train`: the rest is the trainer's command line
        return args.passthrough(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.command_line = shlex.join(["varbench", *argv])  # what a record says made it
    try:
        return args.fn(args)
    except (KeyError, ValueError, CheckpointError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
