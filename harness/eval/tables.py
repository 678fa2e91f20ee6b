"""Paper-style tables of records: pure functions of records, no device work.

One table per record kind (speed: a row per cell and batch size; quality: a row per cell, with its
consistency against the baseline beside it), headers with ↑/↓ from the metrics registry, values as
`p50 ± IQR` or `value [95% interval]`, and a provenance footer naming every git sha, device, torch version,
weights and extractor behind the numbers. CSV export gives the raw numbers, one column per metric.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tabulate import tabulate

from .metrics import metrics_for

__all__ = ["results_table", "latest"]


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each (kind, config hash): a rerun's numbers replace an earlier run's."""
    keep: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in records:
        keep[(r.get("kind"), r.get("config_hash"), r.get("id") if r.get("config_hash") is None else None)] = r
    return list(keep.values())


def _label(r: dict[str, Any]) -> dict[str, Any]:
    cell = r.get("cell", {})
    row = {"variant": cell.get("variant", "?"), "KV policy": cell.get("kv_policy", "full")}
    for key, value in (cell.get("sweep") or {}).items():
        row[key] = value
    return row


def _columns(records: list[dict[str, Any]], kind: str) -> list:
    return [s for s in metrics_for(kind) if any(s(r["metrics"])[0] is not None for r in records)]


def _speed_rows(records: list[dict[str, Any]], raw: bool) -> list[dict[str, Any]]:
    speed = [r for r in records if r.get("kind") == "speed"]
    cols = _columns(speed, "speed")
    rows = []
    for r in speed:
        m = r["metrics"]
        row = {**_label(r), "batch": m.get("batch_size", r.get("batch_size")), "precision": m.get("precision")}
        for s in cols:
            row[s.name if raw else s.header] = s(m)[0] if raw else s.format(m)
        rows.append(row)
    return rows


def _quality_rows(records: list[dict[str, Any]], raw: bool) -> list[dict[str, Any]]:
    quality = [r for r in records if r.get("kind") == "quality"]
    consistency = {r["label"]: r for r in records if r.get("kind") == "consistency" and "label" in r}
    cols = _columns(quality, "quality") + _columns(list(consistency.values()), "consistency")
    rows = []
    for r in quality:
        both = {**r["metrics"], **consistency.get(r.get("label"), {}).get("metrics", {})}
        row = {**_label(r), "samples": r.get("num_samples", r["metrics"].get("num_samples"))}
        for s in cols:
            row[s.name if raw else s.header] = s(both)[0] if raw else s.format(both)
        rows.append(row)
    return rows


def _footer(records: list[dict[str, Any]]) -> list[str]:
    def distinct(get) -> str:
        values = sorted({str(v) for r in records if (v := get(r)) is not None})
        return ", ".join(values) if values else "n/a"

    env = lambda key: (lambda r: r.get("env", {}).get(key))  # noqa: E731
    sha = lambda r: (r.get("env", {}).get("git_sha") or "unknown") + (  # noqa: E731
        " (dirty)" if r.get("env", {}).get("git_dirty") else "")
    lines = [f"git: {distinct(sha)}", f"device: {distinct(env('device_name'))}",
             f"torch: {distinct(env('torch'))}", f"weights: {distinct(lambda r: r.get('weights'))}"]
    quality = [r for r in records if r.get("kind") == "quality"]
    if quality:
        lines.append("extractor: " + distinct(lambda r: r.get("quality", {}).get("extractor")))
        lines.append("reference: " + distinct(lambda r: r.get("quality", {}).get("reference")))
    if any(r.get("env", {}).get("git_dirty") for r in records):
        lines.append("(dirty): measured with uncommitted changes")
    return lines


def results_table(records: Iterable[dict[str, Any]], fmt: str = "md") -> str:
    """The speed and quality tables of `records`, with a provenance footer ("md") or as CSV ("csv")."""
    records = latest(records)
    if fmt not in ("md", "csv"):
        raise ValueError(f"unknown table format {fmt!r}; valid: md, csv")
    speed, quality = _speed_rows(records, fmt == "csv"), _quality_rows(records, fmt == "csv")
    if fmt == "csv":
        import pandas as pd

        frames = [pd.DataFrame(rows).assign(table=name) for name, rows in (("speed", speed), ("quality", quality))
                  if rows]
        return pd.concat(frames, ignore_index=True).convert_dtypes().to_csv(index=False) if frames else ""
    parts = []
    if speed:
        parts.append("Speed (p50 ± IQR over repeats; warm-up excluded)\n\n" + tabulate(speed, headers="keys",
                                                                                         tablefmt="github"))
    if quality:
        parts.append("Quality ([95% bootstrap interval]; consistency against the baseline on the same seeds)\n\n"
                     + tabulate(quality, headers="keys", tablefmt="github"))
    if not parts:
        return "(no speed or quality records)"
    return "\n\n".join(parts) + "\n\n" + "\n".join(f"- {line}" for line in _footer(records))

