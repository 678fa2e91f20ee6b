"""The command line as a user meets it: list, bench, run, bad input."""

import json

import pytest

from varbench.harness.cli import main
from varbench.harness.core.records import load_records
from varbench.harness.core.registry import Registry


def test_list_shows_variants_with_exact_parameter_counts(capsys):
    assert main(["list", "var_*"]) == 0
    out = capsys.readouterr().out
    assert "var_d16" in out and "310,283,520" in out and "2,353,893,904" in out and "test_var" not in out


def test_list_shows_the_accelerations_beside_the_kv_policies(capsys):
    assert main(["list"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    families = {cells[1].strip(): cells[2].strip() for cells in rows}
    for method in ("fastvar", "skipvar", "stagevar", "litevar"):
        assert families[method] == "acceleration"
    assert families["snapkv"] == "kv_policy" and families["var_d16"] == "var"


def test_bench_prints_one_json_object_with_the_required_fields(tmp_path, capsys):
    assert main(["bench", "--batch", "1", "--repeats", "2", "--vs-reference", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("images_per_s", "latency_ms_per_scale", "vae_decode_ms", "peak_memory_bytes", "kv_bytes", "mfu",
                "speedup_vs_reference"):
        assert key in result
    assert len(result["latency_ms_per_scale"]) == 10 and result["images_per_s"] > 0
    assert result["network_evals"] == 10  # one network evaluation per scale
    assert result["kv_bytes"] == 2 * 2 * 1 * 680 * 128 * 2 * 4  # K,V x CFG x batch x L x width x depth x fp32
    records = list(load_records(tmp_path / "records.jsonl"))  # the measurement and the reference's
    assert [r["label"] for r in records] == ["test_var full", "test_var full reference"]
    assert records[0]["config_hash"] != records[1]["config_hash"] and records[0]["engine"] != records[1]["engine"]


def test_bench_writes_a_record_that_table_prints(tmp_path, capsys):
    assert main(["bench", "--variant", "test_var", "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["images_per_s"] > 0  # stdout stays one JSON object
    assert str(tmp_path / "records.jsonl") in captured.err
    (record,) = load_records(tmp_path / "records.jsonl")
    assert record["kind"] == "speed" and record["study"] == "bench" and record["cell"]["variant"] == "test_var"
    assert record["config_hash"] and "git_sha" in record["env"] and record["env"]["torch"]
    assert record["metrics"]["images_per_s"] > 0 and record["batch_size"] == 1
    assert record["command"] == f"varbench bench --variant test_var --batch 1 --repeats 1 --warmup 0 --out {tmp_path}"
    assert record["precision"] == "fp32"  # the default "auto", resolved for the CPU
    assert main(["table", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "test_var" in table and "img/s" in table and "- git:" in table


def test_bench_times_an_acceleration_and_records_it_as_a_study_cell(tmp_path, capsys):
    assert main(["bench", "--variant", "test_llamagen", "--accel", "zipar", "--accel-args", '{"window": 8}',
                 "--batch", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    report = result["accel_report"]
    assert sum(report["tokens_per_step"]) == 256 and report["network_evals"] < 256  # rows decoded in parallel
    assert result["network_evals"] == report["network_evals"]  # the loop's count agrees with the method's
    (record,) = load_records(tmp_path / "records.jsonl")
    assert record["cell"]["acceleration"] == "zipar" and record["cell"]["accel_args"] == {"window": 8}
    assert record["label"] == "test_llamagen full zipar"
    assert main(["bench", "--variant", "test_llamagen", "--accel", "zipar", "--accel-args", '{"windw": 8}',
                 "--out", str(tmp_path / "bad")]) == 2
    assert "windw" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_unknown_variant_fails_at_once_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--variants", "var_d61", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Unknown variant 'var_d61'" in err and "Did you mean" in err and "var_d16" in err
    assert not out.exists()


def test_run_writes_records_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    small = ["--set", "quality.num_samples=4", "--set", "quality.block_size=2", "--set", "speed.repeats=1",
             "--set", "speed.batch_sizes=[2]", "--set", "kv_policies=['full']", "--set", "baseline='var_zoo_d2'",
             "--set", "quality.metrics=['fid']", "--variants", "var_zoo_d2"]
    assert main(["run", "--out", str(out), *small]) == 0
    printed = capsys.readouterr().out
    assert "the embedded default study" in printed and "the trained zoo" in printed and "varbench-cnn" in printed
    assert "img/s ↑" in printed and "FID ↓" in printed and "var_zoo_d2" in printed and "- git:" in printed
    assert "zoo classifier, held-out accuracy" in printed  # the table's provenance names the extractor's weights
    records = list(load_records(out))
    assert [r["kind"] for r in records] == ["speed", "quality", "quality"] and records[0]["schema"] == 1
    assert records[2]["real_data"]  # the held-out real images, scored like a cell
    assert records[1]["metrics"]["num_samples"] == 4 and (out / "samples").is_dir()
    assert main(["table", str(out)]) == 0
    again = capsys.readouterr().out.strip()
    assert again in printed and again == (out / "table.md").read_text().strip()  # the same table, from the records


def test_out_of_tree_packages_register_through_entry_points(monkeypatch):
    from importlib.metadata import EntryPoint

    import varbench.harness.core.registry as registry

    eps = [EntryPoint("ext_var", "json:loads", "varbench.variants")]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == "varbench.variants" else [])
    reg = Registry("variant", "varbench.variants")
    reg.add("builtin", "json:dumps")
    assert reg.list() == ["builtin", "ext_var"] and reg.origin("ext_var") == "json:loads"  # not imported yet
    assert reg.get("ext_var") is json.loads and reg.origin("ext_var").startswith("json:")


def test_registry_rejects_duplicates_and_bad_names():
    reg = Registry("thing")

    @reg.register
    def alpha():
        return 1

    with pytest.raises(ValueError, match="already registered"):
        reg.add("alpha", alpha)
    with pytest.raises(ValueError, match="bad thing name"):
        reg.add("Bad-Name", alpha)
    reg.add("lazy_one", "json:dumps")
    assert reg.get("lazy_one") is json.dumps and reg.list("a*") == ["alpha"]
    with pytest.raises(KeyError, match="Did you mean: alpha"):
        reg.get("alpah")


def test_reproduce_lists_tables_and_prints_one_with_tags(capsys):
    assert main(["reproduce", "--list"]) == 0
    listing = capsys.readouterr().out
    for table in ("var_zoo", "code_table1", "hmar_table1", "hack_var_d30", "scalekv_infinity"):
        assert table in listing
    assert main(["reproduce", "code_table1"]) == 0
    out = capsys.readouterr().out
    assert "CoDe N=8" in out and "2.11 [paper]" in out and "0.58" in out  # latency 2.11 s / VAR-d30's 3.62 s
    assert main(["reproduce", "code_tabel1"]) == 2
    assert "Did you mean 'code_table1'" in capsys.readouterr().err
