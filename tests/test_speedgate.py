"""The speed gate's logic on synthetic pytest-benchmark reports: a 2× slowdown fails, unchanged numbers pass,
and each benchmark is divided by the references it names."""

import json
import math

import pytest

from varbench.harness.run.speedgate import judge, main, ratios

MATMUL, CONV = "test_reference_matmul", "test_reference_conv"
BASE = {MATMUL: 0.020, CONV: 0.050, "test_tokens_test_var[engine]": 0.70, "test_vae_decode": 0.30}
REFS = {"test_tokens_test_var[engine]": [MATMUL], "test_vae_decode": [CONV]}


def _report(times: dict[str, float], refs: dict[str, list[str]] = REFS) -> dict:
    return {"benchmarks": [{"name": n, "stats": {"min": t, "median": t * 1.1},
                            "extra_info": {"reference": refs[n]} if n in refs else {}} for n, t in times.items()]}


def _files(tmp_path, measured: dict[str, float]):
    expected = tmp_path / "expected.json"
    run = tmp_path / "run.json"
    (tmp_path / "base.json").write_text(json.dumps(_report(BASE)))
    assert main([str(tmp_path / "base.json"), "--expected", str(expected), "--update"]) == 0
    run.write_text(json.dumps(_report(measured)))
    return run, expected


def test_ratios_divide_by_the_named_references_of_the_same_run():
    assert ratios(_report(BASE)) == {"test_tokens_test_var[engine]": pytest.approx(35.0),
                                     "test_vae_decode": pytest.approx(6.0)}
    both = ratios(_report(BASE, {"test_vae_decode": [MATMUL, CONV]}))  # geometric mean; no name: all of them
    assert both["test_vae_decode"] == pytest.approx(0.30 / math.sqrt(0.020 * 0.050))
    assert both["test_tokens_test_var[engine]"] == pytest.approx(0.70 / math.sqrt(0.020 * 0.050))
    with pytest.raises(KeyError, match="no reference benchmark"):
        ratios(_report({"x": 1.0}))
    with pytest.raises(KeyError, match=r"test_vae_decode is judged against \['test_reference_conv'\]"):
        ratios(_report({MATMUL: 0.02, "test_vae_decode": 0.3}))


def test_unchanged_numbers_pass_and_a_uniformly_slower_machine_passes(tmp_path, capsys):
    run, expected = _files(tmp_path, BASE)
    assert main([str(run), "--expected", str(expected)]) == 0
    slower_machine = {k: 2.5 * v for k, v in BASE.items()}  # everything, the references too: not a regression
    run, expected = _files(tmp_path, slower_machine)
    assert main([str(run), "--expected", str(expected)]) == 0
    assert "speed gate passed" in capsys.readouterr().out


def test_a_cpu_with_slower_convolutions_moves_only_the_decode_and_its_reference(tmp_path, capsys):
    conv_poor = {**BASE, CONV: 3 * BASE[CONV], "test_vae_decode": 3 * BASE["test_vae_decode"]}
    run, expected = _files(tmp_path, conv_poor)
    assert main([str(run), "--expected", str(expected)]) == 0


def test_an_injected_2x_slowdown_fails(tmp_path, capsys):
    run, expected = _files(tmp_path, {**BASE, "test_vae_decode": 2 * BASE["test_vae_decode"]})
    assert main([str(run), "--expected", str(expected)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: test_vae_decode" in out and "test_tokens_test_var" not in out.split("FAILED")[1]


def test_verdicts_for_new_missing_and_noise_within_threshold():
    rows = {r["benchmark"]: r for r in judge({"a": 1.5, "b": 1.0}, {"a": 1.0, "c": 1.0}, threshold=1.6)}
    assert rows["a"]["status"] == "ok" and rows["a"]["change"] == pytest.approx(1.5)
    assert rows["b"]["status"] == "new" and rows["c"]["status"] == "missing"
    assert judge({"a": 1.7}, {"a": 1.0}, threshold=1.6)[0]["status"] == "slower"
