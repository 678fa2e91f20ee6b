"""`varbench fit RESULTS|CSV --x COL --y COL [--floor]`: power-law fits with intervals.

Where the points come from: a CSV row is a point. Of records, a record holding both columns is a point (e.g.
`--x batch_size --y images_per_s` over speed records); when no record holds both, the records of each cell
are joined into one row (`tables.cell_rows`: speed at its largest batch, quality, consistency), so
`--x params --y fid` pairs a cell's parameter count (speed record) with its FID (quality record). A column is
named as in the records (`fid`, `metrics.fid`, `cell.variant`) or, joined, as `speed.<key>`/`quality.<key>`.
Points whose x or y is not a finite positive number (log space) are dropped with a warning that names them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Points:
    """The points of a fit, their labels, and what was dropped or lacked a column (for the messages)."""

    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    source: str = ""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (strings, inf, nan, bools)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _positive(value: Any) -> float | None:
    """A finite float > 0 (a power law is fitted in log space), else None."""
    number = _number(value)
    return number if number is not None and number > 0 else None


def _candidates(name: str) -> list[str]:
    bare = name.removeprefix("metrics.")
    return list(dict.fromkeys([name, bare, f"metrics.{bare}", f"cell.{bare}"]))


def _lookup(row: dict[str, Any], name: str) -> tuple[bool, Any]:
    """(present, value) of the first spelling of `name` that `row` holds."""
    for key in _candidates(name):
        if key in row and not _missing(row[key]):
            return True, row[key]
    return False, None


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _collect(rows: list[tuple[str, dict[str, Any]]], x: str, y: str, source: str) -> Points:
    points = Points(source=source)
    for label, row in rows:
        (has_x, vx), (has_y, vy) = _lookup(row, x), _lookup(row, y)
        if not (has_x and has_y):
            continue
        nx, ny = _positive(vx), _positive(vy)
        if nx is None or ny is None:
            points.dropped.append(f"{label} ({x}={vx!r}, {y}={vy!r})")
            continue
        points.x.append(nx)
        points.y.append(ny)
        points.labels.append(label)
    return points


def _check_columns(rows: list[dict[str, Any]], path: Path, names: tuple[str, ...]) -> None:
    columns = {k for row in rows for k in row}
    for name in names:
        if not any(c in columns for c in _candidates(name)):
            import difflib

            close = difflib.get_close_matches(name, sorted(columns), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(f"no column {name!r} in {path}.{hint}")


def _csv_label(i: int, row: dict[str, Any]) -> str:
    """`line N` (the header is line 1), with the cell when the CSV is a `varbench table --format csv`."""
    tag = " ".join(str(row[k]) for k in ("variant", "KV policy", "table") if not _missing(row.get(k)))
    return f"line {i + 2}" + (f" [{tag}]" if tag else "")


def _record_label(r: dict[str, Any]) -> str:
    batch = r.get("metrics", {}).get("batch_size")
    return f"{r.get('label', r.get('id', '?'))} ({r.get('kind', '?')}" + (f", batch {batch})" if batch else ")")


def _csv_points(path: Path, x: str, y: str) -> Points:
    import pandas as pd

    rows = pd.read_csv(path).to_dict("records")
    _check_columns(rows, path, (x, y))
    return _collect([(_csv_label(i, r), r) for i, r in enumerate(rows)], x, y, f"{len(rows)} CSV rows")


def _record_points(path: Path, x: str, y: str) -> tuple[Points, list[dict[str, Any]]]:
    from varbench.harness.core.records import load_records
    from varbench.harness.eval.tables import cell_rows, latest

    records = latest(r for r in load_records(path) if isinstance(r, dict))
    flat = [_flatten(r) for r in records]
    cells = cell_rows(records)
    _check_columns(flat + cells, path, (x, y))
    points = _collect([(_record_label(r), f) for r, f in zip(records, flat)], x, y, f"{len(records)} records")
    if points.x or points.dropped:
        return points, records
    joined = _collect([(c["cell"], c) for c in cells], x, y,
                      f"{len(cells)} cells joined from {len(records)} records (no record holds both columns)")
    return joined, records


def _why_too_few(points: Points, records: list[dict[str, Any]] | None, x: str, y: str, need: int,
                 path: Path) -> str:
    """Which records were found, which columns they have, and why too few of them qualified."""
    lines = [f"{len(points.x)} usable points for {y} against {x} in {path} ({points.source}); a fit needs "
             f"at least {need}, each with finite numbers > 0 for both."]
    if points.dropped:
        lines.append(f"dropped (not finite positive numbers): {'; '.join(points.dropped)}")
    if records is not None:
        from varbench.harness.eval.tables import cell_rows

        kinds = Counter(str(r.get("kind")) for r in records)
        lines.append("records: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
        for kind in kinds:
            keys = sorted({k for r in records if r.get("kind") == kind for k, v in r.get("metrics", {}).items()
                           if _number(v) is not None})
            lines.append(f"  {kind} records have numeric columns: {', '.join(keys) or 'none'}")
        cells = cell_rows(records)
        for name in (x, y):
            having = [c["cell"] for c in cells if _lookup(c, name)[0]]
            lines.append(f"  cells with {name}: {len(having)} of {len(cells)}"
                         + (f" ({', '.join(having[:8])}{' …' if len(having) > 8 else ''})" if having else ""))
    return "\n".join(lines)


def _points(path: Path, x: str, y: str, need: int) -> Points:
    if path.suffix == ".csv":
        points, records = _csv_points(path, x, y), None
    else:
        points, records = _record_points(path, x, y)
    if len(points.x) < need:
        raise ValueError(_why_too_few(points, records, x, y, need, path))
    if points.dropped:
        print(f"warning: dropped {len(points.dropped)} point(s) whose {x} or {y} is not a finite number > 0: "
              + "; ".join(points.dropped), file=sys.stderr)
    return points


def _json_safe(value: Any) -> Any:
    """NaN and inf become null: JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_text(args: argparse.Namespace, result: dict, pure, floor, warnings: list[str]) -> None:
    from varbench.harness.eval.fits import law_text

    lo_t, hi_t = pure.alpha_ci95_t
    lo_b, hi_b = pure.alpha_ci95_bootstrap
    readable_beta = math.isfinite(pure.beta) and 1e-6 <= pure.beta <= 1e6  # else (β·x)^α says nothing
    print(law_text(pure, args.x, args.y) + (f"  (paper form ({pure.beta:.3g}·{args.x})^{pure.alpha:.3g})"
                                            if readable_beta and not warnings else ""))
    print(f"  alpha {pure.alpha:.4f} ± {pure.alpha_se:.4f} (se); 95% t [{lo_t:.4f}, {hi_t:.4f}], "
          f"bootstrap [{lo_b:.4f}, {hi_b:.4f}]")
    print(f"  r {pure.r:.4f}, R² {pure.r2:.4f}, n {pure.n}, {args.x} in [{pure.x_range[0]:.4g}, {pure.x_range[1]:.4g}]")
    print("  log residuals: " + ", ".join(f"{r:+.3f}" for r in pure.residuals_log))
    if pure.holdout:
        errs = ", ".join(f"{e:+.1%}" for e in pure.holdout["relative_error"])
        print(f"  largest {pure.holdout['points']} points predicted from the rest: relative error {errs}")
    if floor is not None:
        cmp = result["comparison"]
        print(f"with a floor: {law_text(floor, args.x, args.y)}")
        print(f"  AIC {cmp['aic_power_law']:.2f} (pure) vs {cmp['aic_with_floor']:.2f} (floor): "
              f"preferred {cmp['preferred']}")
    if args.plot:
        print(f"plot: {result['plot']}")


