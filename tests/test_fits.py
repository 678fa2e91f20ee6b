"""Power-law fits: recovery of a known exponent, the floor model, and the `varbench fit` command."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from varbench.harness.cli import main
from varbench.harness.eval.fits import compare, fit_power_law, fit_power_law_floor

# The VAR scaling family's sizes (total parameters, billions) at depths 6, 10, 14, 16, 20, 24, 30 (METRICS.md §3)
N = np.array([18.5, 78.4, 209.3, 310.3, 600.9, 1033.4, 2010.0]) / 1e3


def _var_law(seed: int = 0) -> np.ndarray:
    """L = (2.0·N)^−0.23 with 2% multiplicative noise: the paper's last-scale loss law."""
    return (2.0 * N) ** -0.23 * np.exp(np.random.default_rng(seed).normal(0, 0.02, len(N)))


def test_recovers_the_var_exponent_inside_its_interval():
    fit = fit_power_law(N, _var_law())
    assert fit.alpha_ci95_t[0] <= -0.23 <= fit.alpha_ci95_t[1]
    assert fit.alpha_ci95_bootstrap[0] <= -0.23 <= fit.alpha_ci95_bootstrap[1]
    assert fit.beta == pytest.approx(2.0, rel=0.15) and fit.a == pytest.approx(2.0**-0.23, rel=0.05)
    assert fit.r < -0.99 and fit.r2 == pytest.approx(fit.r**2) and fit.n == 7
    assert len(fit.residuals_log) == 7 and abs(np.mean(fit.residuals_log)) < 1e-12  # OLS residuals sum to 0
    assert all(abs(e) < 0.1 for e in fit.holdout["relative_error"])


def test_exact_power_law_is_fitted_exactly():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    fit = fit_power_law(x, 3.0 * x**-0.5, bootstrap=100)
    assert fit.alpha == pytest.approx(-0.5) and fit.a == pytest.approx(3.0) and fit.r2 == pytest.approx(1.0)
    assert fit.beta == pytest.approx(3.0 ** (1 / -0.5))  # (beta·x)^alpha = a·x^alpha


def test_the_floor_model_wins_on_data_with_a_floor_and_not_without():
    with_floor = 0.5 + (2.0 * N) ** -0.5 * np.exp(np.random.default_rng(1).normal(0, 0.01, len(N)))
    pure, floor = fit_power_law(N, with_floor), fit_power_law_floor(N, with_floor)
    assert compare(pure, floor)["preferred"] == "power_law_with_floor"
    assert floor.c == pytest.approx(0.5, abs=0.05) and floor.alpha == pytest.approx(-0.5, abs=0.1)
    plain = _var_law()
    assert compare(fit_power_law(N, plain), fit_power_law_floor(N, plain))["preferred"] != "power_law_with_floor"


def test_bad_data_is_refused():
    with pytest.raises(ValueError, match="x > 0 and y > 0"):
        fit_power_law([1, 2, 3], [1, 0, 2])
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_power_law([1, 2], [1, 2])


