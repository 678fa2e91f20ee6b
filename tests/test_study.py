"""The study runner end to end on a tiny model: records, samples, resume after a cut line, tables."""

import json

import numpy as np
import pytest

from varbench.harness.cli import main
from varbench.harness.run.config import load_study, parse_study
from varbench.harness.core.records import load_records
from varbench.harness.run.study import run_study

STUDY = {"study": "tiny", "variants": ["test_var"], "device": "cpu", "threads": 2,
         "engine": {"precision": "fp32"}, "speed": {"batch_sizes": [1, 2], "warmup": 0, "repeats": 1},
         "quality": {"num_samples": 6, "block_size": 2, "metrics": ["fid", "isc"], "extractor": "varbench-cnn",
                     "reference": "synthetic", "bootstrap": 20},
         "sweep": {"sample.cfg": [1.5, 3.0]}}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("study")
    os.environ["VARBENCH_CACHE"] = str(out / "cache")
    records = run_study(parse_study(STUDY), out)
    return out, records


def test_every_measurement_is_one_record_with_provenance(finished):
    out, records = finished
    kinds = [r["kind"] for r in records]
    # two cells' quality and one real-data row (one quality setting: the sweep changes only sampling)
    assert kinds.count("speed") == 4 and kinds.count("quality") == 3 and kinds.count("consistency") == 1
    written = list(load_records(out))
    assert [(r["id"], r["config_hash"]) for r in written] == [(r["id"], r["config_hash"]) for r in records]
    for r in records:
        assert r["schema"] == 1 and "git_sha" in r["env"] and r["env"]["torch"] and len(r["config_hash"]) == 12
        real = r.get("real_data", False)  # real images: no engine, no precision
        assert r["precision"] == (None if real else "fp32") and r["seed"] == 0 and r["device"] == "cpu"
    speed = [r for r in records if r["kind"] == "speed"]
    assert len({r["config_hash"] for r in speed}) == 4 and {r["metrics"]["batch_size"] for r in speed} == {1, 2}
    assert all(len(r["metrics"]["latency_ms_per_scale"]) == 10 and r["metrics"]["kv_bytes"] > 0 for r in speed)
    quality = [r for r in records if r["kind"] == "quality" and not r.get("real_data")]
    for r in quality:
        m = r["metrics"]
        assert m["fid_ci95"][0] <= m["fid"] <= m["fid_ci95"][1] and m["num_samples"] == 6
        assert "varbench-cnn" in r["quality"]["extractor"] and "zoo classifier" in r["quality"]["extractor"]
        assert r["weights"] == "random (seed 0)"
        assert r["quality"]["feature_scale"].startswith("centred, unit mean variance")


def test_the_real_data_row_scores_held_out_synthetic_images_like_a_cell(finished, monkeypatch):
    from varbench.harness.eval.quality import score
    from varbench.harness.eval.synthetic import make_dataset
    from varbench.harness.run.reference import study_reference

    out, records = finished
    monkeypatch.setenv("VARBENCH_CACHE", str(out / "cache"))  # the study's cached reference
    (real,) = [r for r in records if r.get("real_data")]
    assert real["label"] == "real data (held-out)" and real["num_samples"] == 6 and real["weights"] is None
    assert real["quality"]["heldout"] == ("synthetic images 1000..1005 of seed 20251123 (the reference holds "
                                          "0..999)")
    q = parse_study(STUDY).quality  # the same numbers as scoring those images by hand against the reference
    images = make_dataset(6, seed=20251123, size=256, start=1000)[0]
    by_hand = score(images, study_reference(q, (256, 256), "cpu"), q.metrics, q.extractor, None, bootstrap=20)
    assert real["metrics"]["fid"] == by_hand["fid"] and real["metrics"]["fid_ci95"] == by_hand["fid_ci95"]
    assert real["metrics"]["isc_mean"] == by_hand["isc_mean"]


def test_samples_are_adm_npz_with_labels_and_seeds(finished):
    out, records = finished
    path = [r for r in records if r["kind"] == "quality"][0]["samples"]
    with np.load(path) as data:
        images, labels = data["arr_0"], data["labels"]
    assert images.shape == (6, 256, 256, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 1000 for i in range(6)]


def test_consistency_compares_with_the_baseline_on_the_same_seeds(finished):
    _, records = finished
    (rec,) = [r for r in records if r["kind"] == "consistency"]
    assert rec["cell"]["sweep"] == {"sample.cfg": 3.0} and rec["baseline"] == "test_var full sample.cfg=1.5"
    assert 0 < rec["metrics"]["psnr_db"] < 100 and -1 <= rec["metrics"]["ssim"] < 1
    fid = {r["label"]: r["metrics"]["fid"] for r in records if r["kind"] == "quality"}
    assert rec["metrics"]["fid_delta"] == pytest.approx(fid[rec["label"]] - fid[rec["baseline"]], rel=1e-6)
    lo, hi = rec["metrics"]["fid_delta_ci95"]
    assert lo <= rec["metrics"]["fid_delta"] <= hi