def _cmd_fit(args: argparse.Namespace) -> int:
    from varbench.harness.eval.fits import compare, fit_power_law, fit_power_law_floor, fit_warnings

    path = Path(args.results)
    if not path.exists():
        raise FileNotFoundError(f"no results at {str(path)!r}: give a CSV file, a records .jsonl or a folder")
    if args.holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {args.holdout}")
    points = _points(path, args.x, args.y, 4 if args.floor else 3)
    x, y = points.x, points.y
    pure = fit_power_law(x, y, holdout=args.holdout)
    result: dict = {"x": args.x, "y": args.y, "points": points.labels, "power_law": pure.to_dict()}
    floor = None
    if args.floor:
        floor = fit_power_law_floor(x, y)
        result["power_law_with_floor"] = floor.to_dict()
        result["comparison"] = compare(pure, floor)
    warnings = fit_warnings(pure, floor)
    result["warnings"] = warnings
    result["dropped"] = points.dropped
    if args.plot:
        from varbench.harness.eval.plots import plot_fit

        result["plot"] = str(plot_fit(x, y, pure, floor, args.plot, args.x, args.y))
    for note in warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(_json_safe(result), allow_nan=False))
    else:
        _print_text(args, result, pure, floor, warnings)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a power law (and one with a floor) to recorded or CSV data",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="CSV file, records .jsonl or a folder of records")
    p.add_argument("--x", required=True, help="column of x (e.g. params)")
    p.add_argument("--y", required=True, help="column of y (e.g. fid or metrics.fid)")
    p.add_argument("--floor", action="store_true", help="also fit y = c + a·x^alpha and compare by AIC")
    p.add_argument("--holdout", type=int, default=2, help="largest points to predict from the rest")
    p.add_argument("--json", action="store_true", help="print one JSON object (NaN and inf as null)")
    p.add_argument("--plot", help="write a log-log plot with the fit and its band to this file")
    p.set_defaults(fn=_cmd_fit)
