"""Power-law fits: recovery of a known exponent, the floor model, and the `varbench fit` command."""

import json

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
