"""`varbench list [PATTERN]`: registered variants with parameter counts, and KV policies."""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from varbench.harness.core.registry import KV_POLICIES, VARIANTS
    from varbench.variants import describe

    rows = [describe(name) for name in VARIANTS.list(args.pattern)]
    policies = [{"name": name, "family": "kv_policy", "params": "-",
                 "description": (KV_POLICIES.get(name).__doc__ or "").strip().split("\n")[0],
                 "defined in": KV_POLICIES.origin(name)} for name in KV_POLICIES.list(args.pattern)]
    if not rows and not policies:
        print(f"no variant or KV policy matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(tabulate(rows + policies, headers="keys", tablefmt="github"))
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered variants")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(fn=_cmd_list)
