"""Tests of harness/run/shard.py: samples do not depend on the number of ranks, killed runs resume without
redoing finished shards, and foreign or corrupt shards are never mixed into a result."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from varbench.harness import SampleConfig, create_variant
from varbench.harness.run.shard import (REPORT_PREFIX, CorruptSamplesError, block_seed, load_merged, merge_shards,
                                        sample_shards, shard_path)

ENTRY = ["-m", "varbench.harness.run.shard", "--variant", "test_var", "--seed", "0", "--threads", "1"]


def _in_process(out: Path, num_samples: int, block_size: int, seed: int = 0,
                sampling: SampleConfig = SampleConfig()) -> list[int]:
    """Samples in this process at 1 thread, like every rank of the subprocess runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sample_shards(create_variant("test_var"), out, num_samples, block_size, seed, sampling)
    finally:
        torch.set_num_threads(threads)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _reports(stderr: str) -> list[dict]:
    return [json.loads(line.split(REPORT_PREFIX, 1)[1]) for line in stderr.splitlines() if REPORT_PREFIX in line]


def _tmp_files(*folders: Path) -> list[str]:
    return [name for folder in folders for name in os.listdir(folder) if name.endswith(".tmp")]


@pytest.fixture(scope="module")
def ref6(tmp_path_factory) -> Path:
    """An uninterrupted single-process run: 6 samples in blocks of 2, merged."""
    out = tmp_path_factory.mktemp("ref") / "samples"
    assert _in_process(out, 6, 2) == [0, 1, 2]
    merge_shards(out, 6, 2)
    return out


