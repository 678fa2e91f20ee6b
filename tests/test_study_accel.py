"""The study's acceleration axis: cells per acceleration, arguments checked before anything is measured, and
the speed record saying what the method did."""

import pytest

from varbench.harness.core.records import load_records
from varbench.harness.run.cells import check_names, plan
from varbench.harness.run.config import parse_study
from varbench.harness.run.study import run_study

BASE = {"study": "a", "variants": ["test_var"], "device": "cpu", "threads": 1, "engine": {"precision": "fp32"}}


def test_plan_crosses_accelerations_with_policies_and_leaves_hmar_plain():
    study = parse_study({**BASE, "variants": ["test_var", "test_hmar"], "kv_policies": ["full", "streaming"],
                         "accelerations": ["none", "fastvar"]})
    labels = [c.label for c in plan(study)]
    assert labels == ["test_var full", "test_var full fastvar", "test_var streaming", "test_var streaming fastvar",
                      "test_hmar full"]
    plain, fast = plan(study)[:2]
    assert "acceleration" not in plain.describe()  # unaccelerated cells keep the hashes they had
    assert fast.describe()["acceleration"] == "fastvar" and fast.describe()["accel_args"] == {}


def test_each_variant_gets_the_accelerations_of_its_family():
    study = parse_study({**BASE, "variants": ["test_var", "test_llamagen", "test_infinity", "test_hmar"],
                         "accelerations": ["none", "fastvar", "litevar", "sjd"]})
    labels = [c.label for c in plan(study)]
    assert labels == ["test_var full", "test_var full fastvar", "test_var full litevar",
                      "test_llamagen full", "test_llamagen full sjd",
                      "test_infinity full", "test_infinity full fastvar",  # LiteVAR runs on VAR only
                      "test_hmar full"]


def test_a_raster_method_runs_in_a_study_and_records_its_acceptance(tmp_path):
    study = parse_study({**BASE, "variants": ["test_llamagen"], "accelerations": ["none", "sjd"], "quality": None,
                         "speed": {"batch_sizes": [1], "warmup": 0, "repeats": 1}})
    run_study(study, tmp_path)
    plain, sjd = load_records(tmp_path / "records.jsonl")
    assert "accel_report" not in plain["metrics"]
    report = sjd["metrics"]["accel_report"]
    assert sum(report["tokens_per_step"]) == 16 * 16  # every token of the 16x16 map, some steps taking several
    assert report["network_evals"] == len(report["tokens_per_step"]) < 16 * 16
    assert report["acceptance_rate"] == report["drafts_accepted"] / report["drafts_proposed"] > 0


def test_accel_args_are_checked_before_measuring():
    with pytest.raises(ValueError, match="accel_args.fastvar: .*'bogus'.*valid: "):
        check_names(parse_study({**BASE, "accelerations": ["fastvar"], "accel_args": {"fastvar": {"bogus": 1}}}))
    with pytest.raises(ValueError, match=r"no acceleration is called 'fastvr' \(did you mean accel_args.fastvar\?\)"):
        check_names(parse_study({**BASE, "accelerations": ["fastvar"], "accel_args": {"fastvr": {}}}))
    with pytest.raises(KeyError, match="fastvr.*Did you mean: fastvar"):
        check_names(parse_study({**BASE, "accelerations": ["fastvr"]}))
    with pytest.raises(ValueError, match="study.accelerations is empty"):
        parse_study({**BASE, "accelerations": []})


def test_an_accelerated_speed_record_says_what_the_method_did(tmp_path):
    study = parse_study({**BASE, "accelerations": ["none", "skipvar"], "quality": None,
                         "speed": {"batch_sizes": [2], "warmup": 0, "repeats": 1}})
    run_study(study, tmp_path)
    plain, skipped = load_records(tmp_path / "records.jsonl")
    assert "acceleration" not in plain["metrics"] and skipped["cell"]["acceleration"] == "skipvar"
    assert skipped["metrics"]["acceleration"] == "skipvar" and skipped["metrics"]["accel_args"]
    assert isinstance(skipped["metrics"]["accel_report"], dict) and skipped["metrics"]["accel_report"]
    assert skipped["label"] == "test_var full skipvar"
