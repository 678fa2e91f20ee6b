"""The speed regression gate: pytest-benchmark results judged against committed expected ratios.

Absolute times on a shared 2-core CI machine move by tens of percent from run to run, so the gate never
compares seconds with seconds from another day. Each benchmark's minimum time is divided by the minimum of a
reference workload measured in the same run (a fixed fp32 matmul: the machine's speed right now), and that
ratio is compared with the ratio committed in `results/benchmarks/expected.json`. A benchmark fails when its
ratio exceeds the expected one by more than the threshold (default 1.6×: a 2× slowdown trips it; the measured
false-alarm rate is in results/benchmarks/README.md).

    python -m varbench.harness.speedgate bench.json                  # judge a pytest-benchmark JSON
    python -m varbench.harness.speedgate bench.json --update         # write its ratios as the new expected
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["REFERENCE", "minima", "ratios", "judge", "main"]

REFERENCE = "test_reference_matmul"
THRESHOLD = 1.6
DEFAULT_EXPECTED = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "expected.json"


def minima(report: dict[str, Any]) -> dict[str, float]:
    """{benchmark name: minimum seconds} of a pytest-benchmark JSON report."""
    return {b["name"]: float(b["stats"]["min"]) for b in report.get("benchmarks", [])}


def ratios(times: dict[str, float], reference: str = REFERENCE) -> dict[str, float]:
    """Each benchmark's minimum over the reference workload's minimum from the same run."""
    if reference not in times:
        raise KeyError(f"the reference benchmark {reference!r} is missing from the run; have: {sorted(times)}")
    return {name: t / times[reference] for name, t in times.items() if name != reference}


def judge(measured: dict[str, float], expected: dict[str, float], threshold: float = THRESHOLD) -> list[dict]:
    """One verdict per benchmark: ok, slower (beyond the threshold), new (no expectation) or missing."""
    rows = []
    for name in sorted(set(measured) | set(expected)):
        got, want = measured.get(name), expected.get(name)
        if got is None:
            rows.append({"benchmark": name, "status": "missing", "expected": want, "measured": None, "change": None})
            continue
        if want is None:
            rows.append({"benchmark": name, "status": "new", "expected": None, "measured": got, "change": None})
            continue
        change = got / want
        status = "slower" if change > threshold else "ok"
        rows.append({"benchmark": name, "status": status, "expected": want, "measured": got, "change": change})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m varbench.harness.speedgate", description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--expected", default=str(DEFAULT_EXPECTED), help="expected ratios (JSON)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="allowed slowdown factor of a ratio")
    p.add_argument("--update", action="store_true", help="write this run's ratios as the expected ones")
    args = p.parse_args(argv)
    from tabulate import tabulate

    measured = ratios(minima(json.loads(Path(args.report).read_text())))
    expected_path = Path(args.expected)
    if args.update:
        expected_path.parent.mkdir(parents=True, exist_ok=True)
        expected_path.write_text(json.dumps({"reference": REFERENCE, "ratios": measured}, indent=2) + "\n")
        print(f"wrote {len(measured)} expected ratios to {expected_path}")
        return 0
    if not expected_path.is_file():
        print(f"no expected ratios at {expected_path}: nothing to judge (run with --update to create them)")
        return 0
    rows = judge(measured, json.loads(expected_path.read_text())["ratios"], args.threshold)
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f"))
    slower = [r["benchmark"] for r in rows if r["status"] == "slower"]
    if slower:
        print(f"\nspeed gate FAILED: {', '.join(slower)} slower than expected by more than {args.threshold}×")
        return 1
    print(f"\nspeed gate passed ({len(rows)} benchmarks, threshold {args.threshold}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
