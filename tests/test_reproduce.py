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
    assert by_id["scalekv_infinity"]["supported"] is True  # Infinity is a varbench family (issue 14)
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


def test_rows_that_cannot_be_measured_say_why(tmp_path, monkeypatch):
    text = rp.reproduce("scalekv_infinity", [], check_weights=False)
    assert "not supported by varbench" not in text
    sw = row(text, "Table 1: Infinity-2B", "Sliding Window 10%")
    assert sw["measured"].startswith("unsupported KV policy (Sliding Window") and sw["varbench cell"] == "-"
    assert row(text, "Table 2: GenEval / DPG", "Infinity-2B")["measured"].startswith("unsupported metrics")
    assert row(text, "Table 1: Infinity-2B", "ScaleKV 10%")["KV cache / base"] == f"{3900 / 38550:.2f}"
    assert rp._missing_weights(["/nonexistent/folder/var_d30.pth"]) == ["var_d30.pth"]
    (tmp_path / "index.toml").write_text('[tags]\npaper = "p"\n[[tables]]\nid = "t"\nfile = "t.toml"\n')
    (tmp_path / "t.toml").write_text('id = "t"\ntitle = "T"\nsupported = false\n[sources.s]\ntitle = "S"\n'
                                     '[[rows]]\nkey = "a"\nlabel = "A"\nsource = "s"\ntag = "paper"\n'
                                     'values = { fid = 1.0 }\nunsupported = "unsupported model (M)"\n')
    monkeypatch.setenv("VARBENCH_PUBLISHED", str(tmp_path))
    text = rp.reproduce("t", [], check_weights=False)
    assert "not supported by varbench" in text and "| unsupported model (M) |" in text


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


# --- the acceleration and raster-AR tables (issues 15, 16) -------------------------------------------------------
NEW_TABLES = {"llamagen_c2i": "2406.06525", "fastvar_table1": "2503.23367", "stagevar_table1": "2512.16483",
              "zipar_llamagen": "2412.04062"}


def accelerated(rec: dict, name: str, args: dict | None = None) -> dict:
    """A record of an accelerated cell: Cell.describe() adds acceleration and accel_args only then."""
    rec["cell"].update(acceleration=name, accel_args=args or {})
    return rec


def test_the_acceleration_and_raster_tables_load_with_their_sources():
    by_id = {t["id"]: t for t in rp.list_tables()}
    for table_id, arxiv in NEW_TABLES.items():
        assert table_id in by_id and by_id[table_id]["study"] == f"results/studies/{table_id}.toml"
        df = rp.load_table(table_id)
        assert arxiv in set(df["arxiv"].dropna()) or table_id == "llamagen_c2i"
    zoo = rp.load_table("llamagen_c2i").set_index(["row", "metric"])
    assert zoo.loc[("llamagen_3b_384", "fid"), ["number", "tag"]].tolist() == [2.18, "README"]
    assert zoo.loc[("llamagen_b_256", "fid"), "number"] == 5.46 and zoo.loc[("llamagen_l_384", "fid"), "number"] == 3.07
    zipar = rp.load_table("zipar_llamagen").set_index(["row", "metric"])
    assert zipar.loc[("zipar_16", "forward_steps"), ["number", "acceleration"]].tolist() == [400, "zipar"]
    assert zipar.loc[("ntp", "latency_s"), ["number", "batch_size", "acceleration"]].tolist() == [15.20, 1, "none"]


