"""`varbench list [PATTERN]`: registered variants with parameter counts, KV policies and accelerations."""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from varbench.harness.core.registry import KV_POLICIES, VARIANTS
    from varbench.variants import describe
    from varbench.variants.accel import ACCELERATIONS

    def modifiers(registry, family: str) -> list[dict]:
        return [{"name": name, "family": family, "params": "-",
                 "description": (registry.get(name).__doc__ or "").strip().split("\n")[0],
                 "defined in": registry.origin(name)} for name in registry.list(args.pattern)]

    rows = ([describe(name) for name in VARIANTS.list(args.pattern)] + modifiers(KV_POLICIES, "kv_policy")
            + modifiers(ACCELERATIONS, "acceleration"))
    if not rows:
        print(f"no variant, KV policy or acceleration matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered variants, KV policies and accelerations")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(fn=_cmd_list)
