"""Measures the speed gate's false-alarm rate on this machine: reruns the speed benchmarks of an unchanged
tree, sets the expected ratios from the median of the first `--calibrate` runs, and counts how many of the
remaining runs the gate fails. Usage (from the repository root):

    python results/benchmarks/measure_false_alarms.py --runs 40 --calibrate 10 --out /tmp/speedruns
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from varbench.harness.run.speedgate import THRESHOLD, judge, ratios


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--calibrate", type=int, default=10)
    p.add_argument("--threshold", type=float, default=THRESHOLD)
    p.add_argument("--out", default="/tmp/speedruns")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(args.runs):
        path = out / f"run{i:03d}.json"
        if not path.is_file():
            subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/speed", "-m", "speed", "-p", "no:cacheprovider",
                            f"--benchmark-json={path}"], check=True, capture_output=True)
        runs.append(ratios(json.loads(path.read_text())))
    names = sorted(runs[0])
    expected = {n: statistics.median(r[n] for r in runs[: args.calibrate]) for n in names}
    judged = runs[args.calibrate:]
    fails = [i for i, r in enumerate(judged) if any(v["status"] == "slower" for v in judge(r, expected, args.threshold))]
    worst = {n: max(r[n] / expected[n] for r in judged) for n in names}
    spread = {n: (min(r[n] for r in runs) / expected[n], max(r[n] for r in runs) / expected[n]) for n in names}
    print(json.dumps({"runs_judged": len(judged), "false_alarms": len(fails), "rate": len(fails) / len(judged),
                      "threshold": args.threshold, "expected": expected, "worst_change": worst,
                      "change_range_all_runs": spread}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
