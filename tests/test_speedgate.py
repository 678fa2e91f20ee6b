"""The speed gate's logic on synthetic pytest-benchmark reports: a 2× slowdown fails, unchanged numbers pass."""

import json

import pytest

from varbench.harness.speedgate import REFERENCE, judge, main, minima, ratios


def _report(times: dict[str, float]) -> dict:
    return {"benchmarks": [{"name": n, "stats": {"min": t, "median": t * 1.1}} for n, t in times.items()]}


BASE = {REFERENCE: 0.020, "test_generate_test_var[engine]": 0.70, "test_vae_decode": 0.12}


def _files(tmp_path, measured: dict[str, float]):
    expected = tmp_path / "expected.json"
    run = tmp_path / "run.json"
    (tmp_path / "base.json").write_text(json.dumps(_report(BASE)))
    assert main([str(tmp_path / "base.json"), "--expected", str(expected), "--update"]) == 0
    run.write_text(json.dumps(_report(measured)))
    return run, expected


def test_ratios_divide_by_the_same_runs_reference():
    got = ratios(minima(_report(BASE)))
    assert got == {"test_generate_test_var[engine]": pytest.approx(35.0), "test_vae_decode": pytest.approx(6.0)}
    with pytest.raises(KeyError, match="reference benchmark"):
        ratios({"x": 1.0})


def test_unchanged_numbers_pass_and_a_uniformly_slower_machine_passes(tmp_path, capsys):
    run, expected = _files(tmp_path, BASE)
    assert main([str(run), "--expected", str(expected)]) == 0
    slower_machine = {k: 2.5 * v for k, v in BASE.items()}  # everything, the reference too: not a regression
    run, expected = _files(tmp_path, slower_machine)
    assert main([str(run), "--expected", str(expected)]) == 0
    assert "speed gate passed" in capsys.readouterr().out


def test_an_injected_2x_slowdown_fails(tmp_path, capsys):
    run, expected = _files(tmp_path, {**BASE, "test_vae_decode": 2 * BASE["test_vae_decode"]})
    assert main([str(run), "--expected", str(expected)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: test_vae_decode" in out and "test_generate_test_var" not in out.split("FAILED")[1]


def test_verdicts_for_new_missing_and_noise_within_threshold():
    rows = {r["benchmark"]: r for r in judge({"a": 1.5, "b": 1.0}, {"a": 1.0, "c": 1.0}, threshold=1.6)}
    assert rows["a"]["status"] == "ok" and rows["a"]["change"] == pytest.approx(1.5)
    assert rows["b"]["status"] == "new" and rows["c"]["status"] == "missing"
    assert judge({"a": 1.7}, {"a": 1.0}, threshold=1.6)[0]["status"] == "slower"
