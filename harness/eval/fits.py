"""Power-law fits of scaling data: a pure power law in log-log space, and one with an irreducible floor.

The VAR paper (Tian et al. 2024, arXiv:2404.02905, Eq. 9) writes its laws as L = (β·X)^α and fits them as
straight lines in log-log space, reporting Pearson r ≈ −0.998. A high |r| alone says little (METRICS.md §3):
any smooth monotone curve over one decade gives it. So every fit here also reports standard errors, a
t-interval and a bootstrap interval on the exponent, per-point residuals, the error of predicting the largest
points from a fit to the others, and the AIC of the pure law against a law with a floor, y = c + a·x^α.
`fit_warnings` names what makes a fit meaningless (an exponent indistinguishable from 0, a floor fit stuck at a
bound) and `law_text` writes a law with 3 significant digits, as a·x^b (+ c): the paper's (β·x)^α form turns
unreadable (β = a^(1/α)) when α is small.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, stats

__all__ = ["PowerLawFit", "FloorFit", "fit_power_law", "fit_power_law_floor", "compare", "fit_warnings", "law_text"]

# |alpha| below this is "no dependence on x" for a warning (a 1000x range of x changes y by < 0.7%)
FLAT_EXPONENT = 1e-3
_ALPHA_BOUND = -20.0  # the floor fit's lower bound on alpha


@dataclass
class PowerLawFit:
    """y = a·x^alpha = (beta·x)^alpha, fitted by least squares on (log x, log y)."""

    alpha: float
    a: float
    beta: float
    alpha_se: float
    log_a_se: float
    alpha_ci95_t: tuple[float, float]
    alpha_ci95_bootstrap: tuple[float, float]
    r: float
    r2: float
    n: int
    x_range: tuple[float, float]
    residuals_log: list[float]
    holdout: dict[str, Any]
    aic: float
    kind: str = "power_law"

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(x, dtype=float) ** self.alpha

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FloorFit:
    """y = c + a·x^alpha, fitted with a robust (soft-L1) loss on log residuals from several starts."""

    alpha: float
    a: float
    c: float
    alpha_se: float | None
    c_se: float | None
    n: int
    residuals_log: list[float]
    aic: float
    starts: int
    kind: str = "power_law_with_floor"
    extra: dict[str, Any] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.c + self.a * np.asarray(x, dtype=float) ** self.alpha

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(x: Any, y: Any, need: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of one length, got {x.shape} and {y.shape}")
    if len(x) < need:
        raise ValueError(f"a fit needs at least {need} points, got {len(x)}")
    bad = np.flatnonzero(~(np.isfinite(x) & np.isfinite(y)))
    if len(bad):
        raise ValueError(f"a fit needs finite numbers; not finite: {_points(x, y, bad)} (drop them first)")
    bad = np.flatnonzero((x <= 0) | (y <= 0))
    if len(bad):
        raise ValueError(f"power-law fits need x > 0 and y > 0 (they are fitted in log space); "
                         f"got {_points(x, y, bad)}")
    if np.ptp(x) == 0:
        raise ValueError(f"a fit needs at least 2 distinct x values; every x is {x[0]:g}")
    return x, y


def _points(x: np.ndarray, y: np.ndarray, idx: np.ndarray, most: int = 5) -> str:
    shown = ", ".join(f"#{i} (x={x[i]:g}, y={y[i]:g})" for i in idx[:most])
    return shown + (f" and {len(idx) - most} more" if len(idx) > most else "")


def _aic(rss: float, n: int, k: int) -> float:
    """Gaussian AIC of log residuals (the same likelihood for both models, so they compare)."""
    return n * np.log(max(rss, 1e-300) / n) + 2 * k


def _ols(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(lx, ly, 1)
    return float(slope), float(intercept)


def fit_power_law(x: Any, y: Any, bootstrap: int = 2000, holdout: int = 2, seed: int = 0) -> PowerLawFit:
    """Fits y = a·x^alpha in log-log space.

    Args:
        bootstrap: resamples of the (x, y) pairs for the percentile interval on alpha.
        holdout: how many of the largest-x points to predict from a fit to the rest.
    """
    x, y = _check(x, y, 3)
    lx, ly = np.log(x), np.log(y)
    n = len(x)
    res = stats.linregress(lx, ly)
    alpha, log_a = float(res.slope), float(res.intercept)
    t = stats.t.ppf(0.975, n - 2)
    resid = ly - (log_a + alpha * lx)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        idx = rng.integers(0, n, n)
        if np.ptp(lx[idx]) > 0:  # a resample of one repeated x has no slope
            boots.append(_ols(lx[idx], ly[idx])[0])
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan)
    held = {}
    if 0 < holdout <= n - 3:
        order = np.argsort(x)
        fit_idx, test_idx = order[:-holdout], order[-holdout:]
        s, i = _ols(lx[fit_idx], ly[fit_idx])
        pred = np.exp(i + s * lx[test_idx])
        held = {"points": int(holdout), "x": x[test_idx].tolist(), "y": y[test_idx].tolist(),
                "predicted": pred.tolist(), "relative_error": (pred / y[test_idx] - 1).tolist(),
                "alpha_without_them": s}
    return PowerLawFit(
        alpha=alpha, a=float(np.exp(log_a)), beta=float(np.exp(log_a / alpha)) if alpha else float("nan"),
        alpha_se=float(res.stderr), log_a_se=float(res.intercept_stderr),
        alpha_ci95_t=(alpha - t * res.stderr, alpha + t * res.stderr), alpha_ci95_bootstrap=(float(lo), float(hi)),
        r=float(res.rvalue), r2=float(res.rvalue**2), n=n, x_range=(float(x.min()), float(x.max())),
        residuals_log=resid.tolist(), holdout=held, aic=_aic(float(resid @ resid), n, 2))


def fit_power_law_floor(x: Any, y: Any, starts: int = 8, seed: int = 0) -> FloorFit:
    """Fits y = c + a·x^alpha (alpha < 0, c >= 0) with a soft-L1 loss on log residuals; the best of
    several starting points (floors between 0 and the smallest y; exponents from the pure fit's region)."""
    x, y = _check(x, y, 4)
    lx, ly = np.log(x), np.log(y)
    xs = x / np.exp(lx.mean())  # a well-scaled x so that a stays O(y)

    def residual(p: np.ndarray) -> np.ndarray:
        c, log_a, alpha = p
        return np.log(c + np.exp(log_a) * xs**alpha) - ly

    rng = np.random.default_rng(seed)
    pure_alpha, _ = _ols(lx, ly)
    best = None
    for k in range(starts):
        c0 = y.min() * (k / starts if k else 0.0)
        alpha0 = min(pure_alpha * (1 + rng.uniform(0, 3)), -1e-3) if k else min(pure_alpha, -1e-3)
        a0 = max(np.median(y) - c0, 1e-12 * y.max())
        try:
            sol = optimize.least_squares(residual, [c0, np.log(a0), alpha0], loss="soft_l1", f_scale=0.05,
                                         bounds=([0.0, -np.inf, _ALPHA_BOUND], [y.min(), np.inf, 0.0]))
        except ValueError:
            continue
        if best is None or sol.cost < best.cost:
            best = sol
    if best is None:
        raise ValueError("the floor fit failed from every starting point")
    c, log_a, alpha = best.x
    resid = residual(best.x)
    se_alpha = se_c = None
    dof = len(x) - 3
    if dof > 0:
        try:
            cov = np.linalg.inv(best.jac.T @ best.jac) * float(resid @ resid) / dof
            se_c, se_alpha = float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[2, 2]))
        except np.linalg.LinAlgError:
            pass
    a = float(np.exp(log_a) * np.exp(lx.mean()) ** (-alpha))  # back to the unscaled x
    return FloorFit(alpha=float(alpha), a=a, c=float(c), alpha_se=se_alpha, c_se=se_c, n=len(x),
                    residuals_log=resid.tolist(), aic=_aic(float(resid @ resid), len(x), 3), starts=starts)


