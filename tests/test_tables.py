"""Results tables: the engine precision apart from the quality metric `precision`, a `params` column on every row,
the reference each quality row was scored against, and cells joined for fits (issue 13, items 3 and 14)."""

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from varbench.harness.eval.tables import cell_rows, results_table

REPO = Path(__file__).resolve().parents[1]


def _record(kind: str, variant: str, metrics: dict, policy: str = "full", **extra) -> dict:
    cell = {"variant": variant, "kv_policy": policy, "variant_args": {}, "kv_args": {}, "sweep": {}}
    return {"kind": kind, "cell": cell, "label": f"{variant} {policy}", "metrics": metrics,
            "config_hash": f"{kind}-{variant}-{policy}-{metrics.get('batch_size')}-{extra.get('tag')}", **extra}


def _speed(variant: str, params: int, batch: int, ips: float) -> dict:
    return _record("speed", variant, {"params": params, "batch_size": batch, "precision": "fp32", "images_per_s": ips})


def _quality(variant: str, fid: float, reference: str, stats_sha: str, policy: str = "full") -> dict:
    return _record("quality", variant, {"fid": fid, "precision": 0.22, "recall": 0.4}, policy, tag=reference,
                   quality={"reference": reference, "reference_stats_sha": stats_sha})


RECORDS = [_speed("a", 1000, 2, 5.0), _speed("a", 1000, 8, 9.0), _speed("b", 4000, 8, 3.0),
           _quality("a", 30.0, "/cache/x/synthetic_64px.npz", "aaaa1111"),
           _quality("b", 20.0, "/cache/x/synthetic_64px.npz", "aaaa1111")]


def _csv(records: list[dict]) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(results_table(records, "csv")))


def test_csv_gives_the_engine_precision_its_own_column_and_every_row_its_params():
    frame = _csv(RECORDS)
    speed, quality = frame[frame.table == "speed"], frame[frame.table == "quality"]
    assert list(speed.dtype) == ["fp32"] * 3 and quality.dtype.isna().all()
    assert list(quality.precision) == [0.22, 0.22] and speed.precision.isna().all()  # one meaning per column
    assert list(speed.params) == [1000, 1000, 4000]
    assert list(quality.params) == [1000, 4000]  # from the cell's speed record


def test_quality_rows_show_the_reference_they_were_scored_against():
    other = _quality("a", 31.0, "/cache/x/synthetic_8px.npz", "bbbb2222", policy="streaming")
    text = results_table(RECORDS + [other])
    quality = text.split("Quality")[1]
    header = quality.splitlines()[2]
    assert "| reference " in header
    rows = {line.split("|")[2].strip(): line for line in quality.splitlines() if line.startswith("| a ")}
    assert "synthetic_64px.npz" in rows["full"] and "synthetic_8px.npz" in rows["streaming"]
    assert "/cache/x" not in quality.split("\n- ")[0]  # the row shows a name, not the author's cache path
    assert list(_csv(RECORDS + [other]).dropna(subset=["fid"]).reference) == [
        "synthetic_64px.npz", "synthetic_64px.npz", "synthetic_8px.npz"]


def test_two_references_of_one_file_name_are_told_apart_by_their_statistics():
    clash = _quality("a", 31.0, "/elsewhere/synthetic_64px.npz", "cccc3333", policy="streaming")
    refs = list(_csv(RECORDS + [clash]).dropna(subset=["fid"]).reference)
    assert refs == ["synthetic_64px.npz (aaaa1111)", "synthetic_64px.npz (aaaa1111)", "synthetic_64px.npz (cccc3333)"]


def test_cell_rows_join_speed_at_the_largest_batch_with_quality():
    rows = {r["cell"]: r for r in cell_rows(RECORDS)}
    assert set(rows) == {"a full", "b full"}
    a = rows["a full"]
    assert a["params"] == 1000 and a["fid"] == 30.0 and a["images_per_s"] == 9.0 and a["batch_size"] == 8
    assert a["precision"] == 0.22 and a["dtype"] == "fp32"  # quality's precision; speed's is dtype
    assert a["speed.images_per_s"] == 9.0 and a["quality.fid"] == 30.0


def test_the_shipped_default_table_as_csv():
    records = [json.loads(line) for line in (REPO / "results/default_zoo/records.jsonl").read_text().splitlines()]
    frame = _csv(records)
    speed, quality = frame[frame.table == "speed"], frame[frame.table == "quality"]
    assert set(speed.dtype) == {"fp32"} and quality.precision.between(0, 1).all()
    params = dict(zip(speed.variant + " " + speed["KV policy"], speed.params))
    cells = quality[quality.variant != "real data (held-out)"]
    assert dict(zip(cells.variant + " " + cells["KV policy"], cells.params)) == params  # real data: no params (empty)
    assert params["var_zoo_d5 full"] == 2479737
    assert set(quality.reference) == {"synthetic_64px_1000_seed20251123.npz"}
    real = quality[quality.variant == "real data (held-out)"]
    assert len(real) == 1 and real.fid.iloc[0] < cells.fid.min() / 10  # the floor sits far below every model


def test_unknown_format_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown table format 'xls'; valid: md, csv"):
        results_table(RECORDS, "xls")


