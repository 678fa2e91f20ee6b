"""The GPU check (harness/run/gpucheck.py) end to end in its CPU dry mode, and its failure handling."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from varbench.harness.run import gpucheck
from varbench.harness.run.gpucheck import Check, Outcome, Step, main, plan_steps, run_check

CONFORMANCE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
CUDA_ONLY = ("kernel:block_sparse_attention_bf16", "kernel:compact_kv_bf16", "bench:d16_b1_bf16_cuda_graphs",
             "bench:d16_b1_bf16_compile", "bench:d16_b1_bf16_compile_cuda_graphs")
MEASURED = ("bench:d16_b1_bf16_eager", "bench:d16_b64_bf16", "reference:d16_b64_bf16", "bench:d30_b64_bf16",
            "code:d30_d16_N8_b64_bf16", "hmar:d16_b64_bf16", "kv:full_d16_b64_bf16", "kv:h2o_d16_b64_bf16",
            "kv:hack_d16_b64_bf16", "kv:pyramidkv_d16_b64_bf16", "kv:scalekv_d16_b64_bf16",
            "kv:snapkv_d16_b64_bf16", "kv:streaming_d16_b64_bf16")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def _fixtures(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """A fixture folder linking some of ../shared/conformance's families (the cheapest, and one that no
    checker supports); a clone without ../shared gets an empty one and no conformance step."""
    folder = tmp_path / "fixtures"
    folder.mkdir()
    for name in names:
        if (CONFORMANCE / name / "meta.json").is_file():
            (folder / name).symlink_to(CONFORMANCE / name)
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, list[dict], int, list[str]]:
    tmp = tmp_path_factory.mktemp("gpucheck")
    fixtures = _fixtures(tmp, ("hmar_d2", "llamagen_tiny"))
    out = tmp / "out"
    rc = main(["--device", "cpu", "--out", str(out), "--fixtures", str(fixtures)])
    steps = [s.name for s in plan_steps(Check("cpu", out, True, fixtures=fixtures))]
    return out, _records(out), rc, steps


def test_dry_run_writes_one_record_per_step(dry_run) -> None:
    out, records, rc, steps = dry_run
    assert rc == 0
    assert [r["step"] for r in records] == steps  # every step, by name, in order, once
    for name in (*CUDA_ONLY, *MEASURED, "numerics:d16_engine_vs_reference"):
        assert name in steps
    assert not [r["step"] for r in records if r["kind"] == "error"]
    assert {r["study"] for r in records} == {"gpucheck"} and {r["mode"] for r in records} == {"dry"}
    summary = (out / "summary.md").read_text()
    assert "GPU check (dry" in summary and "kv:scalekv_d16_b64_bf16" in summary and "Speed (p50" in summary


def test_dry_run_measures_every_speed_step(dry_run) -> None:
    _, records, _, _ = dry_run
    by_step = {r["step"]: r for r in records}
    for name in MEASURED:
        rec = by_step[name]
        assert rec["kind"] == "speed", (name, rec["metrics"])
        assert rec["metrics"]["images_per_s"] > 0 and rec["metrics"]["latency_ms_p50"] > 0
        assert rec["precision"] == "fp32"  # bf16 on a CPU is emulated: the dry run measures fp32
    # tiny stand-ins: d16 -> depth 2, d30 -> depth 3, batch 64 -> 2
    assert by_step["bench:d16_b64_bf16"]["metrics"]["depth"] == 2
    assert by_step["bench:d30_b64_bf16"]["metrics"]["depth"] == 3
    assert by_step["bench:d16_b64_bf16"]["metrics"]["batch_size"] == 2
    assert by_step["reference:d16_b64_bf16"]["engine"]["static_kv_cache"] is False
    assert by_step["reference:d16_b64_bf16"]["metrics"]["speedup_engine_vs_reference"] > 0
    code = by_step["code:d30_d16_N8_b64_bf16"]["metrics"]
    assert code["draft_steps"] == 8 and set(code["latency_ms_per_model"]) == {"drafter", "refiner"}
    assert code["speedup_vs_d30"] > 0


def test_dry_run_kv_policies_report_their_memory(dry_run) -> None:
    _, records, _, _ = dry_run
    kv = {r["cell"]["kv_policy"]: r["metrics"] for r in records if r["step"].startswith("kv:")}
    assert set(kv) == {"full", "h2o", "hack", "pyramidkv", "scalekv", "snapkv", "streaming"}
    # depth 2, 2 heads of 64, batch 2 (x2 for guidance), 680 tokens, fp32 keys and values
    assert kv["full"]["kv_bytes"] == 2 * 2 * 4 * 2 * 680 * 64 * 4
    for name, m in kv.items():
        assert m["peak_memory_bytes"] > 0, name
        if name != "full":  # every compressing policy keeps a tenth of the tokens by default
            assert 0 < m["kv_bytes"] < kv["full"]["kv_bytes"] / 5, (name, m["kv_bytes"])
    assert kv["scalekv"]["kv_calibration"] and kv["hack"]["kv_calibration"]


def test_dry_run_skips_cuda_paths_and_checks_numerics(dry_run) -> None:
    _, records, _, _ = dry_run
    by_step = {r["step"]: r for r in records}
    for name in CUDA_ONLY:
        assert by_step[name]["kind"] == "skipped"
        assert by_step[name]["metrics"]["skipped"].startswith("skipped: needs CUDA")
    fp32 = by_step["numerics:d16_engine_vs_reference"]["metrics"]["fp32"]
    assert fp32["token_agreement"] == 1.0 and fp32["first_differing_scale"] is None
    assert fp32["image_max_abs_err"] < 1e-3


def test_dry_run_conformance_steps(dry_run) -> None:
    _, records, _, _ = dry_run
    by_step = {r["step"]: r for r in records}
    if not (CONFORMANCE / "hmar_d2" / "meta.json").is_file():
        pytest.skip(f"{CONFORMANCE} not present: the dry run had no conformance step")
    hmar = by_step["conformance:hmar_d2"]
    assert hmar["kind"] == "conformance" and hmar["metrics"]["passed"] is True
    assert hmar["metrics"]["n_checks"] > 100 and hmar["metrics"]["n_failed"] == 0
    if (CONFORMANCE / "llamagen_tiny" / "meta.json").is_file():  # every fixture family has a checker now
        llamagen = by_step["conformance:llamagen_tiny"]
        assert llamagen["kind"] == "conformance" and llamagen["metrics"]["passed"] is True


@pytest.mark.slow
def test_dry_run_every_fixture_family(tmp_path) -> None:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"{CONFORMANCE} not present")
    out = tmp_path / "out"
    assert main(["--device", "cpu", "--out", str(out), "--fixtures", str(CONFORMANCE), "--steps", "conformance:*"]) == 0
    records = _records(out)
    assert {r["step"] for r in records} == {f"conformance:{p.name}" for p in CONFORMANCE.iterdir()
                                            if (p / "meta.json").is_file()}
    assert all(r["metrics"]["passed"] for r in records if r["kind"] == "conformance")


# -- failure handling --------------------------------------------------------------------------------
def _raise(check: Check) -> Outcome:
    return Outcome("kernel", {"value": 1 / 0})


def _sleep(check: Check) -> Outcome:
    time.sleep(5)
    return Outcome("kernel", {"pass": True})


def _ok(check: Check) -> Outcome:
    return Outcome("kernel", {"pass": True})


def test_a_failing_step_is_recorded_and_the_check_goes_on(tmp_path) -> None:
    check = Check("cpu", tmp_path, dry=False)  # not dry: budgets are enforced
    steps = [Step("broken", _raise, 10), Step("slow", _sleep, 0.5), Step("fine", _ok, 10)]
    t0 = time.monotonic()
    records = run_check(check, steps, log=lambda line: None)
    assert time.monotonic() - t0 < 4  # the slow step was stopped at twice its budget, not after 5 s
    assert [r["kind"] for r in records] == ["error", "error", "kernel"]
    assert "ZeroDivisionError" in records[0]["metrics"]["traceback"]
    assert records[1]["metrics"]["error"].startswith("StepTimeout: stopped after 1 s")
    assert _records(tmp_path) == records and (tmp_path / "summary.md").is_file()


def test_steps_past_the_time_limit_are_recorded_as_skipped(tmp_path) -> None:
    check = Check("cpu", tmp_path, dry=False, time_limit_s=0.5)
    records = run_check(check, [Step("slow", _sleep, 10), Step("late", _ok, 1)], log=lambda line: None)
    assert records[0]["kind"] == "error" and records[0]["limit_s"] <= 0.5
    assert records[1]["kind"] == "skipped" and "time limit of 0.5 s" in records[1]["metrics"]["skipped"]


def test_checkpoints_are_read_from_ckpt_dir(tmp_path) -> None:
    var_d2 = CONFORMANCE / "var_d2"
    if not (var_d2 / "var_d2.pth").is_file():
        pytest.skip(f"{var_d2} not present")
    out = tmp_path / "out"
    rc = main(["--device", "cpu", "--out", str(out), "--ckpt-dir", str(var_d2), "--fixtures", str(tmp_path),
               "--steps", "bench:d16_b1_bf16_eager,bench:d30_b64_bf16"])
    eager, d30 = _records(out)
    assert rc == 1  # var_d3.pth is missing: an error record, and a non-zero exit
    assert eager["kind"] == "speed" and eager["weights"] == str(var_d2 / "var_d2.pth")
    assert eager["metrics"]["params"] == json.loads((var_d2 / "meta.json").read_text())["var_params"]
    assert d30["kind"] == "error" and "has none of var_d3.pth" in d30["metrics"]["error"]


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device 'tpu' is not a device; valid: cuda, cuda:N, cpu"),
    (["--device", "meta"], "the check runs on cuda or cpu"),
    (["--device", "cpu", "--time-limit", "0"], "--time-limit must be > 0"),
    (["--device", "cpu", "--ckpt-dir", "/nonexistent"], "--ckpt-dir /nonexistent: not a folder"),
])
def test_bad_arguments_get_a_message(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cuda_without_a_gpu_and_unknown_steps_get_a_message(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(gpucheck.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "no CUDA device is visible here" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="matches no step; steps: .*bench:d16_b64_bf16"):
        main(["--device", "cpu", "--out", str(tmp_path), "--steps", "bench:d99*"])


def test_list_prints_budgets_within_eight_minutes(capsys) -> None:
    assert main(["--device", "cpu", "--list", "--fixtures", str(CONFORMANCE)]) == 0
    total = capsys.readouterr().out.strip().splitlines()[-1]
    assert total.startswith("total") and float(total.split()[1]) <= 480
