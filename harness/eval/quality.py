"""Quality metrics (FID, KID, IS, precision/recall) with percentile-bootstrap 95% intervals.

Features come from `extractors.extract_features`; every number comes from torch-fidelity's own
features→metric functions with the settings `calculate_metrics` would use for the same sample counts
(KID subset size min(1000, n, m), IS splits min(10, n // 2), PRC neighbourhood 3, torch-fidelity's rng seed
2020). Reference statistics are cached under a content hash (data bytes + extractor + weights + library
version), never under a name, because torch-fidelity's own cache silently reuses stale stats by name.

`score` returns a flat dict (the keys present depend on the requested metrics):
  fid, fid_ci95                         Fréchet distance of the pool features
  kid_mean, kid_mean_ci95, kid_std      KID (poly kernel) over subsets; kid_std is the spread over subsets
  isc_mean, isc_mean_ci95, isc_std      Inception Score (softmax of logits_unbiased), std over splits
  precision, recall, f_score (+ _ci95)  Kynkäänniemi et al. k-NN manifold precision/recall
  num_samples, num_reference, extractor, extractor_weights_sha256, reference, reference_stats_sha,
  bootstrap, seed, settings             provenance; `<key>_ci95` is [lo, hi] or None when bootstrap == 0
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from varbench.harness.core.hashing import text_sha256

from .extractors import (INCEPTION, PROJECT_CNN, PROJECT_CNN_VERSION, check_images, describe_extractor,
                         extract_features, feature_layers, file_sha256, resolve_weights, weights_sha256)

__all__ = ["Reference", "reference_stats", "reference_from_images", "score", "fid_difference",
           "QUALITY_METRIC_NAMES"]

log = logging.getLogger(__name__)

QUALITY_METRIC_NAMES = ("fid", "kid", "isc", "prc")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TF_RNG_SEED = 2020  # torch-fidelity's default rng_seed: KID subsets and IS shuffling use it
PRC_NEIGHBORHOOD = 3
KID_BOOTSTRAP_SUBSETS = 10  # subsets per bootstrap resample: 100 per resample would dominate the run time


@dataclass
class Reference:
    """Reference-set statistics for one extractor. `features` (pool layer) is None for a stats-only ADM npz."""

    source: str
    extractor: str  # descriptive name (extractors.describe_extractor), checked against the scoring extractor
    sha256: str  # content hash of data + extractor + weights + torch-fidelity version; the cache key
    mu: np.ndarray  # float64 (D,)
    sigma: np.ndarray  # float64 (D, D)
    features: torch.Tensor | None
    stats_from: str  # "npz mu/sigma" (ADM reference batch) or "images"

    @property
    def num_images(self) -> int | None:
        return None if self.features is None else len(self.features)


def _hash(*parts: str) -> str:
    return text_sha256("\n".join(parts))


def _extractor_identity(extractor: str, weights: str | None) -> str:
    return _hash(extractor, weights_sha256(weights) or "random-init",
                 f"varbench-cnn v{PROJECT_CNN_VERSION}" if extractor == PROJECT_CNN else "",
                 torch_fidelity.__version__)


def _folder_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"reference folder {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
    return files


def _load_folder(files: list[Path]) -> np.ndarray:
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"reference images must share one size, found {sorted(shapes)[:4]} in {files[0].parent}")
    return np.stack(arrays)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    stats = fid_features_to_statistics(features)
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def reference_from_images(images: np.ndarray, name: str, extractor: str, weights: str | None,
                          device: str = "cpu") -> Reference:
    """A Reference from in-memory uint8 N×H×W×3 images (not cached; e.g. a procedurally rendered set)."""
    weights = resolve_weights(extractor, weights)
    check_images(images, f"reference {name}")
    sha = _hash(hashlib.sha256(np.ascontiguousarray(images).data).hexdigest(), str(images.shape),
                _extractor_identity(extractor, weights))
    feats = extract_features(images, extractor, weights, device)[feature_layers(extractor)["fid"]]
    mu, sigma = _stats(feats)
    return Reference(name, describe_extractor(extractor, weights), sha, mu, sigma, feats, "images")


def reference_stats(source: str, extractor: str, weights: str | None, cache_dir: Path,
                    device: str = "cpu") -> Reference:
    """Reference features and FID statistics of an ADM .npz (mu/sigma, optional arr_0), an .npz of uint8
    images (arr_0) or a folder of png/jpg images, cached in `cache_dir` under the content hash.

    An ADM npz's mu/sigma (Inception pool3) are used for FID as the ADM evaluator does, and only with the
    Inception extractor; its arr_0 images, when present, supply the features for KID and precision/recall.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"reference {source} does not exist")
    weights = resolve_weights(extractor, weights)
    files = _folder_images(path) if path.is_dir() else None
    content = (_hash(*sorted(file_sha256(f) for f in files)) if files is not None else file_sha256(path))
    sha = _hash(content, _extractor_identity(extractor, weights))
    name = describe_extractor(extractor, weights)
    cache_file = Path(cache_dir) / f"reference-{sha}.pt"
    if cache_file.is_file():
        c = torch.load(cache_file, map_location="cpu", weights_only=True)
        log.info("reference stats of %s loaded from cache %s", source, cache_file)
        return Reference(source, name, sha, c["mu"].numpy(), c["sigma"].numpy(), c.get("features"),
                         c["stats_from"])

    layer = feature_layers(extractor)["fid"]
    features, mu, sigma, stats_from = None, None, None, "images"
    if files is not None:
        features = extract_features(_load_folder(files), extractor, weights, device)[layer]
    elif path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            has_stats, has_images = {"mu", "sigma"} <= keys, "arr_0" in keys
            if not has_stats and not has_images:
                raise ValueError(f"{source} has neither arr_0 (uint8 N×H×W×3 images) nor mu/sigma "
                                 f"(ADM reference statistics); keys: {sorted(keys)}")
            if has_stats and extractor == INCEPTION:
                mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
                stats_from = "npz mu/sigma"
            elif not has_images:
                raise ValueError(f"{source} holds only mu/sigma (Inception pool3 statistics): valid only with "
                                 f"extractor {INCEPTION!r}, not {extractor!r}")
            if has_images:
                features = extract_features(check_images(npz["arr_0"], f"{source} arr_0"), extractor,
                                            weights, device)[layer]
    else:
        raise ValueError(f"reference {source} must be an .npz file or a folder of {'/'.join(IMAGE_EXTENSIONS)}")

    if mu is None:
        mu, sigma = _stats(features)
    elif mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or (
            features is not None and features.shape[1] != len(mu)):
        raise ValueError(f"{source}: mu {mu.shape} / sigma {sigma.shape} do not match the {extractor} "
                         f"features ({layer})")
    blob: dict[str, Any] = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma),
                            "stats_from": stats_from}
    if features is not None:
        blob["features"] = features
    _save_atomic(blob, cache_file)
    log.info("reference stats of %s cached at %s", source, cache_file)
    return Reference(source, name, sha, mu, sigma, features, stats_from)


