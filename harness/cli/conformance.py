"""`varbench conformance DIR [--device cpu]`: replay official reference outputs."""

from __future__ import annotations

import argparse
import json


def _cmd_conformance(args: argparse.Namespace) -> int:
    from varbench.harness.conformance import run_conformance

    report = run_conformance(args.folder, args.device)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conformance", help="replay a conformance fixture folder")
    p.add_argument("folder")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=_cmd_conformance)
