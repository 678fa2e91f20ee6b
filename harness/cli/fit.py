"""`varbench fit RESULTS|CSV --x COL --y COL [--floor]`: power-law fits with intervals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fit_columns(path: Path, x: str, y: str):
    """The (x, y) columns of a CSV file or of records (flattened: `metrics.fid` may be written `fid`)."""
    import pandas as pd

    from varbench.harness.core.records import load_records

    if path.suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        frame = pd.json_normalize(list(load_records(path)))
    columns = []
    for name in (x, y):
        match = next((c for c in (name, f"metrics.{name}", f"cell.{name}") if c in frame.columns), None)
        if match is None:
            import difflib

            close = difflib.get_close_matches(name, list(frame.columns), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(f"no column {name!r} in {path}.{hint}")
        columns.append(match)
    data = frame[columns].apply(pd.to_numeric, errors="coerce").dropna()
    return data[columns[0]].to_numpy(), data[columns[1]].to_numpy()


def _cmd_fit(args: argparse.Namespace) -> int:
    from varbench.harness.eval.fits import compare, fit_power_law, fit_power_law_floor

    path = Path(args.results)
    if not path.exists():
        raise FileNotFoundError(f"no results at {str(path)!r}: give a CSV file, a records .jsonl or a folder")
    x, y = _fit_columns(path, args.x, args.y)
    pure = fit_power_law(x, y, holdout=args.holdout)
    result: dict = {"x": args.x, "y": args.y, "power_law": pure.to_dict()}
    floor = None
    if args.floor:
        floor = fit_power_law_floor(x, y)
        result["power_law_with_floor"] = floor.to_dict()
        result["comparison"] = compare(pure, floor)
    if args.plot:
        from varbench.harness.eval.plots import plot_fit

        result["plot"] = str(plot_fit(x, y, pure, floor, args.plot, args.x, args.y))
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    lo_t, hi_t = pure.alpha_ci95_t
    lo_b, hi_b = pure.alpha_ci95_bootstrap
    print(f"{args.y} = {pure.a:.4g}·{args.x}^{pure.alpha:.4f} = ({pure.beta:.4g}·{args.x})^{pure.alpha:.4f}")
    print(f"  alpha {pure.alpha:.4f} ± {pure.alpha_se:.4f} (se); 95% t [{lo_t:.4f}, {hi_t:.4f}], "
          f"bootstrap [{lo_b:.4f}, {hi_b:.4f}]")
    print(f"  r {pure.r:.4f}, R² {pure.r2:.4f}, n {pure.n}, {args.x} in [{pure.x_range[0]:.4g}, {pure.x_range[1]:.4g}]")
    print("  log residuals: " + ", ".join(f"{r:+.3f}" for r in pure.residuals_log))
    if pure.holdout:
        errs = ", ".join(f"{e:+.1%}" for e in pure.holdout["relative_error"])
        print(f"  largest {pure.holdout['points']} points predicted from the rest: relative error {errs}")
    if floor is not None:
        cmp = result["comparison"]
        print(f"with a floor: {args.y} = {floor.c:.4g} + {floor.a:.4g}·{args.x}^{floor.alpha:.4f}")
        print(f"  AIC {cmp['aic_power_law']:.2f} (pure) vs {cmp['aic_with_floor']:.2f} (floor): "
              f"preferred {cmp['preferred']}")
    if args.plot:
        print(f"plot: {result['plot']}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a power law (and one with a floor) to recorded or CSV data")
    p.add_argument("results", help="CSV file, records .jsonl or a folder of records")
    p.add_argument("--x", required=True, help="column of x (e.g. params)")
    p.add_argument("--y", required=True, help="column of y (e.g. fid or metrics.fid)")
    p.add_argument("--floor", action="store_true", help="also fit y = c + a·x^alpha and compare by AIC")
    p.add_argument("--holdout", type=int, default=2, help="largest points to predict from the rest")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write a log-log plot with the fit and its band to this file")
    p.set_defaults(fn=_cmd_fit)