def test_a_cut_last_line_is_ignored_and_only_its_measurement_is_redone(finished, tmp_path):
    import shutil

    src, records = finished
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    path = out / "records.jsonl"
    text = path.read_bytes()
    last = text.rstrip(b"\n").rsplit(b"\n", 1)[1]
    path.write_bytes(text[: len(text) - len(last) // 2 - 1])  # a crash in the middle of the last append
    assert len(list(load_records(path))) == len(records) - 1
    redone = run_study(parse_study(STUDY), out)
    assert [r["config_hash"] for r in redone] == [records[-1]["config_hash"]]
    again = run_study(parse_study(STUDY), out)
    assert again == []  # nothing left to do
    assert len(list(load_records(path))) == len(records)


def test_table_prints_paper_style_tables_with_a_provenance_footer(finished, capsys):
    out, _ = finished
    assert main(["table", str(out)]) == 0
    text = capsys.readouterr().out
    assert "img/s ↑" in text and "latency ms ↓" in text and "FID ↓" in text and "IS ↑" in text
    assert "PSNR dB ↑" in text and "sample.cfg" in text and "- git:" in text and "- torch:" in text
    assert main(["table", str(out), "--format", "csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0].startswith("variant,KV policy,sample.cfg") and "images_per_s" in csv[0] and len(csv) == 1 + 4 + 3
    assert csv[-1].startswith("real data (held-out),-,")


def test_table_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["table", str(tmp_path / "none")]) == 2
    assert "no records at" in capsys.readouterr().err


def test_two_gloo_ranks_under_torchrun_record_what_one_process_records(tmp_path):
    import subprocess
    import sys

    toml = tmp_path / "study.toml"
    toml.write_text('study = "tiny"\nvariants = ["test_var"]\ndevice = "cpu"\nthreads = 1\n'
                    '[engine]\nprecision = "fp32"\n'
                    '[quality]\nnum_samples = 4\nblock_size = 1\nmetrics = ["fid", "isc"]\n'
                    'extractor = "varbench-cnn"\nreference = "synthetic"\nbootstrap = 20\n')
    one = run_study(load_study(toml, ["speed=false"]), tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "varbench.harness.cli", "run", str(toml), "--set", "speed=false", "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = list(load_records(tmp_path / "two"))
    assert [r["kind"] for r in two] == ["quality", "quality"]  # rank 0 alone writes records (the cell, real data)
    with np.load(one[0]["samples"]) as a, np.load(two[0]["samples"]) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    # the same images give the same scores (to float64 summation order across processes)
    for key in ("fid", "isc_mean"):
        assert two[0]["metrics"][key] == pytest.approx(one[0]["metrics"][key], rel=1e-6)


def test_speed_reference_times_every_cell_in_the_reference_mode_too(tmp_path):
    base = {**STUDY, "variants": ["test_var"], "kv_policies": ["full", "streaming"], "sweep": {}, "quality": False,
            "speed": {"batch_sizes": [1], "warmup": 0, "repeats": 1}}
    first = run_study(parse_study(base), tmp_path)
    assert [r["label"] for r in first] == ["test_var full", "test_var streaming"]
    both = {**base, "speed": {**base["speed"], "reference": True}}
    added = run_study(parse_study(both), tmp_path)  # resumes: the engine records stand, the reference ones are new
    assert [(r["label"], r["engine"]["static_kv_cache"]) for r in added] == [("test_var full", False),
                                                                           ("test_var streaming", False)]
    assert all(not any(v for k, v in r["engine"].items() if k != "precision") for r in added)
    assert {r["baseline"] for r in first + added} == {"test_var full"}
    assert run_study(parse_study(both), tmp_path) == []


def test_a_batch_that_does_not_fit_is_skipped_with_a_warning_and_retried_by_a_rerun(tmp_path, monkeypatch, caplog):
    import varbench.harness.run.bench as bench

    real = bench.bench_variant

    def small_memory(variant, batch, *args, **kwargs):
        if batch > 1:
            raise bench.BatchTooLargeError(f"batch {batch} does not fit in cpu memory; try a smaller batch, e.g. 1")
        return real(variant, batch, *args, **kwargs)

    study = {**STUDY, "quality": False, "sweep": {}, "speed": {"batch_sizes": [1, 2], "warmup": 0, "repeats": 1}}
    monkeypatch.setattr(bench, "bench_variant", small_memory)
    first = run_study(parse_study(study), tmp_path)
    assert [r["batch_size"] for r in first] == [1]
    assert "test_var full: batch 2 does not fit in cpu memory" in caplog.text
    monkeypatch.setattr(bench, "bench_variant", real)
    assert [r["batch_size"] for r in run_study(parse_study(study), tmp_path)] == [2]  # retried, not recorded as done
