"""Plots of records and fits (matplotlib, no display needed): pure functions that write a figure file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["plot_fit"]


def plot_fit(x: Any, y: Any, fit, floor=None, path: str | Path = "fit.png", xlabel: str = "x",
             ylabel: str = "y", title: str | None = None) -> Path:
    """Log-log scatter of (x, y) with the pure power-law fit, its 95% confidence band (t-based, in log space)
    and, if given, the fit with a floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    lx = np.log(x)
    grid = np.exp(np.linspace(lx.min() - 0.1, lx.max() + 0.1, 200))
    resid = np.asarray(fit.residuals_log)
    n = len(x)
    s = np.sqrt(resid @ resid / max(n - 2, 1))
    sxx = ((lx - lx.mean()) ** 2).sum()
    half = stats.t.ppf(0.975, max(n - 2, 1)) * s * np.sqrt(1 / n + (np.log(grid) - lx.mean()) ** 2 / sxx)
    pred = fit.predict(grid)
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.scatter(x, y, color="black", zorder=3, label="measured")
    ax.plot(grid, pred, label=f"y = ({fit.beta:.3g}·x)^{fit.alpha:.3f}  (r = {fit.r:.4f})")
    ax.fill_between(grid, pred * np.exp(-half), pred * np.exp(half), alpha=0.2, label="95% band")
    if floor is not None:
        ax.plot(grid, floor.predict(grid), "--", label=f"y = {floor.c:.3g} + {floor.a:.3g}·x^{floor.alpha:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