def test_acceleration_tables_ratios_are_value_over_their_own_baseline():
    fast = rp.reproduce("fastvar_table1")
    row_fv = row(fast, "Table 1: Infinity-2B", "Infinity-2B + FastVAR")
    assert row_fv["latency (s)"] == "0.95 [README]" and row_fv["latency / base"] == f"{0.95 / 2.61:.2f}" == "0.36"
    assert row_fv["throughput / base"] == f"{1.05 / 0.38:.2f}" == "2.76"
    assert row(fast, "Table 1: HART", "HART + FastVAR")["latency / base"] == f"{0.63 / 0.95:.2f}"  # HART's own base
    t5 = row(fast, "Table 5: FlashAttention and FastVAR (Infinity-2B)", "FlashAttn + FastVAR")
    assert t5["memory / base"] == f"{11.9 / 16.1:.2f}" == "0.74"
    stage = rp.reproduce("stagevar_table1")
    assert row(stage, "Infinity-2B", "StageVAR (Infinity-2B)")["latency / base"] == f"{0.64 / 2.2:.2f}" == "0.29"
    assert row(stage, "Infinity-8B", "StageVAR (Infinity-8B)")["latency / base"] == f"{1.77 / 4.80:.2f}" == "0.37"
    assert row(stage, "Infinity-2B", "SkipVAR (Infinity-2B)")["speedup (x)"] == "2.62 [README]"
    zipar = row(rp.reproduce("zipar_llamagen"), "LlamaGen-L (24x24 tokens)", "ZipAR-16")
    assert zipar["forward passes / base"] == f"{400 / 576:.2f}" == "0.69"
    assert zipar["latency / base"] == f"{10.38 / 15.20:.2f}" == "0.68"


def test_records_land_in_the_row_of_their_acceleration():
    base_args = {"image_size": 384}
    records = [
        speed("llamagen_l", 1, 0.1, 4_000, args=base_args),  # NTP: latency 1 / (0.8 * 0.1) = 12.5 s
        accelerated(speed("llamagen_l", 1, 0.15, 4_100, args=base_args), "zipar", {"window": 16}),
        accelerated(speed("llamagen_l", 1, 0.2, 4_100, args=base_args, sweep={"accel_args.zipar.window": 12}),
                    "zipar"),  # a swept acceleration argument counts as an argument
        accelerated(quality("llamagen_l", 3.40, args=base_args), "zipar", {"window": 16}),
        quality("llamagen_l", 3.10, args=base_args),
    ]
    for rec, steps in zip(records[:3], (576, 400, 312)):  # bench.py counts the loop's steps of every variant
        rec["metrics"]["network_evals"] = steps
    for rec in records[1:3]:  # and an accelerated cell's report
        rec["metrics"]["accel_report"] = {"acceptance_rate": 1.0}
    text = rp.reproduce("zipar_llamagen", records, check_weights=False)
    group = "LlamaGen-L (24x24 tokens)"
    ntp, z16, z12 = (row(text, group, label) for label in ("NTP (next-token prediction)", "ZipAR-16", "ZipAR-12"))
    assert ntp["FID ours"] == "3.10" and z16["FID ours"] == "3.40"  # the plain row never takes ZipAR's record
    assert ntp["latency (s) ours"] == "12.50" and z16["latency (s) ours"] == f"{1 / (0.8 * 0.15):.2f}"
    assert z16["forward passes ours"] == "400" and ntp["forward passes ours"] == "576"
    assert z16["forward passes / base ours"] == f"{400 / 576:.2f}" == "0.69"  # ZipAR's published 400 / 576
    assert z12["latency / base ours"] == f"{(1 / 0.16) / 12.5:.2f}" == "0.50"
    assert row(text, group, "ZipAR-8")["measured"] == "not measured"
    assert "llamagen_l accel=zipar image_size=384 window=16" in text


def test_llamagen_rows_take_quality_at_their_cfg_and_grid():
    records = [quality("llamagen_l", 3.9, sweep={"sample.cfg": 2.0, "variant_args.llamagen_l.image_size": 256}),
               quality("llamagen_l", 3.2, args={"image_size": 384}, sweep={"sample.cfg": 2.0}),
               quality("llamagen_xl", 2.9, sweep={"sample.cfg": 2.0}),  # not XL's published cfg (1.75)
               quality("llamagen_xl", 2.7, sweep={"sample.cfg": 1.75})]
    text = rp.reproduce("llamagen_c2i", records, check_weights=False)
    group = "README AR models (ImageNet 256x256)"
    assert row(text, group, "LlamaGen-L 16x16")["FID ours"] == "3.90"
    assert row(text, group, "LlamaGen-L 24x24")["FID ours"] == "3.20"
    assert row(text, group, "LlamaGen-XL 24x24")["FID ours"] == "2.70"
    assert row(text, group, "LlamaGen-3B 24x24")["measured"] == "not measured"