def test_fit_command_reads_csv_and_prints_json(tmp_path, capsys):
    csv = tmp_path / "zoo.csv"
    csv.write_text("params,loss\n" + "\n".join(f"{n},{l}" for n, l in zip(N, _var_law())))
    plot = tmp_path / "fit.png"
    assert main(["fit", str(csv), "--x", "params", "--y", "loss", "--floor", "--json", "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    lo, hi = result["power_law"]["alpha_ci95_t"]
    assert lo <= -0.23 <= hi and result["comparison"]["preferred"] in ("tie", "power_law")
    assert plot.stat().st_size > 1000
    assert main(["fit", str(csv), "--x", "params", "--y", "los"]) == 2
    assert "Did you mean: loss" in capsys.readouterr().err


# --- `varbench fit` on recorded results (issue 13, items 9 and 14) ---------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _no_nan(text: str) -> dict:
    """json.loads that refuses NaN/Infinity, as strict JSON parsers do."""
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _record(kind: str, variant: str, metrics: dict, policy: str = "full", **extra) -> dict:
    cell = {"variant": variant, "kv_policy": policy, "variant_args": {}, "kv_args": {}, "sweep": {}}
    return {"kind": kind, "cell": cell, "label": f"{variant} {policy}", "metrics": metrics,
            "config_hash": f"{kind}-{variant}-{policy}-{metrics.get('batch_size')}", **extra}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_fit_params_against_fid_joins_the_speed_and_quality_records_of_each_cell(capsys):
    """The example of `fit --help` on the shipped zoo study: params (speed records) against fid (quality)."""
    records = [json.loads(line) for line in (REPO / "results/zoo_scaling/records.jsonl").read_text().splitlines()]
    params = {r["label"]: r["metrics"]["params"] for r in records if r["kind"] == "speed"}
    fid = {r["label"]: r["metrics"]["fid"] for r in records if r["kind"] == "quality"}
    labels = sorted(params, key=params.get)
    slope = np.polyfit(np.log([params[k] for k in labels]), np.log([fid[k] for k in labels]), 1)[0]

    assert main(["fit", str(REPO / "results/zoo_scaling"), "--x", "params", "--y", "fid", "--json"]) == 0
    out = capsys.readouterr()
    result = _no_nan(out.out)
    assert sorted(result["points"]) == sorted(labels) and result["power_law"]["n"] == 5
    assert result["power_law"]["alpha"] == pytest.approx(slope, rel=1e-9)
    assert result["power_law"]["x_range"] == [min(params.values()), max(params.values())]
    # five zoo sizes whose FID moves by a few %: the interval on the exponent includes 0, and fit says so
    assert any("includes 0" in w for w in result["warnings"]) and "warning: the exponent's 95% interval" in out.err


def test_fit_with_too_few_points_says_which_records_it_found_and_why_they_did_not_qualify(tmp_path, capsys):
    path = _write(tmp_path / "records.jsonl", [
        _record("speed", "a", {"params": 100, "batch_size": 4, "images_per_s": 9.0}),
        _record("speed", "b", {"params": 200, "batch_size": 4, "images_per_s": 7.0}),
        _record("quality", "a", {"fid": 30.0, "precision": 0.5}),
        _record("quality", "c", {"fid": 20.0, "precision": 0.6}),
    ])
    assert main(["fit", str(path), "--x", "params", "--y", "fid"]) == 2
    err = capsys.readouterr().err
    assert "1 usable points for fid against params" in err and "at least 3" in err
    assert "3 cells joined from 4 records (no record holds both columns)" in err
    assert "records: 2 speed, 2 quality" in err
    assert "speed records have numeric columns: batch_size, images_per_s, params" in err
    assert "quality records have numeric columns: fid, precision" in err
    assert "cells with params: 2 of 3 (a full, b full)" in err and "cells with fid: 2 of 3 (a full, c full)" in err


def test_fit_reads_one_record_kind_per_record_when_a_record_holds_both_columns(tmp_path, capsys):
    speeds = [_record("speed", "a", {"params": 100, "batch_size": b, "images_per_s": 3.0 * b**0.5}) for b in (1, 2, 4, 8)]
    path = _write(tmp_path / "records.jsonl", speeds)
    assert main(["fit", str(path), "--x", "batch_size", "--y", "images_per_s", "--json", "--holdout", "0"]) == 0
    result = _no_nan(capsys.readouterr().out)
    assert result["power_law"]["n"] == 4 and result["power_law"]["alpha"] == pytest.approx(0.5)
    assert result["points"][0] == "a full (speed, batch 1)"


def test_fit_drops_non_finite_points_with_a_warning_and_refuses_when_too_few_remain(tmp_path, capsys):
    csv = tmp_path / "with_inf.csv"
    csv.write_text("params,loss\n1,2.0\n2,inf\n4,1.5\n8,1.2\n16,-inf\n32,0.9\n")
    assert main(["fit", str(csv), "--x", "params", "--y", "loss", "--json"]) == 0
    out = capsys.readouterr()
    result = _no_nan(out.out)
    assert result["power_law"]["n"] == 4 and np.isfinite(result["power_law"]["alpha"])
    assert result["dropped"] == ["line 3 (params=2, loss=inf)", "line 6 (params=16, loss=-inf)"]
    assert "warning: dropped 2 point(s)" in out.err and "line 3 (params=2, loss=inf)" in out.err

    csv.write_text("params,loss\n1,2.0\n2,inf\n4,1.5\n")
    assert main(["fit", str(csv), "--x", "params", "--y", "loss"]) == 2
    err = capsys.readouterr().err
    assert "2 usable points" in err and "dropped (not finite positive numbers): line 3 (params=2, loss=inf)" in err


def test_fit_json_never_prints_nan_and_a_degenerate_floor_fit_is_flagged(tmp_path, capsys):
    csv = tmp_path / "flat.csv"
    csv.write_text("params,loss\n" + "\n".join(f"{2**k},2.0" for k in range(6)))
    assert main(["fit", str(csv), "--x", "params", "--y", "loss", "--floor", "--json"]) == 0
    out = capsys.readouterr()
    result = _no_nan(out.out)  # beta = a^(1/alpha) and the t interval are NaN for a flat line: null here
    assert result["power_law"]["beta"] is None and result["power_law"]["alpha"] == pytest.approx(0, abs=1e-12)
    assert any("~0" in w for w in result["warnings"])
    assert any("floor fit is degenerate" in w for w in result["warnings"]) and "degenerate" in out.err


def test_fit_text_writes_laws_with_three_significant_digits(tmp_path, capsys):
    csv = tmp_path / "zoo.csv"
    csv.write_text("params,fid\n" + "\n".join(f"{n * 1e6},{4000 * (n * 1e6) ** -0.023 * e}" for n, e in
                                             zip(N, np.exp(np.random.default_rng(2).normal(0, 0.002, len(N))))))
    assert main(["fit", str(csv), "--x", "params", "--y", "fid", "--floor"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert re.fullmatch(r"fid = [34]\.\d\de\+03·params\^-0\.02\d\d?", first), first
    assert "e-1" not in out and "with a floor: fid = " in out  # no (4.82e-158·x)^-0.023


def test_law_text_and_plot_legend_are_readable():
    from varbench.harness.eval.fits import law_text
    from varbench.harness.eval.plots import fit_legend

    x = N * 1e6
    fit = fit_power_law(x, 4000 * x**-0.023, bootstrap=10)
    assert fit.beta < 1e-100  # what the old legend printed: (beta·x)^alpha
    assert law_text(fit) == "y = 4e+03·x^-0.023"
    assert fit_legend(fit) == ["y = 4e+03·x^-0.023  (r = -1.000)"]
    floor = fit_power_law_floor(N, 0.5 + 2.0 * N**-0.5)
    assert re.fullmatch(r"y = 0\.5\d* \+ 2(\.\d+)?·x\^-0\.5\d*", law_text(floor)), law_text(floor)


def test_the_library_refuses_non_finite_points_by_index():
    with pytest.raises(ValueError, match=r"not finite: #1 \(x=2, y=inf\)"):
        fit_power_law([1, 2, 3, 4], [1, np.inf, 2, 3])
    with pytest.raises(ValueError, match=r"got #1 \(x=2, y=-1\)"):
        fit_power_law([1, 2, 3], [1, -1, 2])
