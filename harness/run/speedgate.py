"""The speed regression gate: pytest-benchmark results judged against committed expected ratios.

Absolute times on a shared 2-core CI machine move by tens of percent from run to run, and CI lands on CPUs of
different kinds, so the gate never compares seconds with seconds from another day. Each benchmark's minimum
time is divided by the minimum of the reference workloads it names (`benchmark.extra_info["reference"]`,
the geometric mean where it names several), measured in the same run. The references are frozen plain-torch
workloads of the same kind of work (a GEMM, the VQVAE decoder's convolutions, sort/exponential/softmax), so a
CPU whose convolutions are relatively slower moves a benchmark and its reference together. The ratio is
compared with the one committed in `results/benchmarks/expected.json`; a benchmark fails when its ratio exceeds
the expected one by more than the threshold (default 1.6×: a 2× slowdown trips it; the measured false-alarm
rate is in results/benchmarks/README.md).

    python -m varbench.harness.run.speedgate bench.json                  # judge a pytest-benchmark JSON
    python -m varbench.harness.run.speedgate bench.json --update         # write its ratios as the new expected
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["REFERENCE_PREFIX", "minima", "ratios", "judge", "main"]

REFERENCE_PREFIX = "test_reference_"  # benchmarks named so are references, never judged themselves
THRESHOLD = 1.6
DEFAULT_EXPECTED = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "expected.json"


def minima(report: dict[str, Any]) -> dict[str, float]:
    """{benchmark name: minimum seconds} of a pytest-benchmark JSON report."""
    return {b["name"]: float(b["stats"]["min"]) for b in report.get("benchmarks", [])}


def ratios(report: dict[str, Any]) -> dict[str, float]:
    """Each benchmark's minimum over the geometric mean of its references' minima from the same run.

    A benchmark without `extra_info["reference"]` is judged against every reference of the run."""
    times = minima(report)
    references = {name: t for name, t in times.items() if name.startswith(REFERENCE_PREFIX)}
    if not references:
        raise KeyError(f"no reference benchmark ({REFERENCE_PREFIX}*) in the run; have: {sorted(times)}")
    out = {}
    for bench in report.get("benchmarks", []):
        name = bench["name"]
        if name in references:
            continue
        wanted = bench.get("extra_info", {}).get("reference") or sorted(references)
        missing = [r for r in wanted if r not in references]
        if missing:
            raise KeyError(f"{name} is judged against {missing}, which the run lacks; have: {sorted(references)}")
        scale = math.exp(sum(math.log(references[r]) for r in wanted) / len(wanted))
        out[name] = times[name] / scale
    return out


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
    p = argparse.ArgumentParser(prog="python -m varbench.harness.run.speedgate", description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--expected", default=str(DEFAULT_EXPECTED), help="expected ratios (JSON)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="allowed slowdown factor of a ratio")
    p.add_argument("--update", action="store_true", help="write this run's ratios as the expected ones")
    args = p.parse_args(argv)
    from tabulate import tabulate

    measured = ratios(json.loads(Path(args.report).read_text()))
    expected_path = Path(args.expected)
    if args.update:
        expected_path.parent.mkdir(parents=True, exist_ok=True)
        expected_path.write_text(json.dumps({"ratios": measured}, indent=2) + "\n")
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
