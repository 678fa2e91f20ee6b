"""The GPU check: one command that makes a lent GPU's first minutes count (issue 13, item 4).

    python -m varbench.harness.run.gpucheck [--device cuda] [--out results/gpu/<date>-<gpu>] [--dry]
                                            [--ckpt-dir DIR] [--fixtures DIR] [--steps PATTERNS]

Runs a fixed list of small steps, each one measurement: conformance of every fixture family on the device
(`varbench conformance`, in a subprocess: one crash or hang cannot take the check down), the Triton kernels
in bf16 against their torch references, `bench` of d16 and d30 at batch 64 in bf16, d16 at batch 1 eager /
CUDA graphs / compile / both, the engine against its reference loop (speed, and greedy tokens in fp32 and
bf16), every registered KV policy's KV bytes and peak memory at d16, CoDe (d30 drafts N = 8 scales, d16
refines) against d30 alone, and HMAR d16. Each step appends one study-schema record to OUT/records.jsonl;
a failing step becomes a record of kind "error" with its traceback and the check goes on. OUT/summary.md
holds the step table and the speed table (`results_table`).

Without --ckpt-dir every model has random weights at its real architecture (speed and memory do not depend on
the values); with it, the official files are read from DIR. `--dry` (implied by --device cpu) runs the same
steps at tiny sizes (depths 2 and 3, batch 2, 2 repeats) and records the CUDA-only steps as skipped.

Time: each step has a budget (seconds, `Step.budget_s`, enforced with SIGALRM where possible), and the
whole check stops starting steps after --time-limit seconds (480 by default); steps not started are recorded
as skipped. The budgets are estimates for an H100 (results/gpu/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from varbench.harness.core.records import append_record, capture_env, config_hash, load_records

from .config import to_dict
from .gpu_steps import (DEFAULT_TIME_LIMIT_S, DRY, FULL, SAMPLING, STUDY, Check, Outcome, Sizes, Step,
                        StepTimeout, free_memory, plan_steps, skipped)
from .study import make_record, new_run_id

__all__ = ["DRY", "FULL", "Check", "Outcome", "Sizes", "Step", "main", "plan_steps", "run_check"]

# -- running -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raises StepTimeout in the main thread after `seconds` (no limit off the main thread or without
    SIGALRM: the step then just runs to its end)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise StepTimeout(f"stopped after {seconds:g} s (twice its budget, or the check's time left)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _attempt(check: Check, step: Step, limit: float | None) -> Outcome:
    """Runs one step; any failure (an exception, the budget) becomes an "error" outcome with its traceback."""
    try:
        with time_limit(limit):
            return step.fn(check)
    except (Exception, StepTimeout) as err:  # noqa: BLE001  (one broken path must not stop the check)
        return Outcome("error", {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    finally:
        free_memory()


def _record(check: Check, run_id: str, index: int, step: Step, outcome: Outcome, env: dict, started: float,
            limit: float | None) -> dict[str, Any]:
    cell = {"variant": outcome.variant or step.name.split(":", 1)[-1], "kv_policy": outcome.kv_policy,
            "variant_args": {}, "kv_args": {}, "sweep": {"step": step.name}}
    chash = config_hash({"study": STUDY, "step": step.name, "device": str(check.device), "dry": check.dry,
                         "weights": check.weights_note})
    mode = "dry" if check.dry else "full"
    extra = {"step": step.name, "mode": mode, "budget_s": step.budget_s, "limit_s": limit,
             "weights": outcome.weights or check.weights_note, "note": check.weights_note}
    if outcome.batch_size is not None:
        extra["batch_size"] = outcome.batch_size
    return make_record(f"{run_id}/{index}", outcome.kind, STUDY, cell, f"{step.name} ({mode})", chash,
                       outcome.precision, 0, to_dict(SAMPLING), outcome.engine, str(check.device), outcome.metrics,
                       env, started, **extra)


def _status(outcome: Outcome) -> str:
    m = outcome.metrics
    if outcome.kind == "error":
        return "ERROR " + m["error"].splitlines()[0][:120]
    if outcome.kind == "skipped":
        return m["skipped"][:120]
    if outcome.kind == "speed":
        return f"{m['images_per_s']:.2f} img/s, peak {(m.get('peak_memory_bytes') or 0) / 2**20:.0f} MiB"
    if outcome.kind in ("conformance", "kernel"):
        return "pass" if m.get("passed", m.get("pass")) else f"FAIL {m.get('failed', '')}"[:120]
    if outcome.kind == "numerics":
        return ", ".join(f"{p} tokens {v['token_agreement']:.4f}" for p, v in m.items())
    return ""


def run_check(check: Check, steps: list[Step], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Runs the steps in order, appending one record each to OUT/records.jsonl; writes OUT/summary.md."""
    check.out.mkdir(parents=True, exist_ok=True)
    path, run_id, env = check.out / "records.jsonl", new_run_id(), capture_env(check.device)
    t0 = time.monotonic()
    check.deadline = t0 + check.time_limit_s
    records = []
    for i, step in enumerate(steps, 1):
        started, left = time.time(), check.remaining()
        # A budget is an estimate: a step is stopped at twice it (never in a dry run, whose CPU is shared).
        limit = None if check.dry else min(step.budget_s * 2, left)
        if left <= 0:
            outcome = skipped(f"the check's time limit of {check.time_limit_s:g} s was spent before this step")
        else:
            outcome = _attempt(check, step, limit)
        if outcome.kind not in ("error", "skipped"):
            check.results[step.name] = outcome.metrics
        rec = _record(check, run_id, i, step, outcome, env, started, limit)
        append_record(path, rec)
        records.append(rec)
        log(f"[{i:2d}/{len(steps)}] {step.name:40s} {rec['duration_s']:6.1f} s (budget {step.budget_s:.0f} s, "
            f"total {time.monotonic() - t0:6.1f} s)  {_status(outcome)}")
    write_summary(check, list(load_records(path)))
    return records


