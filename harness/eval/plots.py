"""Plots of records and fits (matplotlib, no display needed): pure functions that write a figure file.

Legends write a law as `y = a·x^b (+ c)` with 3 significant digits (`fits.law_text`), never as (β·x)^α,
whose β = a^(1/α) is unreadable (4.82e-158) for a small exponent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from .fits import law_text
from .tables import speed_rank

__all__ = ["plot_fit", "fit_legend", "pareto_front", "frontier_rows"]


def fit_legend(fit, floor=None) -> list[str]:
    """The legend entries of `plot_fit`'s lines: the pure law with its r, then the law with a floor."""
    return [f"{law_text(fit)}  (r = {fit.r:.3f})"] + ([law_text(floor)] if floor is not None else [])


def plot_fit(x: Any, y: Any, fit, floor=None, path: str | Path = "fit.png", xlabel: str = "x",
             ylabel: str = "y", title: str | None = None) -> Path:
    """Log-log scatter of (x, y) with the pure power-law fit, its 95% confidence band (t-based, in log space)
    and, if given, the fit with a floor."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (a notebook's inline) alone

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    lx = np.log(x)
    grid = np.exp(np.linspace(lx.min() - 0.1, lx.max() + 0.1, 200))
    resid = np.asarray(fit.residuals_log)
    n = len(x)
    s = np.sqrt(resid @ resid / max(n - 2, 1))
    sxx = ((lx - lx.mean()) ** 2).sum()
    half = stats.t.ppf(0.975, max(n - 2, 1)) * s * np.sqrt(1 / n + (np.log(grid) - lx.mean()) ** 2 / sxx)
    pred = fit.predict(grid)
    fig = Figure(figsize=(5, 3.6), dpi=120)
    ax = fig.subplots()
    ax.scatter(x, y, color="black", zorder=3, label="measured")
    labels = fit_legend(fit, floor)
    ax.plot(grid, pred, label=labels[0])
    ax.fill_between(grid, pred * np.exp(-half), pred * np.exp(half), alpha=0.2, label="95% band")
    if floor is not None:
        ax.plot(grid, floor.predict(grid), "--", label=labels[1])
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
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x higher is better, y lower is better),
    sorted by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def frontier_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell label joining its speed (largest batch; the engine over the reference mode) and quality
    records: what a frontier plots."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        label, m = r.get("label"), r.get("metrics", {})
        if label is None or r.get("real_data"):  # the real-data row is a yardstick, not a cell on the front
            continue
        row = rows.setdefault(label, {"cell": label})
        if r.get("kind") == "speed" and speed_rank(r) >= row.get("_rank", (0, False)):
            row.update(_rank=speed_rank(r), batch_size=m.get("batch_size"), images_per_s=m.get("images_per_s"),
                       peak_memory_bytes=m.get("peak_memory_bytes"), kv_bytes=m.get("kv_bytes"),
                       params=m.get("params"))
        elif r.get("kind") == "quality":
            row.update(fid=m.get("fid"), fid_ci95=m.get("fid_ci95"))
        elif r.get("kind") == "consistency":
            row.update(psnr_db=m.get("psnr_db"), ssim=m.get("ssim"))
    return [{k: v for k, v in row.items() if k != "_rank"} for row in rows.values()]
