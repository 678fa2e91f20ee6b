"""Study files: validation against the dataclasses, overrides, sweeps and the cell plan."""

import pytest

from varbench.harness.run.config import QualityConfig, apply_overrides, load_study, parse_study, sweep_points
from varbench.harness.run.study import check_names, plan

BASE = {"study": "s", "variants": ["test_var"]}


def test_a_bad_key_names_the_valid_keys_and_the_closest():
    with pytest.raises(ValueError, match=r"unknown key 'quality.num_sample' \(did you mean 'quality.num_samples'\?\)"
                                         r"; valid keys: num_samples, block_size"):
        parse_study({**BASE, "quality": {"num_sample": 4}})
    with pytest.raises(ValueError, match="unknown key 'variant'.*valid keys: study, variants, kv_policies"):
        parse_study({"study": "s", "variant": ["test_var"]})


def test_bad_values_name_the_field_and_what_it_needs():
    with pytest.raises(ValueError, match=r"engine.precision: 'fp8' is not one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
        parse_study({**BASE, "engine": {"precision": "fp8"}})
    with pytest.raises(ValueError, match="speed.repeats: expected int, got 'ten'"):
        parse_study({**BASE, "speed": {"repeats": "ten"}})
    with pytest.raises(ValueError, match=r"speed.batch_sizes\[1\]: expected int, got 2.5"):
        parse_study({**BASE, "speed": {"batch_sizes": [1, 2.5]}})
    with pytest.raises(ValueError, match="unknown quality metric.*'fdi'.*valid: \\['fid', 'kid', 'isc', 'prc', 'clip'\\]"):
        parse_study({**BASE, "quality": {"metrics": ["fdi"]}})
    with pytest.raises(ValueError, match="missing key"):
        parse_study({"study": "s"})


def test_values_are_typed_and_tuples_and_floats_coerced():
    study = parse_study({**BASE, "sample": {"cfg": 2, "top_k": [1, 2, 3]}, "speed": {"batch_sizes": [4]},
                         "quality": {"num_samples": 8}})
    assert study.sample.cfg == 2.0 and isinstance(study.sample.cfg, float)
    assert study.sample.top_k == (1, 2, 3) and study.speed.batch_sizes == (4,)
    assert study.quality == QualityConfig(num_samples=8)


def test_overrides_parse_toml_values_and_check_keys(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('study = "s"\nvariants = ["test_var"]\n[speed]\nrepeats = 3\n')
    study = load_study(path, ["speed.repeats=7", "quality.num_samples=12", "quality.reference=/data/ref.npz",
                              "sample.top_k=[1, 2]", "kv_args.streaming.budget=0.1"])
    assert study.speed.repeats == 7 and study.quality.num_samples == 12
    assert study.quality.reference == "/data/ref.npz" and study.sample.top_k == (1, 2)
    assert study.kv_args == {"streaming": {"budget": 0.1}}
    with pytest.raises(ValueError, match="unknown key 'speed.repeat' \\(did you mean 'speed.repeats'"):
        apply_overrides({}, ["speed.repeat=3"])
    with pytest.raises(ValueError, match="write key=value"):
        apply_overrides({}, ["speed.repeats"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_study(tmp_path / "nope.toml")
    (tmp_path / "broken.toml").write_text("study = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_study(tmp_path / "broken.toml")


def test_sweeps_expand_to_a_cartesian_plan_with_the_point_applied():
    study = parse_study({**BASE, "variants": ["test_var", "var_d16"],
                         "sweep": {"sample.cfg": [1.0, 2.0], "kv_args.full.unused": [1, 2, 3]}})
    assert len(sweep_points(study)) == 6
    cells = plan(study)
    assert len(cells) == 12 and cells[0].variant == "test_var" and cells[1].variant == "var_d16"
    assert {c.config.sample.cfg for c in cells} == {1.0, 2.0}
    assert cells[-1].kv_args == {"unused": 3} and cells[-1].label == "var_d16 full sample.cfg=2.0 kv_args.full.unused=3"
    # an axis of another variant's arguments does not multiply this variant's cells
    study = parse_study({**BASE, "variants": ["test_var", "var_d16"],
                         "sweep": {"variant_args.var_d16.seed": [1, 2, 3]}})
    labels = [c.label for c in plan(study)]
    assert labels == ["test_var full", "var_d16 full variant_args.var_d16.seed=1",
                      "var_d16 full variant_args.var_d16.seed=2", "var_d16 full variant_args.var_d16.seed=3"]
    with pytest.raises(ValueError, match="unknown key 'sample.cgf'"):
        parse_study({**BASE, "sweep": {"sample.cgf": [1.0]}})


def test_unknown_variant_or_policy_gets_did_you_mean():
    with pytest.raises(KeyError, match="Unknown variant 'var_d61'. Did you mean"):
        check_names(parse_study({**BASE, "variants": ["var_d61"]}))
    with pytest.raises(KeyError, match="Unknown KV policy 'ful'. Did you mean: full"):
        check_names(parse_study({**BASE, "kv_policies": ["ful"]}))


def test_the_embedded_default_study_is_valid():
    from varbench.harness.cli import default_study_path

    study = load_study(default_study_path())
    check_names(study)
    assert study.device == "cpu" and study.quality.extractor == "varbench-cnn"


def test_missing_scoring_files_fail_before_any_sampling(tmp_path, monkeypatch):
    monkeypatch.delenv("VARBENCH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth.*extractor_weights"):
        check_names(parse_study({**BASE, "quality": {"reference": "synthetic"}}))
    with pytest.raises(FileNotFoundError, match="quality.reference '/no/ref.npz' does not exist"):
        check_names(parse_study({**BASE, "quality": {"extractor": "varbench-cnn", "reference": "/no/ref.npz"}}))
    with pytest.raises(ValueError, match="quality.reference is not set"):
        check_names(parse_study({**BASE, "quality": {"extractor": "varbench-cnn"}}))


def test_a_variant_without_kv_cache_runs_with_one_policy_only():
    study = parse_study({**BASE, "variants": ["test_var", "test_hmar"], "kv_policies": ["full", "streaming"]})
    assert [c.label for c in plan(study)] == ["test_var full", "test_var streaming", "test_hmar full"]


def test_the_engine_table_is_the_variants_engine_config():
    # One engine configuration from the TOML to the model: every feature is a study key, "auto" resolves per device.
    from varbench.variants.engine import EngineConfig

    study = parse_study({**BASE, "engine": {"static_kv_cache": False, "cuda_graphs": True}})
    assert isinstance(study.engine, EngineConfig) and study.engine.static_kv_cache is False
    assert study.engine.resolved("cpu").precision == "fp32" and study.engine.resolved("cuda:0").precision == "bf16"
    assert EngineConfig("fp16").resolved("cuda") == EngineConfig("fp16")
    with pytest.raises(ValueError, match="unknown key 'engine.static_cache'.*did you mean 'engine.static_kv_cache'"):
        parse_study({**BASE, "engine": {"static_cache": False}})
    with pytest.raises(ValueError, match="engine.compile must be true or false"):
        EngineConfig(compile="yes")
