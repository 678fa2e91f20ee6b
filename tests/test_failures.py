"""Issue 13's quiet failures, each a test: the study runner and the CLI refuse bad input before measuring,
with a message that names the problem, the value and the valid choices (CLI: exit code 2, one line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import varbench.harness.core.records as records_module
import varbench.harness.run.bench as bench_module
from varbench.harness.cli import main
from varbench.harness.core.records import append_record, load_records
from varbench.harness.core.registry import VARIANTS, create_variant
from varbench.harness.run.config import parse_study
from varbench.harness.run.study import run_study

# var_zoo_d1: the trained zoo's smallest model (64 px, 7 scales): a cell in about a second on the CPU.
SPEED = {"study": "f", "variants": ["var_zoo_d1"], "device": "cpu", "threads": 1, "engine": {"precision": "fp32"},
         "speed": {"batch_sizes": [2], "warmup": 0, "repeats": 1}}
QUALITY = {"num_samples": 4, "block_size": 4, "metrics": ["isc"], "extractor": "varbench-cnn", "bootstrap": 0,
           "consistency": False}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))


def _toml(path: Path, extra: str = "") -> Path:
    path.write_text('study = "f"\nvariants = ["var_zoo_d1"]\ndevice = "cpu"\nthreads = 1\n' + extra +
                    '[engine]\nprecision = "fp32"\n[speed]\nbatch_sizes = [2]\nwarmup = 0\nrepeats = 1\n')
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# 1 -------------------------------------------------------------------------------------------------------
def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding `<out>/.lock` as a running study does (flock, its pid inside)."""
    out.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_held_folder_is_refused_naming_folder_and_pid(tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        with pytest.raises(OSError, match=rf"output folder {out} is in use by another varbench run "
                                          rf"\(pid {holder.pid}\)"):
            run_study(parse_study(SPEED), out)
        assert main(["run", str(_toml(tmp_path / "s.toml")), "--out", str(out)]) == 2
        assert f"pid {holder.pid}" in _one_line_error(capsys)
        assert not (out / "records.jsonl").exists()  # refused before measuring
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    records = run_study(parse_study(SPEED), out)  # a killed holder leaves no stale lock
    assert [r["kind"] for r in records] == ["speed"]
    assert (out / ".lock").read_text().strip() == str(os.getpid())


# 2 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("table, message", [
    ({"kv_policies": ["full", "streaming"], "kv_args": {"streamng": {"budget": 0.2}}},
     r"\[kv_args.streamng\]: no KV policy is called 'streamng' \(did you mean kv_args.streaming\?\)"),
    ({"variant_args": {"var_zoo_d9": {"weights": "random"}}},
     r"\[variant_args.var_zoo_d9\]: no variant is called 'var_zoo_d9' \(did you mean variant_args.var_zoo_d"),
    ({"kv_policies": ["full", "streaming"], "sweep": {"kv_args.streamng.budget": [0.1, 0.2]}},
     r"\[kv_args.streamng\].*did you mean kv_args.streaming"),
    ({"kv_policies": ["full", "streaming"], "kv_args": {"streaming": {"budgt": 0.2}}},
     r"kv_args.streaming: .*'budgt'.*valid: budget, sink_tokens"),
])
def test_study_tables_and_keys_that_match_nothing_fail_before_any_measurement(tmp_path, table, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_study(parse_study({**SPEED, **table}), out)
    assert not (out / "records.jsonl").exists()  # the `full` cell was not measured first


def test_a_table_for_a_registered_name_the_study_leaves_out_only_warns(caplog, monkeypatch):
    import varbench.harness.run.cells as study_module

    monkeypatch.setattr(study_module, "_WARNED", set())  # each warning is said once per process
    # the default study's [kv_args.streaming] under `--set kv_policies=['full']`: valid, but unused
    study_module.check_names(parse_study({**SPEED, "kv_args": {"streaming": {"budget": 0.2}},
                                          "variant_args": {"var_zoo_d3": {}}}))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("[kv_args.streaming]: KV policy 'streaming' is not in this study (full)" in w for w in warned)
    assert any("[variant_args.var_zoo_d3]: variant 'var_zoo_d3' is not in this study" in w for w in warned)


def test_variant_argument_keys_are_checked_against_the_factory_signature(tmp_path, monkeypatch):
    def sig_var(*, weights: str = "random", seed: int = 0, engine=None, device: str = "cpu", kv_policy=None):
        return create_variant("var_zoo_d1", weights=weights, seed=seed, engine=engine, device=device,
                              kv_policy=kv_policy)

    VARIANTS.list()  # registers the built-ins first
    monkeypatch.setitem(VARIANTS._items, "sig_var", sig_var)
    study = {**SPEED, "variants": ["var_zoo_d1", "sig_var"]}
    with pytest.raises(ValueError, match=r"variant_args.sig_var: unknown key 'sead' \(did you mean 'seed'\?\); "
                                         r"valid keys: weights, seed$"):
        run_study(parse_study({**study, "variant_args": {"sig_var": {"sead": 1}}}), tmp_path / "a")
    with pytest.raises(ValueError, match="variant_args.sig_var: 'device' cannot be a variant argument: the study sets it"):
        run_study(parse_study({**study, "variant_args": {"sig_var": {"device": "cuda"}}}), tmp_path / "b")
    assert not (tmp_path / "a" / "records.jsonl").exists() and not (tmp_path / "b").exists()
    records = run_study(parse_study({**study, "variant_args": {"sig_var": {"seed": 3}}}), tmp_path / "c")
    assert records[0]["weights"].startswith("zoo:var_d1 (sha256 ") and records[1]["weights"] == "random (seed 3)"


# 3 -------------------------------------------------------------------------------------------------------
def _reference_npz(path: Path, size: int) -> str:
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return str(path)


def test_a_reference_of_another_resolution_is_refused_naming_both(tmp_path):
    quality = {**QUALITY, "metrics": ["fid"], "reference": _reference_npz(tmp_path / "ref8.npz", 8)}
    study = parse_study({**SPEED, "speed": False, "quality": quality})
    with pytest.raises(ValueError, match=r"ref8.npz holds 8x8 px images but the samples are 64x64 px"):
        run_study(study, tmp_path / "out")


def test_the_quality_record_names_its_reference_and_resolution(tmp_path):
    ref = _reference_npz(tmp_path / "ref64.npz", 64)
    quality = {**QUALITY, "metrics": ["fid"], "reference": ref}
    rec, real = run_study(parse_study({**SPEED, "speed": False, "quality": quality}), tmp_path / "out")
    assert real["real_data"] and real["label"] == "real data (held-out)"
    assert rec["quality"]["reference"] == ref and rec["quality"]["reference_setting"] == ref
    assert rec["quality"]["reference_resolution"] == "64x64" and np.isfinite(rec["metrics"]["fid"])


# 4 -------------------------------------------------------------------------------------------------------
def test_a_short_write_is_continued_and_a_stalled_one_raises_naming_the_file(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(records_module.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    path = tmp_path / "records.jsonl"
    append_record(path, {"kind": "speed", "metrics": {"x": 1.5}})
    append_record(path, {"kind": "quality"})
    assert [r["kind"] for r in load_records(path)] == ["speed", "quality"]  # whole lines, 7 bytes at a time
    monkeypatch.setattr(records_module.os, "write", lambda fd, data: 0)  # a full disk
    with pytest.raises(OSError, match=rf"could not append a record to {path}: wrote 0 of \d+ bytes"):
        append_record(path, {"kind": "speed"})


def test_an_unwritable_out_fails_before_the_first_measurement(tmp_path, monkeypatch, capsys):
    calls = []
    real = bench_module.bench_variant
    monkeypatch.setattr(bench_module, "bench_variant", lambda *a, **k: calls.append(1) or real(*a, **k))
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"  # below a regular file: no folder can be made there
    with pytest.raises(OSError, match=rf"output folder {out} is not writable"):
        run_study(parse_study(SPEED), out)
    assert main(["run", str(_toml(tmp_path / "s.toml")), "--out", str(out)]) == 2
    assert f"output folder {out} is not writable" in _one_line_error(capsys)
    assert main(["bench", "--variant", "var_zoo_d1", "--weights", "random", "--batch", "1", "--repeats", "1",
                 "--warmup", "0", "--out", str(out)]) == 2
    assert f"output folder {out} is not writable" in _one_line_error(capsys)
    assert calls == []


# 7 -------------------------------------------------------------------------------------------------------
def test_empty_variants_policies_and_nothing_to_measure_are_errors(tmp_path, capsys):
    study = str(_toml(tmp_path / "s.toml"))
    out = tmp_path / "out"
    assert main(["run", study, "--variants=", "--out", str(out)]) == 2
    assert "--variants is empty" in _one_line_error(capsys)
    assert main(["run", study, "--variants", " , ", "--out", str(out)]) == 2
    assert "--variants is empty" in _one_line_error(capsys)
    assert main(["run", study, "--set", "kv_policies=[]", "--out", str(out)]) == 2
    assert "study.kv_policies is empty" in _one_line_error(capsys)
    assert main(["run", study, "--set", "speed=false", "--set", "quality=false", "--out", str(out)]) == 2
    assert "nothing to measure" in _one_line_error(capsys)
    assert not out.exists()


# 8 -------------------------------------------------------------------------------------------------------
def test_a_resumed_quality_record_keeps_the_weights_identity(tmp_path):
    study = parse_study({**SPEED, "speed": False, "quality": QUALITY})
    out = tmp_path / "out"
    (first,) = run_study(study, out)
    assert first["weights"].startswith("zoo:var_d1 (sha256 ")
    path = out / "records.jsonl"
    for drop_note in (False, True):  # True: samples merged by a version that wrote no weights note
        path.write_text("")  # killed after merging the samples, before the quality record
        if drop_note:
            for note in (out / "samples").glob("*.weights.json"):
                note.unlink()
        (again,) = run_study(study, out)
        assert again["weights"] == first["weights"] and again["samples"] == first["samples"]


# 9 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--threads", "-2"], "--threads must be >= 0 (0 = torch's default), got -2"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
    (["--device", "tpu"], "--device 'tpu' is not a device here; valid: cpu, cuda, cuda:N"),
])
def test_bench_arguments_out_of_range_are_one_line_errors(args, message, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", *args, "--out", str(tmp_path)]) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "records.jsonl").exists()


def test_bench_names_a_batch_that_does_not_fit_and_a_smaller_one(tmp_path, capsys, monkeypatch):
    def no_memory(variant, labels, *args, **kwargs):
        raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           f"you tried to allocate {len(labels) * 2**30} bytes.")

    monkeypatch.setattr(bench_module, "generate", no_memory)
    assert main(["bench", "--batch", "100000", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "batch 100000 does not fit in cpu memory" in err and "DefaultCPUAllocator" in err
    suggested = int(err.rsplit("e.g. ", 1)[1])
    assert 1 <= suggested < 100000


def test_bench_json_and_record_name_the_weights(tmp_path, capsys):
    assert main(["bench", "--variant", "var_zoo_d1", "--weights", "random", "--batch", "1", "--repeats", "1",
                 "--warmup", "0", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    (record,) = load_records(tmp_path)
    assert printed["weights"] == record["weights"] == "random (seed 0)"


def test_study_threads_and_bootstrap_out_of_range_fail_at_load():
    with pytest.raises(ValueError, match="threads must be 0 .* or a thread count >= 1, got -3"):
        parse_study({**SPEED, "threads": -3})
    with pytest.raises(ValueError, match="quality.bootstrap must be 0 .* got -1"):
        parse_study({**SPEED, "quality": {**QUALITY, "bootstrap": -1}})


def test_table_skips_records_lines_that_are_not_objects_naming_file_and_line(tmp_path, capsys, caplog):
    assert main(["bench", "--variant", "var_zoo_d1", "--weights", "random", "--batch", "1", "--repeats", "1",
                 "--warmup", "0", "--out", str(tmp_path)]) == 0
    path = tmp_path / "records.jsonl"
    with path.open("a") as f:
        f.write("[1, 2]\n3\n")
    capsys.readouterr()
    assert main(["table", str(path)]) == 0
    assert "var_zoo_d1" in capsys.readouterr().out
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"{path} line 2: skipped, a record is a JSON object, not list",
                      f"{path} line 3: skipped, a record is a JSON object, not int"]


# 11 ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="VmHWM reset is Linux-only")
def test_every_cell_of_a_run_has_a_positive_cpu_peak(tmp_path):
    # the quality pass between the cells leaves freed heap behind: without handing it back to the OS before
    # the VmHWM reset, the second cell ran inside already-resident pages and read a peak of 0
    study = {**SPEED, "variants": ["var_zoo_d2", "var_zoo_d1"], "speed": {"batch_sizes": [4], "warmup": 1,
                                                                         "repeats": 1},
             "quality": {**QUALITY, "num_samples": 8, "block_size": 8}}
    speed = [r for r in run_study(parse_study(study), tmp_path / "out") if r["kind"] == "speed"]
    assert [r["label"] for r in speed] == ["var_zoo_d2 full", "var_zoo_d1 full"]
    for r in speed:
        assert r["metrics"]["memory_method"] == "linux.vmhwm_delta" and r["metrics"]["peak_memory_bytes"] > 2**20