def write_summary(check: Check, records: list[dict[str, Any]]) -> Path:
    """OUT/summary.md: one row per step (status, time, budget) and the speed table of every speed record; a
    step run again into the same folder (--steps) shows its latest record."""
    from tabulate import tabulate
    from varbench.harness.eval.tables import results_table

    records = list({r.get("step"): r for r in records if r.get("study") == STUDY}.values())
    rows = [{"step": r.get("step"), "kind": r["kind"], "seconds": r.get("duration_s"), "budget s": r.get("budget_s"),
             "result": _status(Outcome(r["kind"], r["metrics"]))} for r in records]
    env = records[0].get("env", {}) if records else {}
    command = f"python -m varbench.harness.run.gpucheck --device {check.device}{' --dry' if check.dry else ''}"
    counts = {kind: sum(r["kind"] == kind for r in records) for kind in ("error", "skipped")}
    head = [f"# GPU check ({'dry, tiny sizes' if check.dry else 'full sizes'}) on {env.get('device_name', '?')}",
            "", f"- weights: {check.weights_note}", f"- command: {command} --out {check.out}",
            (f"- total: {sum(r.get('duration_s') or 0 for r in records):.0f} s; errors: {counts['error']}; "
             f"skipped: {counts['skipped']}"), "", tabulate(rows, headers="keys", tablefmt="github"), "",
            results_table([r for r in records if r["kind"] == "speed"])]
    path = check.out / "summary.md"
    path.write_text("\n".join(head) + "\n")
    return path


# -- command line ------------------------------------------------------------------------------------
def _default_fixtures() -> Path | None:
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):  # ../shared beside a checkout, or shared/ inside a copy of it
        for candidate in (root.parent / "shared" / "conformance", root / "shared" / "conformance"):
            if candidate.is_dir():
                return candidate
    return None


def _default_out(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return Path("results") / "gpu" / f"{dt.date.today():%Y-%m-%d}-{slug}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m varbench.harness.run.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (cpu implies --dry)")
    p.add_argument("--out", type=Path, help="output folder (default results/gpu/<date>-<gpu>)")
    p.add_argument("--dry", action="store_true", help="tiny sizes, CUDA-only steps skipped (< 60 s on a CPU)")
    p.add_argument("--ckpt-dir", type=Path, help="folder with var_d16.pth, var_d30.pth, hmar-d16.pth and "
                   "vae_ch160v4096z32.pth (default: random init at the real architectures)")
    p.add_argument("--fixtures", type=Path, help="conformance fixture folders (default ../shared/conformance)")
    p.add_argument("--steps", help="comma-separated shell patterns of step names to run (default: all)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                   help="seconds after which no further step starts (default 480)")
    p.add_argument("--list", action="store_true", help="print the steps with their budgets and exit")
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device; valid: cuda, cuda:N, cpu")
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device {args.device!r}: the check runs on cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible here; run with --device cpu for the dry run")
    for name in ("ckpt_dir", "fixtures"):
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            p.error(f"--{name.replace('_', '-')} {folder}: not a folder")
    if args.time_limit <= 0:
        p.error(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    return device


def _select(steps: list[Step], patterns: str | None) -> list[Step]:
    if not patterns:
        return steps
    wanted = [s.strip() for s in patterns.split(",") if s.strip()]
    chosen = [s for s in steps if any(fnmatch.fnmatch(s.name, w) for w in wanted)]
    if not chosen:
        raise SystemExit(f"error: --steps {patterns!r} matches no step; steps: {', '.join(s.name for s in steps)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    device = _validate(p, args)
    check = Check(str(device), args.out or _default_out(device), args.dry or device.type == "cpu", args.ckpt_dir,
                  args.fixtures if args.fixtures is not None else _default_fixtures(), args.time_limit)
    steps = _select(plan_steps(check), args.steps)
    if args.list:
        for s in steps:
            print(f"{s.name:40s} {s.budget_s:5.0f} s")
        print(f"{'total':40s} {sum(s.budget_s for s in steps):5.0f} s")
        return 0
    print(f"GPU check on {device} ({'dry' if check.dry else 'full'}), {len(steps)} steps -> {check.out}; "
          f"weights: {check.weights_note}", flush=True)
    records = run_check(check, steps, lambda line: print(line, flush=True))
    errors = [r["step"] for r in records if r["kind"] == "error"]
    failed = [r["step"] for r in records if r["kind"] in ("conformance", "kernel")
              and not r["metrics"].get("passed", r["metrics"].get("pass"))]
    print(f"records: {check.out / 'records.jsonl'}; summary: {check.out / 'summary.md'}; "
          f"errors: {', '.join(errors) or 'none'}; failed checks: {', '.join(failed) or 'none'}")
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
