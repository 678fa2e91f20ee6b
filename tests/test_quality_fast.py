"""The quality evaluator's fast paths (issue 13) give torch-fidelity's numbers: the symmetric FID of the
bootstrap, KID and precision/recall from kernels and distances computed once, the per-process feature memo,
the per-pass timings, and a corrupt reference cache being replaced instead of failing the run."""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from varbench.harness.eval import extractors as ex
from varbench.harness.eval import quality as q
from varbench.harness.eval import resampling as rs
from varbench.harness.eval.tables import results_table

CNN, W = ex.PROJECT_CNN, ex.RANDOM_INIT


def _feats(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Non-negative float32 features (as after a ReLU), one distribution per shift."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g).abs() + shift * torch.rand(d, generator=g)).float()


def _images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _resamples(n: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, size=n) for _ in range(count)]


@pytest.mark.parametrize("d, n, m", [(32, 64, 64), (256, 64, 64), (256, 64, 300)])
def test_fast_fid_equals_torch_fidelity_on_resamples(d: int, n: int, m: int) -> None:
    # n < D at 256-d: both covariances (64 samples) or the generated one alone are rank-deficient
    gen, ref = _feats(n, d, 1, shift=0.5), _feats(m, d, 2)
    ref_stats = {k: v.astype(np.float64) for k, v in fid_features_to_statistics(ref).items()}
    fast = rs.FrechetToReference(ref_stats["mu"], ref_stats["sigma"])
    pool64 = gen.double()
    values = []
    for idx in _resamples(n, 30):
        mu, sigma = rs.weighted_moments(pool64, np.bincount(idx, minlength=n))
        slow = fid_statistics_to_metric({"mu": mu.numpy(), "sigma": sigma.numpy()}, ref_stats, False)
        assert fast(mu, sigma) == pytest.approx(slow[KEY_METRIC_FID], rel=1e-6)
        values.append(slow[KEY_METRIC_FID])
    assert min(values) > 1.0 and np.std(values) > 1e-3  # non-trivial, distinct numbers were compared


def test_score_fid_interval_is_torch_fidelitys_on_every_resample() -> None:
    a, b = _images(48, 1), _images(80, 2)
    ref = q.reference_from_images(b, "b", CNN, W)
    out = q.score(a, ref, ["fid"], CNN, W, bootstrap=25, seed=7)
    pool = ex.extract_features(a, CNN, W)["feat"]
    ref_stats = {"mu": ref.mu, "sigma": ref.sigma}
    draws = [fid_statistics_to_metric(rs.weighted_stats(pool.double(), np.bincount(idx, minlength=48)),
                                      ref_stats, False)[KEY_METRIC_FID] for idx in _resamples(48, 25, seed=7)]
    assert out["fid_ci95"] == pytest.approx(rs.interval(draws, out["fid"]), rel=1e-6)


@pytest.mark.parametrize("n, m, size", [(128, 256, 128), (100, 300, 64), (9, 40, 9)])
def test_kid_from_kernels_computed_once_equals_torch_fidelity(n: int, m: int, size: int) -> None:
    # size 128 and 64 gather the kernels, size 9 recomputes them (OpenBLAS's small-matrix path)
    gen, ref = _feats(n, 256, 3, shift=0.3), _feats(m, 256, 4)
    kernels = rs.KidKernels(gen, ref, size, draws=100, keep=10)
    assert kernels.gather == (size >= rs.KID_GATHER_MIN)

    def theirs(f: torch.Tensor, subsets: int) -> dict[str, float]:
        out = kid_features_to_metric(f, ref, kid_subsets=subsets, kid_subset_size=size, rng_seed=q.TF_RNG_SEED,
                                     verbose=False)
        return {"kid_mean": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"]}

    point, expected = kernels(None, 100), theirs(gen, 100)
    assert point["kid_mean"] > 1e-3  # the two sets differ: a real number was compared
    for key in point:
        assert point[key] == pytest.approx(expected[key], rel=1e-9, abs=0), key
    for idx in _resamples(n, 4):
        got, expected = kernels(idx, 10), theirs(gen[torch.from_numpy(idx)], 10)
        for key in got:
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=0), key


@pytest.mark.parametrize("n, m, d", [(64, 100, 32), (200, 150, 256), (8, 30, 16)])
def test_precision_recall_from_distances_computed_once_equals_torch_fidelity(n: int, m: int, d: int) -> None:
    gen, ref = _feats(n, d, 5, shift=0.4), _feats(m, d, 6)
    prc = rs.PrecisionRecall(gen, ref, q.PRC_NEIGHBORHOOD)

    def theirs(f: torch.Tensor) -> dict[str, float]:
        return prc_features_to_metric(f, ref, prc_neighborhood=q.PRC_NEIGHBORHOOD, prc_batch_size=10000,
                                      save_cpu_ram=True, verbose=False)

    assert prc(None) == theirs(gen)
    resamples = _resamples(n, 12)
    # a sample drawn 4+ times has a k-NN radius of ~0 (its duplicates are its neighbours): include one
    crowded = resamples[0].copy()
    crowded[:5] = crowded[0]
    recalls = set()
    for idx in [crowded, *resamples]:
        assert len(np.unique(idx)) < n  # duplicates in every resample
        got = prc(idx)
        assert got == theirs(gen[torch.from_numpy(idx)])  # exactly: same floats, same comparisons
        recalls.add(got["recall"])
    assert len(recalls) > 1  # resamples moved the number that duplicates affect


