"""`varbench env`: the environment block records carry."""

from __future__ import annotations

import argparse
import json


def _cmd_env(args: argparse.Namespace) -> int:
    from varbench.harness.core.records import capture_env

    print(json.dumps(capture_env(args.device), indent=2))
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print the environment block")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=_cmd_env)
