"""Paper-style tables of records: pure functions of records, no device work.

One table per record kind (speed: a row per cell and batch size; quality: a row per cell, with its
consistency against the baseline beside it), headers with ↑/↓ from the metrics registry, values as
`p50 ± IQR` or `value [95% interval]`, and a provenance footer naming every git sha, device, torch version,
weights and extractor behind the numbers. CSV export gives the raw numbers, one column per metric.

Every row carries the model's `params` (quality rows take it from their cell's speed record) and a speed row's
engine precision is `dtype`, so that it never shares a CSV column with the quality metric `precision`. Quality
rows name the `reference` they were scored against: two rows against different references never look alike.
`cell_rows` joins the speed (largest batch), quality and consistency records of each cell into one row of
numbers, which is what `varbench fit` fits when no single record holds both of its columns.

A quality record with `real_data` (held-out real images scored like a cell, harness/run/reference.py) is the
table's last row, "real data (held-out)": what the metrics read for data itself. The footer names what anyone
can check: commits, the extractor with its feature scale, references by file name and statistics hash (never
the machine's cache paths); records measured with uncommitted changes say so in words.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any

from tabulate import tabulate

from .metrics import metrics_for

__all__ = ["results_table", "latest", "cell_rows", "cell_key", "speed_rank", "REAL_ROW", "OLD_SCALE",
           "SPEEDUP_COLUMNS"]

REAL_ROW = "real data (held-out)"  # as harness/run/reference.py names the row (eval cannot import run)
OLD_SCALE = "raw (a record older than the feature scale)"  # quality records that do not name theirs


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each (kind, config hash): a rerun's numbers replace an earlier run's."""
    keep: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in records:
        keep[(r.get("kind"), r.get("config_hash"), r.get("id") if r.get("config_hash") is None else None)] = r
    return list(keep.values())


def _label(r: dict[str, Any]) -> dict[str, Any]:
    cell = r.get("cell", {})
    row = {"variant": cell.get("variant", "?"), "KV policy": cell.get("kv_policy", "full"),
           "acceleration": cell.get("acceleration", "none")}
    for key, value in (cell.get("sweep") or {}).items():
        row[key] = value
    return row


def engine_text(engine: dict[str, Any] | None) -> str:
    """The engine features a speed record ran with, short: `reference` (the plain loop: every feature off),
    `engine`, or `engine+compile` / `engine+cuda graphs`; a partial engine names what is off."""
    if not engine:
        return "n/a"
    flags = {k: v for k, v in engine.items() if isinstance(v, bool)}
    extras = ("compile", "cuda_graphs")
    if not any(flags.values()):
        return "reference"
    off = [k for k, v in flags.items() if not v and k not in extras]
    text = "engine" + "".join(f"+{k.replace('_', ' ')}" for k in extras if flags.get(k))
    return text + (f" (no {', '.join(k.replace('_', ' ') for k in off)})" if off else "")


def cell_key(r: dict[str, Any]) -> str:
    """What identifies a record's cell across its speed, quality and consistency records."""
    cell = r.get("cell")
    return json.dumps(cell, sort_keys=True, default=str) if cell else str(r.get("label"))


def _cell_label(r: dict[str, Any]) -> str:
    if r.get("label"):
        return str(r["label"])
    cell = r.get("cell", {})
    return f"{cell.get('variant', '?')} {cell.get('kv_policy', 'full')}"