def test_single_process_layout(ref6: Path):
    merged = _load(ref6.parent / "samples.npz")
    assert merged["arr_0"].shape == (6, 256, 256, 3) and merged["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(merged["indices"], np.arange(6))
    np.testing.assert_array_equal(merged["labels"], np.arange(6) % 1000)
    np.testing.assert_array_equal(merged["g_seeds"], [0, 0, 2, 2, 4, 4])
    assert not np.array_equal(merged["arr_0"][0], merged["arr_0"][1])  # not one image repeated
    shard = _load(shard_path(ref6, 1))
    assert int(shard["g_seed"]) == block_seed(0, 1, 2) == 2
    np.testing.assert_array_equal(shard["arr_0"], merged["arr_0"][2:4])
    manifest = json.loads((ref6 / "manifest.json").read_text())
    assert (manifest["num_samples"], manifest["block_size"], manifest["seed"]) == (6, 2, 0)
    assert manifest["sampling"]["top_k"] == 900 and manifest["variant"] == "var_d2"


def test_two_ranks_match_one(ref6: Path, tmp_path: Path):
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *ENTRY, "--num-samples", "6", "--block-size", "2", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    generated = {r["rank"]: r["generated"] for r in _reports(run.stderr)}
    assert generated == {0: [0, 2], 1: [1]}  # blocks dealt round-robin
    ours, theirs = _load(tmp_path / "samples.npz"), _load(ref6.parent / "samples.npz")
    for key in ("arr_0", "labels", "indices", "g_seeds"):
        assert np.array_equal(ours[key], theirs[key]), key
    assert not _tmp_files(out, tmp_path)


def test_killed_run_resumes(tmp_path: Path):
    out = tmp_path / "samples"
    cmd = [sys.executable, *ENTRY, "--num-samples", "8", "--block-size", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("shard_*.npz"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shards after 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    finished = {int(p.stem.split("_")[1]): p.stat() for p in out.glob("shard_*.npz")}
    assert 2 <= len(finished) < 8, "the kill came too late to test resuming"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [report] = _reports(rerun.stderr)
    assert report["generated"] == sorted(set(range(8)) - set(finished))
    for b, before in finished.items():
        after = shard_path(out, b).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"block {b} rewritten"
    assert not _tmp_files(out, tmp_path)

    whole = tmp_path / "whole"
    _in_process(whole, 8, 1)
    resumed, uninterrupted = _load(tmp_path / "samples.npz"), _load(merge_shards(whole, 8, 1))
    for key in ("arr_0", "labels", "indices", "g_seeds"):
        assert np.array_equal(resumed[key], uninterrupted[key]), key


def test_mismatched_manifest_refused(ref6: Path, tmp_path: Path):
    out = tmp_path / "samples"
    shutil.copytree(ref6, out)
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match="different run.*seed"):
        _in_process(out, 6, 2, seed=1)
    with pytest.raises(ValueError, match="different run.*sampling"):
        _in_process(out, 6, 2, sampling=SampleConfig(top_k=10))
    with pytest.raises(ValueError, match="different run.*block_size"):
        _in_process(out, 6, 3)
    with pytest.raises(ValueError, match="block_size"):
        merge_shards(out, 6, 3)
    assert sorted(os.listdir(out)) == before  # nothing written or removed


def test_corrupt_shard_regenerated(ref6: Path, tmp_path: Path, caplog):
    out = tmp_path / "samples"
    shutil.copytree(ref6, out)
    bad = shard_path(out, 1)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a shard cut short
    with pytest.raises(RuntimeError, match=r"missing or corrupt: \[1\]"):
        merge_shards(out, 6, 2)
    with caplog.at_level(logging.WARNING, logger="varbench.harness.run.shard"):
        assert _in_process(out, 6, 2) == [1]  # only the corrupt block is redone
    assert any("shard_000001.npz is corrupt" in r.getMessage() for r in caplog.records)
    redone, ref = _load(merge_shards(out, 6, 2)), _load(ref6.parent / "samples.npz")
    assert np.array_equal(redone["arr_0"], ref["arr_0"])


def test_merge_lists_missing_blocks(ref6: Path, tmp_path: Path):
    out = tmp_path / "samples"
    shutil.copytree(ref6, out)
    shard_path(out, 0).unlink()
    shard_path(out, 2).unlink()
    with pytest.raises(RuntimeError, match=r"2 blocks missing or corrupt: \[0, 2\]"):
        merge_shards(out, 6, 2)
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "wrong array"])
def test_corrupt_merged_file_rebuilt_from_shards(ref6: Path, tmp_path: Path, damage: str, caplog):
    out = tmp_path / "samples"
    shutil.copytree(ref6, out)
    merged, ref = tmp_path / "samples.npz", _load(ref6.parent / "samples.npz")["arr_0"]
    if damage == "random bytes":
        merged.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        whole = (ref6.parent / "samples.npz").read_bytes()
        merged.write_bytes(whole[: len(whole) // 2])
    else:  # a readable archive whose images are float, not uint8
        np.savez(merged, arr_0=np.zeros((6, 4, 4, 3), np.float32))
    with caplog.at_level(logging.WARNING, logger="varbench.harness.run.shard"):
        images = load_merged(merged, expected=6)
    np.testing.assert_array_equal(images, ref)
    np.testing.assert_array_equal(_load(merged)["arr_0"], ref)  # the file on disk is whole again
    assert any("samples.npz was unusable" in r.getMessage() for r in caplog.records)


def test_corrupt_merged_file_without_shards_named(ref6: Path, tmp_path: Path):
    merged = tmp_path / "samples.npz"
    whole = (ref6.parent / "samples.npz").read_bytes()
    merged.write_bytes(whole[: len(whole) // 3])  # no shard folder beside it
    with pytest.raises(CorruptSamplesError, match=rf"{merged}.*not an .npz archive.*no shard folder.*Delete {merged}"):
        load_merged(merged)
    out = tmp_path / "samples"
    shutil.copytree(ref6, out)
    shard_path(out, 1).unlink()  # shards there, but one block missing: cannot rebuild either
    with pytest.raises(CorruptSamplesError, match=r"missing or corrupt: \[1\].*to sample again"):
        load_merged(merged)
    np.savez(merged, arr_0=np.zeros((5, 4, 4, 3), np.uint8))
    with pytest.raises(CorruptSamplesError, match="holds 5 images, not the 6 expected"):
        load_merged(merged, expected=6)