# --- ScaleKV's Infinity tables (issue 14) -------------------------------------------------------------------------
SCALEKV_650 = {"budget": 650, "selection": "official", "drafters": 0.05625, "budgets": "/w/2b_10%_budget.json"}


def kv_speed(variant: str, batch: int, kv_mib: float, peak_mib: float, **kw) -> dict:
    """A speed record whose KV cache and peak memory are given (MiB)."""
    rec = speed(variant, batch, 1.0, peak_mib, precision="bf16", **kw)
    rec["metrics"]["kv_bytes"] = kv_mib * 2**20
    return rec


def consistent(variant: str, psnr: float, ssim: float, lpips: float, study: str = "scalekv_infinity", **kw) -> dict:
    return record("consistency", variant, {"psnr_db": psnr, "ssim": ssim, "lpips": lpips}, study=study, **kw)


def infinity_records() -> list[dict]:
    """Records as the two studies write them: a swept budget is in the cell's kv_args and in its sweep."""
    at = {"kv_args.streaming.budget": 1300}
    at_265 = {**SCALEKV_650, "budget": 265}
    return [
        kv_speed("infinity_2b", 8, 38_000, 52_000, study="scalekv_infinity"),
        kv_speed("infinity_2b", 1, 4_750, 12_000, study="scalekv_infinity"),  # the paper's batch (8) wins
        kv_speed("infinity_2b", 8, 4_000, 18_000, kv="scalekv", kv_args=SCALEKV_650),
        consistent("infinity_2b", 22.1, 0.71, 0.12, kv="scalekv", kv_args=SCALEKV_650),
        consistent("infinity_2b", 23.4, 0.74, 0.10, kv="streaming", kv_args={"budget": 1300}, sweep=at),
        consistent("infinity_2b", 19.0, 0.60, 0.20, kv="scalekv", kv_args=at_265,
                   sweep={"kv_args.scalekv.budget": 265}),
        consistent("infinity_2b", 30.0, 0.90, 0.01, study="other", kv="scalekv", kv_args=SCALEKV_650),  # not Table 1
        kv_speed("infinity_8b", 8, 860, 49_000, kv="scalekv", kv_args={**SCALEKV_650, "drafters": 0.075}),
        kv_speed("infinity_8b", 16, 1_720, 79_000, kv="scalekv", kv_args={**SCALEKV_650, "drafters": 0.075}),
    ]