def _with_env(record: dict, sha: str = "0123456789ab", dirty: bool = False) -> dict:
    return {**record, "env": {"git_sha": sha, "git_dirty": dirty, "torch": "2.x", "device_name": "x86_64"}}


def test_the_real_data_row_comes_last_and_the_footer_names_its_held_out_images():
    real = _record("quality", "real data (held-out)", {"fid": 1.5, "precision": 0.7, "recall": 0.7}, "-",
                   tag="real", real_data=True,
                   quality={"reference": "/cache/x/synthetic_64px.npz", "reference_stats_sha": "aaaa1111",
                            "heldout": "synthetic images 1000..1255", "feature_scale": "centred (x0.25)"})
    frame = _csv([real, *RECORDS])  # written first (or anywhere), shown last
    quality = frame[frame.table == "quality"]
    assert list(quality.variant) == ["a", "b", "real data (held-out)"]
    assert list(quality.fid) == [30.0, 20.0, 1.5] and pd.isna(quality.params.iloc[-1])  # no params: not a model
    text = results_table([real, *RECORDS])
    assert "- real data (held-out): synthetic images 1000..1255" in text
    # records without a recorded scale (before the feature scale existed) are named as such
    assert "- feature scale: centred (x0.25), raw (a record older than the feature scale)" in text
    assert [row["cell"] for row in cell_rows([real, *RECORDS])] == ["a full", "b full"]  # data is no cell to fit


def test_the_footer_names_no_cache_path_and_says_uncommitted_changes_in_words():
    records = [_with_env(r) for r in RECORDS]
    text = results_table(records)
    assert "- git: 0123456789ab\n" in text and "/cache/" not in text and "(dirty)" not in text
    assert "- reference: synthetic_64px.npz (statistics aaaa1111)" in text
    dirty = results_table([_with_env(r, dirty=True) for r in RECORDS])
    assert "- git: 0123456789ab with uncommitted changes" in dirty and "(dirty)" not in dirty


def test_speed_rows_say_which_engine_ran_so_an_engine_and_its_reference_never_look_alike():
    full = {"precision": "fp32", "static_kv_cache": True, "weights_in_precision": True, "cache_conditioning": True,
            "compile": False, "cuda_graphs": False, "channels_last_vae": True}
    engines = [full, {k: (False if k != "precision" else v) for k, v in full.items()},
               {**full, "compile": True}, {**full, "static_kv_cache": False}]
    records = [{**_speed("a", 1000, 2, 5.0), "engine": e, "config_hash": str(i)} for i, e in enumerate(engines)]
    frame = _csv(records)
    assert list(frame.engine) == ["engine", "reference", "engine+compile", "engine (no static kv cache)"]


def test_an_accelerated_cell_is_told_apart_by_an_acceleration_column_that_plain_studies_do_not_get():
    plain, fast = _quality("a", 30.0, "ref.npz", "aaaa"), _quality("a", 31.0, "ref.npz", "aaaa")
    fast["cell"] = {**fast["cell"], "acceleration": "fastvar", "accel_args": {}}
    fast["config_hash"] += "-fastvar"
    frame = _csv([plain, fast])
    assert list(frame.acceleration) == ["none", "fastvar"] and list(frame.fid) == [30.0, 31.0]
    assert "acceleration" not in _csv([plain]).columns


def test_speedups_divide_by_the_baseline_cell_at_the_same_engine_and_batch():
    full = {"precision": "fp32", "static_kv_cache": True, "compile": False}
    reference = {k: (False if k != "precision" else v) for k, v in full.items()}

    def timed(variant: str, engine: dict, ips: float, no_vae: float) -> dict:
        r = _record("speed", variant, {"batch_size": 8, "precision": "fp32", "images_per_s": ips,
                                       "images_per_s_without_vae": no_vae}, tag=str(engine) + variant)
        return {**r, "engine": engine, "baseline": "a full"}

    records = [timed("a", full, 10.0, 20.0), timed("a", reference, 5.0, 8.0),
               timed("b", full, 15.0, 50.0), timed("b", reference, 6.0, 10.0)]
    frame = _csv(records)
    assert list(frame["speedup ↑"]) == [1.0, 1.0, 1.5, 1.2]  # b's engine / a's engine; b's reference / a's reference
    assert list(frame["speedup w/o VAE ↑"]) == [1.0, 1.0, 2.5, 1.25]
    assert "| 1.50× " in results_table(records)
    assert "speedup ↑" not in _csv(records[:2]).columns  # the baseline alone: no ratio to show
    assert "speedup ↑" not in _csv(RECORDS).columns  # records that name no baseline


def test_a_cell_timed_both_ways_is_represented_by_its_engine_record_in_joins():
    engine = {"precision": "fp32", "static_kv_cache": True}
    reference = {"precision": "fp32", "static_kv_cache": False}
    fast = {**_speed("a", 1000, 8, 9.0), "engine": engine, "config_hash": "e"}
    slow = {**_speed("a", 1000, 8, 4.0), "engine": reference, "config_hash": "r"}
    for order in ([fast, slow], [slow, fast]):
        (row,) = cell_rows(order)
        assert row["images_per_s"] == 9.0
