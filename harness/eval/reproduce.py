"""Published tables of the VAR literature as data (results/published/), and the library side of `varbench reproduce`.

Every value carries a source (paper, arXiv id, table, hardware, batch size, precision, evaluator) and a tag: code,
paper, README, note or memory (the provenance legend of shared/docs/VARIANTS.md). `reproduce` shows each value with
its tag, speed and memory also divided by the table's baseline row (so different GPUs compare), and our numbers from
varbench records beside them. A record fills the rows whose variant, KV policy, named args and sweep values it has
(`sample.*` sweep keys and `quality_study` bind quality/consistency records only) and that name the most of them;
a row's `acceleration` (default "none") must equal the record's cell's, and its `accel_args` count like variant_args.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from tabulate import tabulate

from .columns import COLUMNS as METRICS
from .columns import Column as Metric

__all__ = ["TAGS", "METRICS", "Metric", "published_dir", "list_tables", "load_table", "reproduce",
           "tables_overview"]

TAGS = ("code", "paper", "README", "note", "memory")
_KINDS = ("speed", "quality", "consistency")
Records = dict[str, dict[str, Any]]  # record kind -> the record matched to a row

_MEASURE_KEYS = {"variant", "kv_policy", "variant_args", "kv_args", "sweep", "quality_study", "acceleration",
                 "accel_args"}

# --- the published data ----------------------------------------------------------------------------------------
def published_dir() -> Path:
    """The published tables: $VARBENCH_PUBLISHED, else results/published as installed with the package
    (`varbench.published`, so a non-editable install has them too)."""
    env = os.environ.get("VARBENCH_PUBLISHED")
    if env:
        return Path(env)
    from importlib.util import find_spec

    spec = find_spec("varbench.published")  # a data-only namespace package: its folder is the location
    locations = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    found = next((p for p in locations if (p / "index.toml").is_file()), None)
    return found or Path(__file__).resolve().parent.parent / "results" / "published"


def _index() -> dict[str, Any]:
    path = published_dir() / "index.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no published tables at {path} (set VARBENCH_PUBLISHED to results/published)")
    return tomllib.loads(path.read_text())


def _spec(table_id: str) -> dict[str, Any]:
    """The table's TOML, validated, with its index entry under "entry" and the tag legend under "tags"."""
    index = _index()
    entries = {t["id"]: t for t in index["tables"]}
    if table_id not in entries:
        close = difflib.get_close_matches(table_id, list(entries), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown published table {table_id!r}.{hint} Valid tables: {', '.join(entries)}")
    path = published_dir() / entries[table_id]["file"]
    spec = {"groups": [{"name": ""}], **tomllib.loads(path.read_text()), "entry": entries[table_id],
            "tags": index["tags"]}
    _validate(spec, path.name)
    return spec


def _values(row: dict[str, Any]) -> Iterator[tuple[str, Any, str, str, str | None]]:
    """(metric, value, tag, source, note) of each published value of a row; row-level tag/source are defaults."""
    for metric, raw in row.get("values", {}).items():
        v = raw if isinstance(raw, dict) else {"value": raw}
        yield metric, v.get("value"), v.get("tag", row.get("tag")), v.get("source", row.get("source")), v.get("note")


def _validate(spec: dict[str, Any], name: str) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"results/published/{name}: {msg}")

    if spec.get("id") != spec["entry"]["id"]:
        fail(f"id {spec.get('id')!r} differs from index.toml's {spec['entry']['id']!r}")
    rows, groups = spec.get("rows", []), [g["name"] for g in spec["groups"]]
    keys = [r.get("key") for r in rows]
    if None in keys or len(set(keys)) != len(keys):
        fail("every row needs a unique key")
    named = [m for g in spec["groups"] for m in g.get("metrics", [])] + list(spec.get("format", {}))
    named += [m for r in rows for m in r.get("values", {})]
    if unknown := [m for m in named if m not in METRICS]:
        close = difflib.get_close_matches(unknown[0], list(METRICS), n=1)
        fail(f"unknown metric {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if bad := [b for b in [spec.get("baseline")] + [g.get("baseline") for g in spec["groups"]] if b and b not in keys]:
        fail(f"baseline {bad[0]!r} is not a row key")
    for row in rows:
        where = f"row {row['key']!r}"
        if row.get("group", "") not in groups:
            fail(f"{where}: group {row.get('group')!r} is not declared; groups: {groups}")
        if ("measure" in row) == ("unsupported" in row):
            fail(f"{where}: give exactly one of `measure` (how varbench measures it) or `unsupported` (why not)")
        if (m := row.get("measure")) and (not isinstance(m.get("variant"), str) or set(m) - _MEASURE_KEYS):
            fail(f"{where}: measure needs a variant and only keys {sorted(_MEASURE_KEYS)}")
        for metric, value, tag, source, _ in _values(row):
            raw = row["values"][metric]
            shape = isinstance(value, (int, float, str)) and not set(raw if isinstance(raw, dict) else {}) - {
                "value", "tag", "source", "note"}
            for ok, problem in ((shape, "a value is a number, a text, or {value, tag, source, note}"),
                                (tag in TAGS, f"tag {tag!r} is not one of {TAGS}"),
                                (source in spec.get("sources", {}), f"source {source!r} is not in [sources]")):
                if not ok:
                    fail(f"{where}.{metric}: {problem}")


def _cite(spec: dict[str, Any]) -> str:
    by_paper: dict[str, list[str]] = {}
    for s in spec.get("sources", {}).values():
        by_paper.setdefault(f"arXiv {s['arxiv']}" if s.get("arxiv") else s["title"], []).append(s.get("table", ""))
    return "; ".join(f"{paper} ({', '.join(dict.fromkeys(t for t in tables if t))})"
                     for paper, tables in by_paper.items())


def list_tables() -> list[dict[str, Any]]:
    """Every published table: id, title, source, rows (count), baseline (row key), study (file), supported."""
    return [{"id": e["id"], "title": spec["title"], "source": _cite(spec), "rows": len(spec["rows"]),
             "baseline": spec.get("baseline"), "study": e.get("study"), "supported": spec.get("supported", True)}
            for e in _index()["tables"] if (spec := _spec(e["id"]))]


def tables_overview() -> str:
    """`varbench reproduce --list`: the published tables as a github-format table."""
    keys = ("id", "rows", "baseline", "study", "supported", "title")
    return tabulate([[t[k] for k in keys] for t in list_tables()], headers=keys, tablefmt="github", missingval="-")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _setup(spec: dict[str, Any], row: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    src = spec["sources"].get(source or row.get("source"), {})
    return {**{k: src.get(k) for k in ("hardware", "batch_size", "precision", "evaluator", "num_samples")},
            **row.get("setup", {})}


def _baseline(spec: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    group = next(g for g in spec["groups"] if g["name"] == row.get("group", ""))
    return {r["key"]: r for r in spec["rows"]}.get(group.get("baseline") or spec.get("baseline"))


def load_table(table_id: str, layout: Literal["long", "wide"] = "long") -> pd.DataFrame:
    """A published table. "long": one row per value with its tag and source (title, arXiv id, table, hardware,
    batch size, precision, evaluator) and the varbench cell that measures it; "wide": one row per table row,
    one column per metric (values only). An unknown id raises KeyError naming the closest and the valid ids."""
    spec, out = _spec(table_id), []
    for row in spec["rows"]:
        m = row.get("measure", {})
        for metric, value, tag, source, note in _values(row):
            src = spec["sources"][source]
            out.append({"table": table_id, "group": row.get("group", ""), "row": row["key"], "label": row["label"],
                        "metric": metric, "value": value, "number": _number(value), "unit": METRICS[metric].unit,
                        "tag": tag, "source": source, "source_title": src.get("title"), "arxiv": src.get("arxiv"),
                        "source_table": src.get("table"), **_setup(spec, row, source), "note": note,
                        "variant": m.get("variant"), "kv_policy": m.get("kv_policy", "full") if m else None,
                        "variant_args": m.get("variant_args", {}), "kv_args": m.get("kv_args", {}),
                        "acceleration": m.get("acceleration", "none") if m else None,
                        "accel_args": m.get("accel_args", {}), "unsupported": row.get("unsupported")})
    long = pd.DataFrame(out)
    if layout != "wide":
        return long
    meta = pd.DataFrame([{"row": r["key"], "group": r.get("group", ""), "label": r["label"]} for r in spec["rows"]])
    wide = long.pivot(index="row", columns="metric", values="value")[list(dict.fromkeys(long["metric"]))]
    return meta.set_index("row").join(wide)


# --- matching records to rows ----------------------------------------------------------------------------------
def _specificity(measure: dict[str, Any], rec: dict[str, Any]) -> int | None:
    """How many of the row's constraints the record meets, or None if it fails one."""
    cell, policy = rec.get("cell") or {}, measure.get("kv_policy", "full")
    accel = measure.get("acceleration", "none")
    if cell.get("variant") != measure["variant"] or cell.get("kv_policy", "full") != policy:
        return None
    if cell.get("acceleration", "none") != accel:  # a plain row never takes an accelerated cell's record
        return None
    sampled, sweep, n = rec.get("kind") in ("quality", "consistency"), cell.get("sweep") or {}, 0
    if sampled and "quality_study" in measure and rec.get("study") not in measure["quality_study"]:
        return None
    for section, name in (("variant_args", measure["variant"]), ("kv_args", policy), ("accel_args", accel)):
        have = {**{k[len(f"{section}.{name}."):]: v for k, v in sweep.items() if k.startswith(f"{section}.{name}.")},
                **(cell.get(section) or {})}  # a swept arg ("variant_args.NAME.key") counts as an arg
        for key, value in measure.get(section, {}).items():
            if key not in have or have[key] != value:
                return None
            n += 1
    for key, value in measure.get("sweep", {}).items():
        if key.startswith("sample.") and not sampled:
            continue  # sampling settings do not change speed or memory
        if key not in sweep or sweep[key] != value:
            return None
        n += 1
    return n


def _batch(rec: dict[str, Any]) -> int:
    return int(rec.get("batch_size") or rec.get("metrics", {}).get("batch_size") or 0)


def _match(spec: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Records]:
    """Row key -> {kind: the record shown for it}."""
    found: dict[str, dict[str, list[dict[str, Any]]]] = {r["key"]: {} for r in spec["rows"]}
    for rec in (r for r in records if r.get("kind") in _KINDS):
        scored = [(s, r["key"]) for r in spec["rows"] if "measure" in r
                  and (s := _specificity(r["measure"], rec)) is not None]
        for s, key in scored:
            if s == max(score for score, _ in scored):
                found[key].setdefault(rec["kind"], []).append(rec)
    out = {}
    for row in spec["rows"]:
        want = _paper_setup(spec, row)["batch_size"]
        out[row["key"]] = {kind: ([r for r in recs if _batch(r) == want] or sorted(recs, key=_batch))[-1]
                           if kind == "speed" else recs[-1] for kind, recs in found[row["key"]].items()}
    return out


def _missing_weights(needs: list[str]) -> list[str]:
    """The checkpoint files of `needs` (names in OFFICIAL_FILES or hf:OWNER/REPO/FILE) not on this machine."""
    from varbench.harness.core.checkpoints import OFFICIAL_FILES, resolve_source

    def here(source: str) -> bool:
        try:
            return bool(resolve_source(source, allow_download=False))
        except Exception:  # CheckpointError, or huggingface_hub missing or unusable: either way not here
            return False
    return [Path(OFFICIAL_FILES.get(source, source)).name for source in needs if not here(source)]


# --- our numbers -----------------------------------------------------------------------------------------------
def _paper_setup(spec: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The row's setup; batch size and precision default to its baseline row's (the speed it is compared with)."""
    setup, base = _setup(spec, row), _baseline(spec, row)
    base_setup = _setup(spec, base) if base else {}
    return {**setup, **{k: base_setup.get(k) for k in ("batch_size", "precision") if setup[k] is None}}


def _read(metric: Metric, recs: Records, no_vae: bool) -> float | None:
    if metric.ours is None:
        return None
    kind, key = metric.ours.split(".", 1)
    m = (recs.get(kind) or {}).get("metrics", {})
    ips = m.get("images_per_s_without_vae" if no_vae else "images_per_s")
    if key in ("throughput", "seconds_per_image"):
        return ips if key == "throughput" or not ips else 1.0 / ips
    if key == "latency_ms_p50" and no_vae:  # the papers' latency is per batch
        return m["batch_size"] / ips if ips and m.get("batch_size") else None
    value = m
    for part in key.split("."):  # "accel_report.network_evals": a nested record key
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else float(value) * metric.scale


def _ours(metric: Metric, recs: Records, base_recs: Records, no_vae: bool) -> float | None:
    value = _read(metric, recs, no_vae)
    if metric.relative is None or value is None:
        return value
    same_batch = _batch(recs.get("speed") or {}) == _batch(base_recs.get("speed") or {})  # else not comparable
    base = _read(metric, base_recs, no_vae) if same_batch else None
    if not base or not value:
        return None
    return {"time": value / base, "speedup": base / value, "saving": 100.0 * (1.0 - value / base)}[metric.relative]


def _annotate(spec: dict[str, Any], row: dict[str, Any], recs: Records, name: str) -> str:
    """" (b16, bf16)" / " (n=5000)" where our record's batch, precision or sample count differs from the paper's."""
    want, kind, notes = _paper_setup(spec, row), (METRICS[name].ours or ".").split(".")[0], []
    if kind == "quality" and (rec := recs.get("quality")):
        n = rec.get("num_samples") or rec.get("metrics", {}).get("num_samples")
        notes += [f"n={n}"] if want["num_samples"] and n and n != want["num_samples"] else []
    elif kind == "speed" and (rec := recs.get("speed")):
        precision = rec.get("precision") or rec.get("metrics", {}).get("precision")
        notes += [f"b{_batch(rec)}"] if want["batch_size"] and _batch(rec) != want["batch_size"] else []
        notes += [str(precision)] if want["precision"] in ("fp16", "bf16", "fp32") and precision not in (
            None, want["precision"]) else []
    return f" ({', '.join(notes)})" if notes else ""


# --- rendering -------------------------------------------------------------------------------------------------
def _describe(row: dict[str, Any]) -> str:
    """The varbench cell that measures a row."""
    m = row["measure"]
    parts = [m["variant"]] + ([f"kv={m['kv_policy']}"] if m.get("kv_policy", "full") != "full" else [])
    parts += [f"accel={m['acceleration']}"] if m.get("acceleration", "none") != "none" else []
    parts += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for section in (
        "variant_args", "kv_args", "accel_args", "sweep") for k, v in m.get(section, {}).items()]
    return " ".join(parts) + (f" (quality: {'/'.join(m['quality_study'])})" if "quality_study" in m else "")


def _group_table(spec: dict[str, Any], group: dict[str, Any], matched: dict[str, Records] | None,
                 check_weights: bool) -> str | None:
    rows = [r for r in spec["rows"] if r.get("group", "") == group["name"]]
    if not rows:
        return None
    base, no_vae, measured = _baseline(spec, rows[0]), spec.get("speed_excludes_vae", False), matched is not None
    names = dict.fromkeys([m for r in rows for m in r.get("values", {})]
                          + (group.get("metrics", []) if measured else []))
    base_recs = (matched or {}).get(base["key"], {}) if base else {}
    body = []
    for row in rows:
        recs, tags = (matched or {}).get(row["key"], {}), {m: (v, t) for m, v, t, _, _ in _values(row)}
        cell = "-" if measured and "unsupported" in row else row.get("unsupported") or _describe(row)
        line = {"row": row["label"], "varbench cell": cell}
        for name in names:
            metric, (value, tag) = METRICS[name], tags.get(name, (None, None))
            fmt = row.get("format", {}).get(name, spec.get("format", {}).get(name, metric.fmt))
            head, ours = (f"{metric.label} ({metric.unit})" if metric.unit else metric.label), None
            line[head] = "" if value is None else f"{_fmt(value, fmt)} [{tag}]"
            if measured and metric.ours:
                ours = _ours(metric, recs, base_recs, no_vae)
                line[f"{head} ours"] = "" if ours is None else _fmt(ours, fmt) + _annotate(spec, row, recs, name)
            if metric.ratio and base is not None:
                b, v = _number(dict((m, x) for m, x, *_ in _values(base)).get(name)), _number(value)
                line[f"{metric.label} / base"] = f"{v / b:.2f}" if v is not None and b else ""
                if measured and metric.ours:
                    ratio = _ours(replace(metric, relative="time"), recs, base_recs, no_vae)
                    line[f"{metric.label} / base ours"] = "" if ratio is None else f"{ratio:.2f}"
        if measured:  # what we have, else why not: unsupported, checkpoints missing (looked up locally)
            status = "measured: " + ", ".join(k for k in _KINDS if k in recs) if recs else "not measured"
            missing = [] if recs or not check_weights else _missing_weights(row.get("needs", []))
            line["measured"] = row.get("unsupported") or (f"needs {', '.join(missing)}" if missing else status)
        body.append(line)
    columns = [c for c in body[0] if c in ("row", "varbench cell", "measured") or any(line[c] for line in body)]
    about = "; ".join(([f"baseline: {base['label']}"] if base else []) + ([group["note"]] if group.get("note") else []))
    table = tabulate([[line[c] for c in columns] for line in body], headers=columns, tablefmt="github",
                     disable_numparse=True)
    return "\n\n".join(x for x in (f"### {group['name']}" if group["name"] else "", about, table) if x)


def _fmt(value: Any, fmt: str) -> str:
    return format(value, fmt or ".2f") if _number(value) is not None else str(value)


def reproduce(table_id: str, measured_records: list[dict[str, Any]] | None = None, *,
              check_weights: bool = True) -> str:
    """A published table as text (github tables): each value with its tag, speed and memory also divided by the
    group's baseline row, and, given varbench records (`load_records` of a run), ours beside them, with a "measured"
    column saying why a row has none (unsupported model; checkpoints missing, unless `check_weights` is False)."""
    spec = _spec(table_id)
    matched = _match(spec, list(measured_records)) if measured_records is not None else None
    parts = [f"## {spec['title']}", f"table `{table_id}`; source: {_cite(spec)}"]
    if not spec.get("supported", True):
        parts.append("**model family not supported by varbench: the published numbers only**")
    parts += [t for g in spec["groups"] if (t := _group_table(spec, g, matched, check_weights))]
    lines = ["/ base: divided by the group's baseline row, so speed and memory compare across GPUs"] * any(
        METRICS[m].ratio for r in spec["rows"] for m in r.get("values", {}))
    if spec.get("speed_excludes_vae"):
        lines.append("the published speed excludes the VAE decode; ours is images_per_s_without_vae")
    lines += [f"[{tag}] {spec['tags'][tag]}" for tag in TAGS if any(t == tag for r in spec["rows"]
                                                                      for _, _, t, _, _ in _values(r))]
    for name, s in spec.get("sources", {}).items():
        facts = [s["title"], f"arXiv {s['arxiv']}" if s.get("arxiv") else "", s.get("table", "")] + [
            f"{k.replace('_', ' ')} {s[k]}" for k in ("hardware", "batch_size", "precision", "evaluator") if s.get(k)]
        lines.append(f"source `{name}`: " + "; ".join(f for f in facts if f)
                     + (f" (checked: {s['checked']})" if s.get("checked") else ""))
    lines += spec.get("notes", []) + [f"{r['label']}: {r['note']}" for r in spec["rows"] if r.get("note")]
    lines += [f"{r['label']}, {m}: {note}" for r in spec["rows"] for m, _, _, _, note in _values(r) if note]
    if matched is not None:
        shown = [rec for recs in matched.values() for rec in recs.values()]
        devices = sorted({str(r.get("env", {}).get("device_name") or r.get("device") or "?") for r in shown})
        lines.append(f"ours: {len(shown)} records shown, measured on {', '.join(devices) or 'nothing'}; (bN), "
                     "(precision), (n=N) mark a batch size, precision or sample count other than the paper's")
    if spec["entry"].get("study"):
        lines.append(f"measure it: varbench run {spec['entry']['study']}")
    return "\n\n".join(parts) + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