def test_infinity_rows_match_records_of_their_variant_policy_and_budget():
    text = rp.reproduce("scalekv_infinity", infinity_records(), check_weights=False)
    t1 = "Table 1: Infinity-2B"
    full, skv10 = row(text, t1, "Infinity-2B full cache"), row(text, t1, "ScaleKV 10%")
    assert full["KV cache (MB) ours"] == "38000" and full["KV cache / base ours"] == "1.00"
    assert skv10["varbench cell"] == "infinity_2b kv=scalekv budget=650 selection=official (quality: scalekv_infinity)"
    assert skv10["KV cache (MB) ours"] == "4000" and skv10["memory (MB) ours"] == "18000"
    assert skv10["KV cache / base ours"] == f"{4000 / 38000:.2f}" == "0.11"  # ours, hand-checked
    assert skv10["KV cache / base"] == f"{3900 / 38550:.2f}" == "0.10"  # the paper's
    # consistency from the Table 1 study only: the other study's 30.0 dB record (read last) is not shown
    assert (skv10["PSNR vs full (dB) ours"], skv10["SSIM vs full ours"], skv10["LPIPS vs full ours"]) == (
        "22.10", "0.710", "0.12")
    assert skv10["measured"] == "measured: speed, consistency"
    assert row(text, t1, "StreamingLLM 20%")["PSNR vs full (dB) ours"] == "23.40"
    assert row(text, t1, "StreamingLLM 10%")["measured"] == "not measured"
    assert row(text, t1, "ScaleKV 4%")["PSNR vs full (dB) ours"] == "19.00"
    assert row(text, t1, "ScaleKV 20%")["PSNR vs full (dB) ours"] == ""
    assert row(text, "Table 1: Infinity-8B", "ScaleKV 10%")["KV cache (MB) ours"] == "860"  # batch 8 of 8 and 16
    bs16 = row(text, "Table 3: Infinity-8B memory, batch 16", "+ ScaleKV (10%), batch 16")
    # Table 3 in GB (the table's .3g format): 1720 MiB / 1024, 79000 MiB / 1024, 860 MiB / 1024
    assert bs16["KV cache (GB) ours"] == "1.68" and bs16["memory (GB) ours"] == "77.1"
    assert row(text, "Table 3: Infinity-8B memory, batch 8", "+ ScaleKV (10%), batch 8")["KV cache (GB) ours"] == "0.84"
    assert row(text, "Table 3: Infinity-8B memory, batch 1", "Infinity-8B, batch 1")["measured"] == "not measured"


def test_the_infinity_studies_run_the_rows_of_the_table():
    rows = {r["key"]: r for r in rp._spec("scalekv_infinity")["rows"]}
    for model in ("2b", "8b"):
        study = load_study(ROOT / f"results/studies/scalekv_infinity{'_8b' if model == '8b' else ''}.toml")
        assert study.variants == (f"infinity_{model}",) and study.engine.precision == "bf16"
        assert study.quality.num_samples == 5000 and study.quality.prompts == "coco30k" and study.quality.consistency
        for policy, name in (("streaming", "streamingllm"), ("snapkv", "snapkv"), ("pyramidkv", "pyramidkv")):
            assert study.sweep[f"kv_args.{policy}.budget"] == (1300, 650, 265)
            for pct, tokens in (("20", 1300), ("10", 650), ("4", 265)):
                measure = rows[f"inf{model}_{name}_{pct}"]["measure"]
                assert measure["kv_args"] == {"budget": tokens} and study.study in measure["quality_study"]
        assert study.kv_args["scalekv"] == {"budget": 650, "selection": "official",
                                             "drafters": {"2b": 9 / 160, "8b": 15 / 200}[model]}
        assert rows[f"inf{model}_scalekv_10"]["measure"]["kv_args"] == {"budget": 650, "selection": "official"}
    # the paper's budgets: each row's KV-cache MB over its full row's, times the 6,425 tokens before the last scale
    df = rp.load_table("scalekv_infinity", layout="wide")
    for model in ("2b", "8b"):
        per_token = df.loc[f"inf{model}_full", "kv_cache_mb"] / 6425
        assert [round(df.loc[f"inf{model}_scalekv_{p}", "kv_cache_mb"] / per_token) for p in ("20", "10", "4")] == [
            1300, 650, 265]


def test_varbench_reproduce_scalekv_infinity_prints(tmp_path, monkeypatch, capsys):
    import json

    from varbench.harness.cli import main

    monkeypatch.delenv("VARBENCH_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the weights are missing
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in infinity_records()))
    assert main(["reproduce", "scalekv_infinity", "--measured", str(path)]) == 0
    text = capsys.readouterr().out
    assert row(text, "Table 1: Infinity-2B", "ScaleKV 10%")["PSNR vs full (dB) ours"] == "22.10"
    assert row(text, "Table 1: Infinity-2B", "SnapKV 4%")["measured"] == \
        "needs infinity_2b_reg.pth, infinity_vae_d32reg.pth"
    assert "measure it: varbench run results/studies/scalekv_infinity.toml" in text