def compare(pure: PowerLawFit, floor: FloorFit) -> dict[str, Any]:
    """AIC comparison: the model with the lower AIC is preferred (a difference below 2 is no evidence)."""
    delta = floor.aic - pure.aic
    preferred = "tie" if abs(delta) < 2 else ("power_law_with_floor" if delta < 0 else "power_law")
    return {"aic_power_law": pure.aic, "aic_with_floor": floor.aic, "delta_aic": delta, "preferred": preferred}


def _sig(value: float) -> str:
    """3 significant digits, without a trailing exponent for ordinary magnitudes."""
    return "nan" if not np.isfinite(value) else f"{value:.3g}"


def law_text(fit: PowerLawFit | FloorFit, x: str = "x", y: str = "y") -> str:
    """The fitted law as `y = a·x^b` or `y = c + a·x^b`, numbers to 3 significant digits."""
    power = f"{_sig(fit.a)}·{x}^{_sig(fit.alpha)}"
    return f"{y} = {_sig(fit.c)} + {power}" if isinstance(fit, FloorFit) else f"{y} = {power}"


def fit_warnings(pure: PowerLawFit, floor: FloorFit | None = None) -> list[str]:
    """Why a fit should not be read as a scaling law (empty if nothing is wrong)."""
    notes = []
    lo, hi = pure.alpha_ci95_t
    if abs(pure.alpha) < FLAT_EXPONENT:
        notes.append(f"the exponent {pure.alpha:.3g} is ~0: y does not change with x over this range")
    elif not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0 <= hi:
        notes.append(f"the exponent's 95% interval [{lo:.3g}, {hi:.3g}] includes 0: the data show no "
                     f"significant power law ({pure.n} points, r = {pure.r:.3f})")
    if floor is None:
        return notes
    term = floor.a * pure.x_range[0] ** floor.alpha  # the power term where it is largest (alpha <= 0)
    if abs(floor.alpha) < FLAT_EXPONENT:
        notes.append(f"the floor fit is degenerate: exponent {floor.alpha:.3g} ~0 makes a·x^alpha a constant, "
                     f"so y = c + a is a flat line; read the pure law instead")
    elif floor.alpha <= _ALPHA_BOUND + 1e-6:
        notes.append(f"the floor fit's exponent sits at its bound {_ALPHA_BOUND:g}: the data do not pin it")
    elif floor.c > 0 and term < 0.01 * floor.c:
        notes.append(f"the floor fit is degenerate: a·x^alpha stays below 1% of the floor c = {floor.c:.3g} over "
                     f"the data, so it is a flat line")
    if floor.alpha_se is None:
        notes.append(f"the floor fit has no standard errors ({floor.n} points for 3 parameters)")
    return notes