def test_score_kid_and_prc_intervals_are_torch_fidelitys_on_every_resample() -> None:
    a, b = _images(70, 3), _images(90, 4)
    ref = q.reference_from_images(b, "b", CNN, W)
    out = q.score(a, ref, ["kid", "prc"], CNN, W, bootstrap=15, seed=2, kid_subsets=20)
    pool = ex.extract_features(a, CNN, W)["feat"]
    draws: dict[str, list[float]] = {"kid_mean": [], "precision": [], "recall": [], "f_score": []}
    for idx in _resamples(70, 15, seed=2):
        f = pool[torch.from_numpy(idx)]
        draws["kid_mean"].append(kid_features_to_metric(f, ref.features, kid_subsets=10, kid_subset_size=70,
                                                        rng_seed=q.TF_RNG_SEED, verbose=False)
                                 ["kernel_inception_distance_mean"])
        for k, v in prc_features_to_metric(f, ref.features, prc_neighborhood=3, prc_batch_size=10000,
                                           save_cpu_ram=True, verbose=False).items():
            draws[k].append(v)
    for key, values in draws.items():
        assert out[f"{key}_ci95"] == pytest.approx(rs.interval(values, out[key]), rel=1e-9), key


def test_features_are_extracted_once_per_set(monkeypatch) -> None:
    calls: list[int] = []

    def counting(images, *args, **kwargs):
        calls.append(len(images))
        return ex.extract_features(images, *args, **kwargs)

    monkeypatch.setattr(q, "_FEATURE_MEMO", OrderedDict())
    monkeypatch.setattr(q, "extract_features", counting)
    a, b = _images(12, 7), _images(12, 8)
    ref = q.reference_from_images(_images(20, 9), "r", CNN, W)
    calls.clear()  # the reference's own extraction is not memoised (it has its disk cache)
    first = q.score(a, ref, ["fid", "isc"], CNN, W, bootstrap=0)
    second = q.score(a, ref, ["fid", "isc"], CNN, W, bootstrap=0)
    assert calls == [12] and first["fid"] == second["fid"]
    q.fid_difference(a, b, ref, CNN, W, bootstrap=0)  # a from the memo, b new
    assert calls == [12, 12]
    q.score(a.copy(), ref, ["isc"], CNN, W, bootstrap=0)  # keyed by content, not by object
    assert calls == [12, 12]
    for seed in range(100, 100 + q.FEATURE_MEMO_SIZE):  # bounded: the oldest entries (b, then a) go
        q.score(_images(4, seed), ref, ["isc"], CNN, W, bootstrap=0)
    assert len(q._FEATURE_MEMO) == q.FEATURE_MEMO_SIZE
    q.score(a, ref, ["isc"], CNN, W, bootstrap=0)
    assert calls[-1] == 12 and len(calls) == 2 + q.FEATURE_MEMO_SIZE + 1


def test_eval_seconds_per_pass_and_tables_accept_them() -> None:
    a, b = _images(16, 10), _images(24, 11)
    ref = q.reference_from_images(b, "b", CNN, W)
    out = q.score(a, ref, ["fid", "kid", "isc", "prc"], CNN, W, bootstrap=3)
    diff = q.fid_difference(a, a[::-1].copy(), ref, CNN, W, bootstrap=3)
    for seconds in (out["eval_seconds"], diff["eval_seconds"]):
        assert set(seconds) == {"features", "point", "bootstrap"}
        assert all(isinstance(v, float) and 0 <= v < 60 for v in seconds.values())
    # the study keeps non-str values in metrics: a dict-valued metric must not upset the tables
    metrics = {k: v for k, v in out.items() if not isinstance(v, str)}
    record = {"kind": "quality", "config_hash": "h", "cell": {"variant": "v"}, "metrics": metrics}
    assert f"{out['fid']:.2f}" in results_table([record]) and "fid" in results_table([record], fmt="csv")


def _cached_reference(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=_images(24, 12))
    ref = q.reference_stats(str(tmp_path / "ref.npz"), CNN, W, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("reference-*.pt")
    return ref, cache_file


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "missing keys"])
def test_corrupt_reference_cache_is_replaced(tmp_path, caplog, damage: str) -> None:
    ref, cache_file = _cached_reference(tmp_path)
    good = cache_file.read_bytes()
    if damage == "random bytes":
        cache_file.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        cache_file.write_bytes(good[: len(good) // 2])
    else:
        torch.save({"mu": torch.from_numpy(ref.mu)}, cache_file)
    with caplog.at_level(logging.WARNING, logger=q.__name__):
        again = q.reference_stats(str(tmp_path / "ref.npz"), CNN, W, tmp_path / "cache")
    assert cache_file.name in caplog.text and "recomputing" in caplog.text
    np.testing.assert_array_equal(again.mu, ref.mu)
    assert torch.equal(again.features, ref.features)
    blob = torch.load(cache_file, weights_only=True)  # the bad file was replaced by a good one
    assert set(q.CACHE_KEYS) <= set(blob) and np.array_equal(blob["sigma"].numpy(), ref.sigma)
