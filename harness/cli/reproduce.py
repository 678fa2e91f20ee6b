"""`varbench reproduce TABLE [--measured RESULTS]`: a published table beside our measurements."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from varbench.harness.eval.reproduce import reproduce, tables_overview

    if args.list or not args.table:
        print(tables_overview())
        return 0
    measured = None
    if args.measured:
        from varbench.harness.core.records import load_records

        path = Path(args.measured)
        if not path.exists():
            raise FileNotFoundError(f"no records at {str(path)!r}")
        measured = list(load_records(path))
    print(reproduce(args.table, measured))
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="a published table beside our measurements")
    p.add_argument("table", nargs="?", help="table id (see --list)")
    p.add_argument("--measured", help="records .jsonl or folder to put beside the published values")
    p.add_argument("--list", action="store_true", help="list the published tables")
    p.set_defaults(fn=_cmd_reproduce)
