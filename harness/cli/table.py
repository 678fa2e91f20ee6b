"""`varbench table RESULTS [--format md|csv]`: the tables of recorded results."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_table(args: argparse.Namespace) -> int:
    from varbench.harness.core.records import load_records
    from varbench.harness.eval.tables import results_table

    path = Path(args.results)
    if not path.exists():
        raise FileNotFoundError(f"no records at {str(path)!r}: give a records .jsonl file or a run folder")
    records = list(load_records(path))
    if not records:
        raise ValueError(f"{str(path)!r} holds no records")
    print(results_table(records, args.format).rstrip("\n"))
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="print the tables of recorded results")
    p.add_argument("results", help="records .jsonl file or a folder of them")
    p.add_argument("--format", default="md", choices=["md", "csv"])
    p.set_defaults(fn=_cmd_table)