def _speed_by_cell(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each cell's speed record at its largest batch (the one a frontier or a scaling fit reads)."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") != "speed":
            continue
        key = cell_key(r)
        if key not in best or speed_rank(r) >= speed_rank(best[key]):
            best[key] = r
    return best


def speed_rank(r: dict[str, Any]) -> tuple[int, bool]:
    """Which of a cell's speed records stands for it: the largest batch, then the engine over the reference
    mode (a study with speed.reference times each cell both ways)."""
    return r.get("metrics", {}).get("batch_size") or 0, engine_text(r.get("engine")) != "reference"


def _reference_names(quality: list[dict[str, Any]]) -> dict[str, str]:
    """A short name per reference (its file name), with its statistics' hash where two share a name."""
    refs = {str(q.get("reference")): q.get("reference_stats_sha") for r in quality
            if (q := r.get("quality", {})).get("reference") is not None}
    names = {ref: PurePath(ref).name or ref for ref in refs}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {ref: f"{name} ({(refs[ref] or '?')[:8]})" if name in clash else name for ref, name in names.items()}


def _columns(records: list[dict[str, Any]], kind: str) -> list:
    return [s for s in metrics_for(kind) if any(s(r["metrics"])[0] is not None for r in records)]


def _speed_rows(records: list[dict[str, Any]], raw: bool) -> list[dict[str, Any]]:
    speed = [r for r in records if r.get("kind") == "speed"]
    cols = _columns(speed, "speed")
    ratios = _speedups(speed)
    rows = []
    for r in speed:
        m = r["metrics"]
        row = {**_label(r), "engine": engine_text(r.get("engine")), "batch": m.get("batch_size", r.get("batch_size")),
               "dtype": m.get("precision"), "params": m.get("params")}
        for s in cols:
            row[s.name if raw else s.header] = s(m)[0] if raw else s.format(m)
        if ratios:
            for name, value in zip(SPEEDUP_COLUMNS, ratios.get(id(r), (None, None))):
                row[name] = value if raw or value is None else f"{value:.2f}×"
        rows.append(row)
    return rows


SPEEDUP_COLUMNS = ("speedup ↑", "speedup w/o VAE ↑")


def _speedups(speed: list[dict[str, Any]]) -> dict[int, tuple[float | None, float | None]]:
    """Each speed record's images/s over its study's baseline cell's (the record's `baseline` label), at the same
    engine, batch and device: with the VAE decode and without. {} when no record names a baseline, or the
    baseline is the only cell (a speedup of 1 says nothing)."""
    def where(r: dict[str, Any], label: Any) -> tuple:
        return label, engine_text(r.get("engine")), r["metrics"].get("batch_size"), r.get("device")

    by_cell = {where(r, r.get("label")): r["metrics"] for r in speed}
    named = [r for r in speed if r.get("baseline") is not None]
    if not named or len({r.get("label") for r in speed}) < 2:
        return {}
    out = {}
    for r in named:
        base, m = by_cell.get(where(r, r["baseline"])), r["metrics"]
        out[id(r)] = tuple(m[k] / base[k] if base and m.get(k) and base.get(k) else None
                           for k in ("images_per_s", "images_per_s_without_vae"))
    return out


def _quality_rows(records: list[dict[str, Any]], raw: bool) -> list[dict[str, Any]]:
    quality = [r for r in records if r.get("kind") == "quality"]
    consistency = {r["label"]: r for r in records if r.get("kind") == "consistency" and "label" in r}
    cols = _columns(quality, "quality") + _columns(list(consistency.values()), "consistency")
    speed = _speed_by_cell(records)
    references = _reference_names(quality)
    rows = []
    for r in sorted(quality, key=lambda r: bool(r.get("real_data"))):  # stable: the real-data row last
        both = {**r["metrics"], **consistency.get(r.get("label"), {}).get("metrics", {})}
        reference = r.get("quality", {}).get("reference")
        params = (None if raw else "-") if r.get("real_data") else speed.get(cell_key(r), {}).get("metrics", {}).get("params")
        row = {**_label(r), "params": params,
               "reference": references.get(str(reference), "n/a") if reference is not None else "n/a",
               "samples": r.get("num_samples", r["metrics"].get("num_samples"))}
        for s in cols:
            row[s.name if raw else s.header] = s(both)[0] if raw else s.format(both)
        rows.append(row)
    return rows


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def cell_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell: `cell` (its label), `variant`, `kv_policy`, its sweep values, and every scalar metric of
    its speed (largest batch), quality and consistency records as `speed.<key>`, `quality.<key>` and
    `consistency.<key>`, also as plain `<key>` where only one kind has that key (speed's `precision` is `dtype`).
    The real-data row is left out: it is no cell.
    """
    records = latest(r for r in records if isinstance(r, dict))
    speed = _speed_by_cell(records)
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        kind, key = r.get("kind"), cell_key(r)
        if kind not in ("speed", "quality", "consistency") or (kind == "speed" and speed.get(key) is not r):
            continue
        if r.get("real_data"):  # data, not a model: no row to fit or plot
            continue
        cell = r.get("cell", {})
        row = rows.setdefault(key, {"cell": _cell_label(r), "variant": cell.get("variant"),
                                    "kv_policy": cell.get("kv_policy", "full"), **(cell.get("sweep") or {}),
                                    "_kinds": {}})
        metrics = _scalars(r.get("metrics", {}))
        if kind == "speed" and "precision" in metrics:
            metrics["dtype"] = metrics.pop("precision")
        row["_kinds"][kind] = metrics
    return [_flatten_kinds(row) for row in rows.values()]


def _flatten_kinds(row: dict[str, Any]) -> dict[str, Any]:
    kinds: dict[str, dict[str, Any]] = row.pop("_kinds")
    owners: dict[str, list[str]] = {}
    for kind, metrics in kinds.items():
        for k, v in metrics.items():
            row[f"{kind}.{k}"] = v
            owners.setdefault(k, []).append(kind)
    for k, who in owners.items():
        if len(who) == 1 and k not in row:
            row[k] = kinds[who[0]][k]
    return row


def _footer(records: list[dict[str, Any]]) -> list[str]:
    def distinct(get, among: list[dict[str, Any]] = records) -> str:
        values = sorted({str(v) for r in among if (v := get(r)) is not None})
        return ", ".join(values) if values else "n/a"

    env = lambda key: (lambda r: r.get("env", {}).get(key))  # noqa: E731
    lines = [f"git: {distinct(_code)}", f"device: {distinct(env('device_name'))}",
             f"torch: {distinct(env('torch'))}", f"weights: {distinct(lambda r: r.get('weights'))}"]
    quality = [r for r in records if r.get("kind") == "quality"]
    if quality:
        names = _reference_names(quality)
        qual = lambda key: (lambda r: r.get("quality", {}).get(key))  # noqa: E731
        lines.append("extractor: " + distinct(qual("extractor")))
        lines.append("feature scale: " + distinct(lambda r: r.get("quality", {}).get("feature_scale", OLD_SCALE),
                                                  quality))
        lines.append("reference: " + distinct(lambda r: _reference_text(r, names)))
        lines += [f"{REAL_ROW}: {held}" for held in sorted({str(q["quality"]["heldout"]) for q in quality
                                                            if q.get("real_data") and q.get("quality")})]
    return lines


def _code(r: dict[str, Any]) -> str | None:
    e = r.get("env", {})
    sha = e.get("git_sha") or (f"none (varbench {e['varbench']})" if e.get("varbench") else None)
    return None if sha is None else sha + (" with uncommitted changes" if e.get("git_dirty") else "")


def _reference_text(r: dict[str, Any], names: dict[str, str]) -> str | None:
    q = r.get("quality", {})
    if q.get("reference") is None:
        return None
    sha = q.get("reference_stats_sha")
    return names.get(str(q["reference"]), str(q["reference"])) + (f" (statistics {sha[:12]})" if sha else "")


def results_table(records: Iterable[dict[str, Any]], fmt: str = "md") -> str:
    """The speed and quality tables of `records`, with a provenance footer ("md") or as CSV ("csv")."""
    records = latest(records)
    if fmt not in ("md", "csv"):
        raise ValueError(f"unknown table format {fmt!r}; valid: md, csv")
    speed, quality = _speed_rows(records, fmt == "csv"), _quality_rows(records, fmt == "csv")
    if all(row["acceleration"] == "none" for row in speed + quality):  # a study without the axis: no column
        speed, quality = ([{k: v for k, v in row.items() if k != "acceleration"} for row in rows]
                          for rows in (speed, quality))
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