def _weighted_stats(features: torch.Tensor, counts: np.ndarray) -> dict[str, np.ndarray]:
    # A resample with replacement = frequency weights: same mean/cov as the materialised resample, cheaper.
    w = torch.from_numpy(counts).to(features.device)
    mu = (features * w[:, None].to(features.dtype)).sum(0) / w.sum()
    sigma = torch.cov(features.T, fweights=w)
    return {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy()}


def _interval(values: list[float], point: float) -> list[float]:
    """95% bias-corrected percentile interval: the bootstrap distribution shifted so that its mean is the
    point estimate. Resampling with replacement duplicates samples, and duplicates bias FID and KID upward
    (and recall downward) by an amount that grows as n shrinks: unshifted percentiles at n = 8 can miss the
    point estimate altogether. The shift keeps the bootstrap's spread and removes its bias."""
    draws = np.asarray(values, dtype=np.float64)
    shift = float(np.mean(draws)) - float(point)
    lo, hi = np.percentile(draws - shift, [2.5, 97.5])
    return [float(lo), float(hi)]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def score(images: np.ndarray, reference: Reference | None, metrics: Sequence[str], extractor: str,
          weights: str | None, device: str = "cpu", bootstrap: int = 100, seed: int = 0,
          kid_subsets: int = 100) -> dict[str, Any]:
    """Scores uint8 N×H×W×3 `images` against `reference` (see the module docstring for the keys).

    The interval of every number is the 2.5/97.5 percentile over `bootstrap` resamples (with replacement,
    numpy Generator seeded with `seed`) of the generated features; the reference is held fixed. FID
    resamples recompute only the statistics; KID resamples use min(kid_subsets, 10) subsets each.
    Precision/recall resamples rerun the k-NN test, and duplicates in a resample shrink the generated set's
    k-NN radii, so recall's interval leans low. FID is biased upward at small n and a resample holds only
    ~63% distinct images, so when FID is near its finite-sample floor the interval can sit above the value.
    Cost: each FID resample is one D×D general eigvalue problem (~4 s at D = 2048 on 2 CPU cores).
    """
    metrics = list(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in QUALITY_METRIC_NAMES]
    _require(not unknown, f"unknown quality metric(s) {unknown}; valid: {list(QUALITY_METRIC_NAMES)}")
    _require(bool(metrics), "no quality metric requested")
    check_images(images, "generated images")
    weights = resolve_weights(extractor, weights)
    name = describe_extractor(extractor, weights)
    paired = [m for m in metrics if m != "isc"]
    _require(not paired or reference is not None, f"{paired} need a reference set; only isc does not")
    if reference is not None and paired:
        _require(reference.extractor == name, f"reference {reference.source} was computed with "
                 f"{reference.extractor}, not {name}: recompute it with the same extractor and weights")
    n = len(images)
    m = reference.num_images if reference is not None else None
    settings: dict[str, Any] = {"torch_fidelity": torch_fidelity.__version__, "rng_seed": TF_RNG_SEED}

    layers = feature_layers(extractor)
    feats = extract_features(images, extractor, weights, device)
    pool, logits = feats[layers["fid"]].cpu(), feats[layers["isc"]].cpu()
    ref = reference.features.cpu() if reference is not None and reference.features is not None else None
    dev = torch.device(device)

    # One closure per metric: features (or counts for FID) -> {key: value}; run on the full set and resamples.
    fns: dict[str, Any] = {}
    if "fid" in metrics:
        _require(n >= 2, f"FID needs at least 2 generated images, got {n}")
        _require(pool.shape[1] == len(reference.mu), f"features are {pool.shape[1]}-d but reference mu is "
                 f"{len(reference.mu)}-d")
        ref_stats = {"mu": reference.mu.astype(np.float64), "sigma": reference.sigma.astype(np.float64)}
        pool64 = pool.double().to(dev)
        settings["fid_stats_from"] = reference.stats_from

        def fid(idx: np.ndarray | None) -> dict[str, float]:
            if idx is None:
                mu, sigma = _stats(pool)
                stats = {"mu": mu, "sigma": sigma}
            else:
                stats = _weighted_stats(pool64, np.bincount(idx, minlength=n))
            return {"fid": fid_statistics_to_metric(stats, ref_stats, False)[KEY_METRIC_FID]}
        fns["fid"] = fid
    if "kid" in metrics:
        _require(ref is not None, f"KID needs reference images; {reference.source} holds only mu/sigma")
        subset = min(1000, n, m)
        _require(subset >= 2, f"KID needs at least 2 images per set (generated {n}, reference {m})")
        settings.update(kid_subset_size=subset, kid_subsets=kid_subsets,
                        kid_bootstrap_subsets=min(kid_subsets, KID_BOOTSTRAP_SUBSETS))

        def kid(idx: np.ndarray | None) -> dict[str, float]:
            f = pool if idx is None else pool[torch.from_numpy(idx)]
            out = kid_features_to_metric(f, ref, kid_subsets=kid_subsets if idx is None else
                                         settings["kid_bootstrap_subsets"], kid_subset_size=subset,
                                         rng_seed=TF_RNG_SEED, verbose=False)
            return {"kid_mean": out["kernel_inception_distance_mean"],
                    "kid_std": out["kernel_inception_distance_std"]}
        fns["kid"] = kid
    if "isc" in metrics:
        splits = min(10, n // 2)
        _require(splits >= 1, f"IS needs at least 2 generated images, got {n}")
        settings["isc_splits"] = splits

        def isc(idx: np.ndarray | None) -> dict[str, float]:
            f = logits if idx is None else logits[torch.from_numpy(idx)]
            out = isc_features_to_metric(f, splits, True, TF_RNG_SEED)
            return {"isc_mean": out["inception_score_mean"], "isc_std": out["inception_score_std"]}
        fns["isc"] = isc
    if "prc" in metrics:
        _require(ref is not None, f"precision/recall need reference images; {reference.source} holds only "
                 "mu/sigma")
        _require(n > PRC_NEIGHBORHOOD and m > PRC_NEIGHBORHOOD, f"precision/recall with neighbourhood "
                 f"{PRC_NEIGHBORHOOD} need more than {PRC_NEIGHBORHOOD} images per set (generated {n}, "
                 f"reference {m})")
        settings["prc_neighborhood"] = PRC_NEIGHBORHOOD
        pool_dev, ref_dev = pool.to(dev), ref.to(dev)

        def prc(idx: np.ndarray | None) -> dict[str, float]:
            f = pool_dev if idx is None else pool_dev[torch.from_numpy(idx).to(dev)]
            return prc_features_to_metric(f, ref_dev, prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10000,
                                          save_cpu_ram=True, verbose=False)
        fns["prc"] = prc

    out: dict[str, Any] = {}
    for fn in fns.values():
        out.update(fn(None))
    interval_keys = [k for k in out if not k.endswith("_std")]
    draws: dict[str, list[float]] = {k: [] for k in interval_keys}
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        idx = rng.integers(0, n, size=n)
        for fn in fns.values():
            for k, v in fn(idx).items():
                if k in draws:
                    draws[k].append(v)
    for k in interval_keys:
        out[f"{k}_ci95"] = _interval(draws[k], out[k]) if bootstrap > 0 else None

    out.update(num_samples=n, num_reference=m, extractor=name,
               extractor_weights_sha256=weights_sha256(weights),
               reference=reference.source if reference is not None else None,
               reference_stats_sha=reference.sha256 if reference is not None else None,
               bootstrap=bootstrap, seed=seed, settings=settings)
    log.info("quality of %d images (%s): %s", n, name,
             ", ".join(f"{k}={out[k]:.4g}" for k in interval_keys))
    return out


def fid_difference(images: np.ndarray, baseline: np.ndarray, reference: Reference, extractor: str,
                   weights: str | None, device: str = "cpu", bootstrap: int = 100, seed: int = 0) -> dict[str, Any]:
    """FID(images) − FID(baseline) with a paired-bootstrap 95% interval.

    Image i of both sets comes from the same seed and label, so each resample draws the same indices from
    both and the difference's interval leaves out the spread the two sets share (which labels, which seeds).
    Two FIDs whose own intervals overlap can still differ beyond this one: it answers "is the variant worse
    than the baseline on these seeds", the question a speedup table asks.
    """
    check_images(images, "generated images")
    check_images(baseline, "baseline images")
    _require(images.shape == baseline.shape, f"paired FID needs equal sets: {images.shape} vs {baseline.shape}")
    _require(len(images) >= 2, f"FID needs at least 2 generated images, got {len(images)}")
    weights = resolve_weights(extractor, weights)
    name = describe_extractor(extractor, weights)
    _require(reference.extractor == name, f"reference {reference.source} was computed with "
             f"{reference.extractor}, not {name}: recompute it with the same extractor and weights")
    layer = feature_layers(extractor)["fid"]
    ref_stats = {"mu": reference.mu.astype(np.float64), "sigma": reference.sigma.astype(np.float64)}
    pools = [extract_features(x, extractor, weights, device)[layer].cpu() for x in (images, baseline)]

    def fid(stats: dict[str, np.ndarray]) -> float:
        return fid_statistics_to_metric(stats, ref_stats, False)[KEY_METRIC_FID]

    full = [dict(zip(("mu", "sigma"), _stats(pool))) for pool in pools]  # as `score` computes its point
    point = fid(full[0]) - fid(full[1])
    pools = [pool.double() for pool in pools]
    n = len(images)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n)
        draws.append(fid(_weighted_stats(pools[0], counts)) - fid(_weighted_stats(pools[1], counts)))
    return {"fid_delta": point, "fid_delta_ci95": _interval(draws, point) if bootstrap > 0 else None}
