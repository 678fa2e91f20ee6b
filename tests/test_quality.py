"""Quality metrics: `score` against torch-fidelity's `calculate_metrics`, FID properties, bootstrap intervals,
reference sources and the content-hash cache, and the Inception path offline with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics

from varbench.harness.eval import extractors as ex
from varbench.harness.eval import quality as q
from varbench.harness.eval.quality import reference_from_images, reference_stats, score
from varbench.harness.eval.resampling import weighted_stats

CNN = ex.PROJECT_CNN
W = ex.RANDOM_INIT  # the untrained seeded init: these tests compare maths, not the zoo classifier


def _images(n: int, seed: int, size: int = 32, dark: float = 1.0) -> np.ndarray:
    """Horizontal ramps with random per-channel contrast plus noise: one distribution per (size, dark)."""
    r = np.random.default_rng(seed)
    ramp = np.linspace(0, 220, size)[None, None, :, None]
    x = ramp * r.uniform(0.4, 1.0, (n, 1, 1, 3)) + r.normal(0, 25, (n, size, size, 3))
    return np.clip(x * dark + 20, 0, 255).astype(np.uint8)


class _DS(torch.utils.data.Dataset):
    """The plain Dataset torch-fidelity's documentation asks for: bare uint8 CHW tensors."""

    def __init__(self, x: np.ndarray):
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def _tf(a: np.ndarray, b: np.ndarray, **kw) -> dict:
    return torch_fidelity.calculate_metrics(input1=_DS(a), input2=_DS(b), cuda=False, save_cpu_ram=True,
                                            verbose=False, cache=False, **kw)


@pytest.fixture(scope="module")
def sets() -> dict[str, np.ndarray]:
    return {"a": _images(64, 1), "b": _images(64, 2), "dark": _images(64, 3, dark=0.6)}


@pytest.fixture(scope="module")
def ref_b(sets) -> q.Reference:
    return reference_from_images(sets["b"], "b", CNN, W)


def test_score_matches_calculate_metrics(sets, ref_b) -> None:
    out = score(sets["a"], ref_b, ["fid", "kid", "isc", "prc"], CNN, W, bootstrap=0)
    tf = _tf(sets["a"], sets["b"], fid=True, kid=True, isc=True, prc=True, feature_extractor=CNN,
             kid_subset_size=64, kid_subsets=100, isc_splits=10)
    pairs = {"fid": "frechet_inception_distance", "kid_mean": "kernel_inception_distance_mean",
             "kid_std": "kernel_inception_distance_std", "isc_mean": "inception_score_mean",
             "isc_std": "inception_score_std", "precision": "precision", "recall": "recall",
             "f_score": "f_score"}
    for ours, theirs in pairs.items():
        assert out[ours] == pytest.approx(tf[theirs], rel=1e-6, abs=1e-12), ours
    assert out["fid"] > 1e-3 and 0 < out["precision"] <= 1  # non-trivial numbers were compared
    assert out["settings"]["kid_subset_size"] == 64 and out["settings"]["isc_splits"] == 10
    assert out["num_samples"] == 64 and out["num_reference"] == 64
    assert out["extractor"] == "varbench-cnn (random init, seed 0: untrained)"
    assert out["extractor_weights_sha256"] is None and out["fid_ci95"] is None


