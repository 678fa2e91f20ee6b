"""Published tables: every value has a tag and a source, ratios are value / baseline, measured records land in
the row whose cell they measured, unknown ids suggest the closest, and every table's study file loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from varbench.harness.eval import reproduce as rp
from varbench.harness.run.config import load_study

ROOT = Path(__file__).resolve().parents[1]
TABLES = [t["id"] for t in rp.list_tables()]
H100 = {"device_name": "NVIDIA H100 80GB HBM3"}


def rows_of(text: str, group: str) -> list[dict[str, str]]:
    """The github table under "### group" as {header: cell} dicts."""
    section = text.split(f"### {group}\n", 1)[1]
    lines = [line for line in section.split("\n\n### ")[0].splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def row(text: str, group: str, label: str) -> dict[str, str]:
    return next(r for r in rows_of(text, group) if r["row"] == label)


def record(kind: str, variant: str, metrics: dict, study: str = "s", kv: str = "full", args: dict | None = None,
           kv_args: dict | None = None, sweep: dict | None = None, **extra) -> dict:
    cell = {"variant": variant, "kv_policy": kv, "variant_args": args or {}, "kv_args": kv_args or {},
            "sweep": sweep or {}}
    return {"kind": kind, "study": study, "cell": cell, "metrics": metrics, "env": H100, **extra}


def speed(variant: str, batch: int, ips_without_vae: float, peak_mib: float, **kw) -> dict:
    m = {"batch_size": batch, "images_per_s": 0.8 * ips_without_vae, "images_per_s_without_vae": ips_without_vae,
         "latency_ms_p50": 1e3 * batch / (0.8 * ips_without_vae), "peak_memory_bytes": peak_mib * 2**20,
         "kv_bytes": peak_mib * 2**19, "precision": kw.pop("precision", "fp16")}
    return record("speed", variant, m, batch_size=batch, **kw)


def quality(variant: str, fid: float, num_samples: int = 50_000, **kw) -> dict:
    m = {"fid": fid, "isc_mean": 300.0, "precision": 0.8, "recall": 0.6, "num_samples": num_samples}
    return record("quality", variant, m, num_samples=num_samples, **kw)


def test_the_expected_tables_are_listed():
    assert {"var_zoo", "var_scaling_laws", "code_table1", "hmar_table1", "hack_var_d30",
            "scalekv_infinity"} <= set(TABLES)
    by_id = {t["id"]: t for t in rp.list_tables()}
    assert by_id["code_table1"]["baseline"] == "var_d30" and by_id["code_table1"]["rows"] >= 20
    assert "2411.17787" in by_id["code_table1"]["source"]
    assert by_id["scalekv_infinity"]["supported"] is False
    assert "code_table1" in rp.tables_overview()


@pytest.mark.parametrize("table_id", TABLES)
def test_every_value_has_a_valid_tag_and_a_source(table_id):
    df = rp.load_table(table_id)
    assert len(df) > 0
    assert set(df["tag"]) <= set(rp.TAGS)
    assert df["source"].notna().all() and df["source_title"].notna().all()
    assert df["metric"].isin(list(rp.METRICS)).all()
    assert (df["value"].map(lambda v: isinstance(v, (int, float, str)))).all()
    wide = rp.load_table(table_id, layout="wide")
    assert wide.index.is_unique and len(wide) == rp.list_tables()[TABLES.index(table_id)]["rows"]
    assert isinstance(rp.reproduce(table_id), str)


def test_known_values_and_their_provenance():
    df = rp.load_table("code_table1").set_index(["row", "metric"])
    assert df.loc[("code_n8", "latency_s"), "number"] == 2.11 and df.loc[("var_d30", "latency_s"), "number"] == 3.62
    assert df.loc[("code_n8", "latency_s"), ["tag", "arxiv", "batch_size", "precision"]].tolist() == [
        "paper", "2411.17787", 64, "fp16"]
    assert "L20" in df.loc[("code_n8", "latency_s"), "hardware"]
    assert df.loc[("code_tf_n7", "fid"), "source"] == "t2"  # Table 2's 2.26, not Table 6's 2.25
    zoo = rp.load_table("var_zoo").set_index(["row", "metric"])
    assert zoo.loc[("readme_d30", "fid"), ["number", "tag"]].tolist() == [1.97, "README"]
    assert zoo.loc[("paper_d30", "fid"), "number"] == 1.92
    assert zoo.loc[("paper_d30_re", "fid"), "tag"] == "paper"  # the v2+ abstract states 1.73
    laws = rp.load_table("var_scaling_laws").set_index(["row", "metric"])
    assert laws.loc[("err_avg_vs_n", "exponent"), "tag"] == "memory"


def test_ratio_columns_are_value_over_the_baseline_row():
    text = rp.reproduce("code_table1")
    n8, base = row(text, "Table 1", "CoDe N=8"), row(text, "Table 1", "VAR-d30")
    assert n8["latency (s)"] == "2.11 [paper]"
    assert n8["latency / base"] == f"{2.11 / 3.62:.2f}" == "0.58"
    assert n8["memory / base"] == f"{21019 / 39228:.2f}"
    assert n8["throughput / base"] == f"{30.33 / 17.71:.2f}"
    assert base["latency / base"] == "1.00"
    assert "ours" not in "".join(n8) and "measured" not in n8  # no records: published columns only


def test_measured_records_fill_the_right_rows():
    n8_args = {"draft_steps": 8, "training_free": False}
    records = [
        speed("var_d30", 64, 40.0, 30_000, study="code_table1"),
        speed("var_d30", 1, 5.0, 9_000, study="code_table1"),  # the paper's batch (64) wins
        speed("code_d30_d16", 64, 70.0, 15_000, args={"training_free": False},
              sweep={"variant_args.code_d30_d16.draft_steps": 8}),  # a swept arg counts as an arg
        quality("code_d30_d16", 2.01, args=n8_args),
        quality("var_d30", 2.50, study="code_table1"),  # CoDe's sampling: not the VAR-d30 row's quality
        quality("var_d30", 1.99, study="var_zoo", sweep={"sample.cfg": 1.5}),
        quality("code_d30_d16", 2.30, num_samples=10_000, args={"draft_steps": 6, "training_free": True}),
        speed("code_d30_d16", 16, 60.0, 15_000, args={"draft_steps": 6, "training_free": True}, precision="bf16"),
    ]
    text = rp.reproduce("code_table1", records, check_weights=False)
    base, n8, n9 = (row(text, "Table 1", label) for label in ("VAR-d30", "CoDe N=8", "CoDe N=9"))
    assert base["latency (s) ours"] == f"{64 / 40:.2f}" and base["FID ours"] == "1.99"
    assert n8["FID ours"] == "2.01" and n8["memory (MB) ours"] == "15000"
    assert n8["latency (s) ours"] == f"{64 / 70:.2f}"
    assert n8["latency / base ours"] == f"{(64 / 70) / (64 / 40):.2f}"
    assert n8["speedup (x) ours"] == f"{70 / 40:.1f}"
    assert n8["measured"] == "measured: speed, quality"
    assert n9["FID ours"] == "" and n9["measured"] == "not measured"
    assert row(text, "Table 1", "DiT-XL/2")["measured"].startswith("unsupported model")
    tf6 = row(text, "training-free CoDe (Tables 2 and 6)", "CoDe N=6 training-free")
    assert tf6["FID ours"] == "2.30 (n=10000)"  # fewer samples than the paper's 50k are marked
    assert tf6["latency (s) ours"] == f"{16 / 60:.2f} (b16, bf16)"
    assert row(text, "training-free CoDe (Tables 2 and 6)", "CoDe N=8 training-free")["FID ours"] == ""
    assert "NVIDIA H100" in text


def test_sweep_values_and_kv_args_pick_the_row():
    records = [quality("var_d16", 3.6, sweep={"sample.cfg": 1.5}), quality("var_d16", 3.4, sweep={"sample.cfg": 2.0}),
               speed("var_d16", 64, 100.0, 5_000, sweep={"sample.cfg": 2.0}),
               speed("var_d30", 64, 25.0, 20_000, sweep={"sample.cfg": 1.5})]
    text = rp.reproduce("var_zoo", records, check_weights=False)
    assert row(text, "README model zoo (= arXiv v1)", "VAR-d16")["FID ours"] == "3.60"
    assert row(text, "paper Table 1 (arXiv v2+ / NeurIPS 2024)", "VAR-d16")["FID ours"] == "3.40"
    # sampling does not change speed: both groups show it; rel. cost is our time per image over VAR-d30's
    assert row(text, "README model zoo (= arXiv v1)", "VAR-d16")["rel. cost ours"] == f"{25 / 100:.1f}"
    hack = [speed("var_d30", 64, 25.0, 20_000), speed("var_d30", 64, 26.0, 12_000, kv="hack",
                                                       kv_args={"budget": 0.3}),
            quality("var_d30", 2.2, kv="hack", kv_args={"budget": 0.5})]
    text = rp.reproduce("hack_var_d30", hack, check_weights=False)
    assert row(text, "VAR-d30 at 50% / 70% compression", "HACK 50%")["FID ours"] == "2.20"
    saved = row(text, "VAR-d30 at 50% / 70% compression", "HACK 70%")["memory saved (%) ours"]
    assert saved == f"{100 * (1 - 12_000 / 20_000):.1f} (b64)"  # 1 - peak / peak(full); the paper measured batch 1
    assert row(text, "head-classification ablation (VAR-d30, 50%)",
               "head typing by attention variance (HACK)")["FID ours"] == "2.20"


def test_rows_that_cannot_be_measured_say_why():
    text = rp.reproduce("scalekv_infinity", [], check_weights=False)
    assert "not supported by varbench" in text
    assert row(text, "Table 1: Infinity-2B", "ScaleKV 10%")["measured"] == "unsupported model (Infinity-2B)"
    assert row(text, "Table 1: Infinity-2B", "ScaleKV 10%")["KV cache / base"] == f"{3900 / 38550:.2f}"
    assert rp._missing_weights(["/nonexistent/folder/var_d30.pth"]) == ["var_d30.pth"]


def test_missing_checkpoints_are_named(monkeypatch):
    monkeypatch.setattr(rp, "_missing_weights", lambda needs: ["drafter_8.pth", "refiner_8.pth"])
    text = rp.reproduce("code_table1", [])
    assert row(text, "Table 1", "CoDe N=8")["measured"] == "needs drafter_8.pth, refiner_8.pth"


def test_unknown_table_suggests_the_closest_and_lists_the_valid_ones():
    with pytest.raises(KeyError, match="Did you mean 'code_table1'") as err:
        rp.load_table("code_tabel1")
    assert "Valid tables: " in str(err.value) and "hmar_table1" in str(err.value)
    with pytest.raises(KeyError, match="hack_var_d30"):
        rp.reproduce("hack_var_d31")


def test_a_malformed_table_is_refused(tmp_path, monkeypatch):
    (tmp_path / "index.toml").write_text('[tags]\npaper = "p"\n[[tables]]\nid = "t"\nfile = "t.toml"\n')
    table = ('id = "t"\ntitle = "T"\nbaseline = "a"\n[sources.s]\ntitle = "S"\n'
             '[[rows]]\nkey = "a"\nlabel = "A"\nsource = "s"\ntag = "{tag}"\nvalues = {{ {metric} = 1.0 }}\n'
             'unsupported = "x"\n')
    monkeypatch.setenv("VARBENCH_PUBLISHED", str(tmp_path))
    (tmp_path / "t.toml").write_text(table.format(tag="paper", metric="fid"))
    assert rp.load_table("t")["number"].tolist() == [1.0]
    (tmp_path / "t.toml").write_text(table.format(tag="rumour", metric="fid"))
    with pytest.raises(ValueError, match="tag 'rumour'"):
        rp.load_table("t")
    (tmp_path / "t.toml").write_text(table.format(tag="paper", metric="fdi"))
    with pytest.raises(ValueError, match="did you mean 'fid'"):
        rp.load_table("t")


@pytest.mark.parametrize("table_id", [t["id"] for t in rp.list_tables() if t["study"]])
def test_every_study_file_loads_and_measures_its_table(table_id):
    entry = next(t for t in rp.list_tables() if t["id"] == table_id)
    study = load_study(ROOT / entry["study"])
    assert study.study == table_id
    measured = set(rp.load_table(table_id)["variant"].dropna()) | {
        r["measure"]["variant"] for r in rp._spec(table_id)["rows"] if "measure" in r}
    assert set(study.variants) <= measured