def test_small_sets_use_smaller_kid_subsets_and_isc_splits(sets, ref_b) -> None:
    a = sets["a"][:9]
    out = score(a, ref_b, ["kid", "isc"], CNN, W, bootstrap=0)
    tf = _tf(a, sets["b"], kid=True, isc=True, feature_extractor=CNN, kid_subset_size=9, isc_splits=4)
    assert out["settings"]["kid_subset_size"] == 9 and out["settings"]["isc_splits"] == 4
    assert out["kid_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-6)
    assert out["isc_mean"] == pytest.approx(tf["inception_score_mean"], rel=1e-6)


def test_fid_properties(sets, ref_b) -> None:
    same = score(sets["b"], ref_b, ["fid"], CNN, W, bootstrap=0)["fid"]
    other = score(sets["a"], ref_b, ["fid"], CNN, W, bootstrap=0)["fid"]
    dark = score(sets["dark"], ref_b, ["fid"], CNN, W, bootstrap=0)["fid"]
    assert abs(same) < 1e-5 and abs(same) < 1e-3 * other  # eigenvalue round-off: -3e-7 seen
    assert dark > 10 * other > 0


def test_bootstrap_interval_and_seed(sets, ref_b) -> None:
    out = score(sets["dark"], ref_b, ["fid", "isc"], CNN, W, bootstrap=25, seed=3)
    lo, hi = out["fid_ci95"]
    assert lo <= out["fid"] <= hi and lo < hi
    assert out["isc_mean_ci95"][0] < out["isc_mean_ci95"][1]
    again = score(sets["dark"], ref_b, ["fid", "isc"], CNN, W, bootstrap=25, seed=3)
    assert again["fid_ci95"] == out["fid_ci95"] and again["isc_mean_ci95"] == out["isc_mean_ci95"]
    assert score(sets["dark"], ref_b, ["isc"], CNN, W, bootstrap=25, seed=4)["isc_mean_ci95"] != \
        out["isc_mean_ci95"]


def test_intervals_contain_the_estimate_even_at_tiny_n(ref_b) -> None:
    # With 8 samples, duplicates in each resample bias FID and KID upward so far that plain percentiles miss
    # the point estimate; the bias-corrected interval is centred on it.
    out = score(_images(8, 5), ref_b, ["fid", "kid"], ex.PROJECT_CNN, W, bootstrap=40, seed=0)
    for key in ("fid", "kid_mean"):
        lo, hi = out[f"{key}_ci95"]
        assert lo <= out[key] <= hi and hi > lo


def test_bootstrap_fid_stats_equal_materialised_resample(sets) -> None:
    # the FID bootstrap uses frequency weights instead of copying rows: same mean and covariance
    feats = ex.extract_features(sets["a"], CNN, W)["feat"]
    idx = np.random.default_rng(0).integers(0, len(feats), len(feats))
    w = weighted_stats(feats.double(), np.bincount(idx, minlength=len(feats)))
    ref = fid_features_to_statistics(feats[torch.from_numpy(idx)].double())
    np.testing.assert_allclose(w["mu"], ref["mu"], rtol=1e-10)
    np.testing.assert_allclose(w["sigma"], ref["sigma"], rtol=1e-9, atol=1e-14)


def test_isc_needs_no_reference_and_errors(sets, ref_b) -> None:
    out = score(sets["a"], None, ["isc"], CNN, W, bootstrap=0)
    assert out["isc_mean"] == pytest.approx(
        _tf(sets["a"], sets["b"], isc=True, feature_extractor=CNN, isc_splits=10)["inception_score_mean"],
        rel=1e-6)
    assert out["reference"] is None
    with pytest.raises(ValueError, match="need a reference"):
        score(sets["a"], None, ["fid"], CNN, W)
    with pytest.raises(ValueError, match="more than 3"):
        score(sets["a"][:3], ref_b, ["prc"], CNN, W)
    with pytest.raises(ValueError, match="unknown quality metric"):
        score(sets["a"], ref_b, ["sfid"], CNN, W)
    with pytest.raises(ValueError, match="uint8"):
        score(sets["a"].astype(np.float32), ref_b, ["fid"], CNN, W)
    with pytest.raises(ValueError, match="N×H×W×3"):
        score(sets["a"][..., :1], ref_b, ["fid"], CNN, W)


def test_reference_sources_and_content_hash_cache(sets, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    p1, p2 = tmp_path / "v1" / "ref.npz", tmp_path / "v2" / "ref.npz"
    np.savez(p1, arr_0=sets["b"])
    np.savez(p2, arr_0=sets["a"])  # same file name, other content
    r1, r2 = reference_stats(str(p1), CNN, W, cache), reference_stats(str(p2), CNN, W, cache)
    assert r1.sha256 != r2.sha256 and not np.allclose(r1.mu, r2.mu)
    assert len(list(cache.glob("reference-*.pt"))) == 2 and not list(cache.glob("*.tmp"))
    assert r1.mu.dtype == np.float64 and r1.sigma.dtype == np.float64 and r1.num_images == 64
    np.testing.assert_allclose(r1.mu, reference_from_images(sets["b"], "b", CNN, W).mu, rtol=1e-12)

    def no_extraction(*args, **kwargs):
        raise AssertionError("a cached reference was recomputed")
    monkeypatch.setattr(q, "extract_features", no_extraction)
    hit = reference_stats(str(p1), CNN, W, cache)
    assert hit.sha256 == r1.sha256 and np.array_equal(hit.mu, r1.mu) and torch.equal(hit.features, r1.features)
    monkeypatch.undo()

    # a folder of PNGs (lossless) gives the same statistics as the npz of the same images
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(sets["b"][:16]):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    rf = reference_stats(str(folder), CNN, W, cache)
    np.testing.assert_allclose(rf.mu, reference_from_images(sets["b"][:16], "x", CNN, W).mu, rtol=1e-6)


def test_reference_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reference_stats(str(tmp_path / "missing.npz"), CNN, W, tmp_path)
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="neither arr_0"):
        reference_stats(str(tmp_path / "bad.npz"), CNN, W, tmp_path)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        reference_stats(str(tmp_path / "float.npz"), CNN, W, tmp_path)
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="N×H×W×3"):
        reference_stats(str(tmp_path / "gray.npz"), CNN, W, tmp_path)
    np.savez(tmp_path / "adm.npz", mu=np.zeros(256), sigma=np.eye(256))
    with pytest.raises(ValueError, match="only with extractor"):
        reference_stats(str(tmp_path / "adm.npz"), CNN, W, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        reference_stats(str(tmp_path / "empty"), CNN, W, tmp_path)


def test_project_cnn_weights_and_names(sets, tmp_path) -> None:
    path = tmp_path / "cnn.pt"
    torch.save(ex.ProjectCNN.load(None).state_dict(), path)
    name = ex.project_extractor_name(str(path))
    assert name.startswith("varbench-cnn (weights sha256 ") and ex.file_sha256(path)[:12] in name
    untrained = ex.extract_features(sets["a"], CNN, W)
    loaded = ex.extract_features(sets["a"], CNN, str(path))
    assert torch.equal(untrained["feat"], loaded["feat"])  # the seeded init is reproducible
    assert untrained["feat"].shape == (64, 256) and untrained["logits_unbiased"].shape == (64, 10)
    assert untrained["feat"].std(0).mean() > 1e-3  # features vary between images
    # any resolution works: a 48×48 and 64×64 version of one image set both give 256-d features
    assert ex.extract_features(_images(4, 0, size=48), CNN, W)["feat"].shape == (4, 256)
    # a reference made with other weights is refused
    ref = reference_from_images(sets["b"], "b", CNN, str(path))
    with pytest.raises(ValueError, match="recompute it with the same extractor"):
        score(sets["a"], ref, ["fid"], CNN, W)


def test_missing_inception_weights_message(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ex.INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(FileNotFoundError) as err:
        ex.inception_weights(None)
    msg = str(err.value)
    assert ex.INCEPTION_WEIGHTS_FILE in msg and "VARBENCH_INCEPTION_WEIGHTS" in msg
    assert ex.INCEPTION_WEIGHTS_URL in msg and "quality.extractor_weights" in msg
    with pytest.raises(FileNotFoundError, match=ex.INCEPTION_WEIGHTS_FILE):
        score(_images(4, 0), None, ["isc"], ex.INCEPTION, None)
    monkeypatch.setenv(ex.INCEPTION_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match="env.pth"):
        ex.inception_weights(None)
    # the hub cache is found, but an explicit (mistyped) path is not silently replaced by it
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ex.INCEPTION_WEIGHTS_FILE).write_bytes(b"x")
    assert ex.inception_weights(None).endswith(ex.INCEPTION_WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match="typo.pth"):
        ex.inception_weights(str(tmp_path / "typo.pth"))


class _NoLoadInception(torch_fidelity.FeatureExtractorInceptionV3):
    def load_state_dict(self, *args, **kwargs):  # keep the fresh init: there are no real weights offline
        return None


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> str:
    """A Kaiming-initialised InceptionV3 state dict (METRICS.md §1.4): the real architecture, offline."""
    d = tmp_path_factory.mktemp("inception")
    torch.save({}, d / "empty.pth")
    model = _NoLoadInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(d / "empty.pth"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        nn.init.normal_(model.fc.weight, 0.0, 0.01, generator=g)
    torch.save(model.state_dict(), d / "inception-random.pth")
    return str(d / "inception-random.pth")


def test_inception_path_offline(random_inception_weights) -> None:
    # kid/isc/prc: cheap at 2048-d (FID's 2048×2048 eigvals take ~4 s each here, see the slow test below)
    w = random_inception_weights
    a, b = _images(8, 11, size=24), _images(8, 12, size=24, dark=0.7)
    ours = score(a, reference_from_images(b, "b", ex.INCEPTION, w), ["kid", "isc", "prc"], ex.INCEPTION, w,
                 bootstrap=0)
    tf = _tf(a, b, kid=True, isc=True, prc=True, feature_extractor=ex.INCEPTION,
             feature_extractor_weights_path=w, kid_subset_size=8, isc_splits=4)
    assert ours["kid_mean"] > 0 and ours["isc_mean"] > 1
    assert ours["kid_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["isc_mean"] == pytest.approx(tf["inception_score_mean"], rel=1e-6)
    assert (ours["precision"], ours["recall"]) == (tf["precision"], tf["recall"])
    assert ours["extractor_weights_sha256"] == ex.file_sha256(w)
    assert ours["extractor"] == f"inception-v3-compat (weights sha256 {ex.file_sha256(w)[:12]})"


@pytest.mark.slow
def test_inception_fid_and_adm_npz(random_inception_weights, tmp_path) -> None:
    w = random_inception_weights
    a, b = _images(8, 11, size=24), _images(8, 12, size=24, dark=0.7)
    ref = reference_from_images(b, "b", ex.INCEPTION, w)
    ours = score(a, ref, ["fid"], ex.INCEPTION, w, bootstrap=0)
    tf = _tf(a, b, fid=True, feature_extractor=ex.INCEPTION, feature_extractor_weights_path=w)
    assert ours["fid"] > 0
    assert ours["fid"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)

    # ADM-style reference batch: mu/sigma only (built with torch-fidelity's own function)
    stats = fid_features_to_statistics(ref.features)
    np.savez(tmp_path / "adm.npz", mu=stats["mu"], sigma=stats["sigma"])
    adm = reference_stats(str(tmp_path / "adm.npz"), ex.INCEPTION, w, tmp_path / "cache")
    assert adm.stats_from == "npz mu/sigma" and adm.features is None
    from_adm = score(a, adm, ["fid"], ex.INCEPTION, w, bootstrap=0)
    assert from_adm["fid"] == pytest.approx(ours["fid"], rel=1e-6)
    assert from_adm["settings"]["fid_stats_from"] == "npz mu/sigma"
    with pytest.raises(ValueError, match="only mu/sigma"):
        score(a, adm, ["kid"], ex.INCEPTION, w)


def test_fid_difference_is_the_difference_of_fids_with_a_paired_interval(sets, ref_b) -> None:
    base = sets["dark"]  # far from FID's finite-sample floor, as generated sets are
    same = q.fid_difference(base, base, ref_b, CNN, W, bootstrap=20)
    assert same["fid_delta"] == 0.0 and same["fid_delta_ci95"] == [0.0, 0.0]  # paired draws cancel exactly
    # A variant that darkens every baseline image by 2%: the same seeds, a small shift.
    darker = np.clip(base.astype(np.float64) * 0.98, 0, 255).astype(np.uint8)
    got = q.fid_difference(darker, base, ref_b, CNN, W, bootstrap=100)
    alone = [score(x, ref_b, ["fid"], CNN, W, bootstrap=100) for x in (darker, base)]
    assert got["fid_delta"] == pytest.approx(alone[0]["fid"] - alone[1]["fid"], rel=1e-9)
    lo, hi = got["fid_delta_ci95"]
    assert lo > 0  # worse beyond its interval ...
    (lo_d, hi_d), (lo_b, hi_b) = alone[0]["fid_ci95"], alone[1]["fid_ci95"]
    assert lo_d < hi_b  # ... while the two FIDs' own intervals overlap
    assert hi - lo < 0.5 * min(hi_d - lo_d, hi_b - lo_b)
    with pytest.raises(ValueError, match="paired FID needs equal sets"):
        q.fid_difference(darker[:10], base, ref_b, CNN, W)
