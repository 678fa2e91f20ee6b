"""Bootstrap resamples of the quality metrics without redoing torch-fidelity's work per resample.

Each class holds what a metric computes once (the reference's matrix square root, kernel matrices, distance
matrices) and answers a resample (an index array with repeats) with the same floats torch-fidelity's own
features→metric function would give on the materialised resample: FID up to round-off (a symmetric form of
the trace term), KID and precision/recall exactly (same subset draws, same k-NN rule). tests/test_quality_fast.py
checks each against torch-fidelity.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch_fidelity.metric_kid import kernel_mmd, kernel_poly, mmd2
from torch_fidelity.metric_prc import calc_cdist_full, calc_cdist_part

__all__ = ["weighted_moments", "weighted_stats", "FrechetToReference", "kid_draws", "KidKernels", "PrecisionRecall",
           "interval", "bootstrap_draws", "TF_RNG_SEED", "PRC_BATCH_SIZE", "KID_GATHER_MIN"]

TF_RNG_SEED = 2020  # torch-fidelity's default rng_seed: KID subsets and IS shuffling use it
PRC_BATCH_SIZE = 10000  # torch-fidelity's prc_batch_size default: cdist blocks of this many rows/columns
KID_GATHER_MIN = 64  # smaller KID subsets recompute their kernels (see KidKernels)


def weighted_moments(features: torch.Tensor, counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # A resample with replacement = frequency weights: same mean/cov as the materialised resample, cheaper.
    w = torch.from_numpy(counts).to(features.device)
    mu = (features * w[:, None].to(features.dtype)).sum(0) / w.sum()
    return mu, torch.cov(features.T, fweights=w)


def weighted_stats(features: torch.Tensor, counts: np.ndarray) -> dict[str, np.ndarray]:
    mu, sigma = weighted_moments(features, counts)
    return {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy()}


class FrechetToReference:
    """FID of resampled statistics against fixed reference statistics, for the bootstrap.

    tr sqrt(S_g S_r) = tr sqrt(A S_g A) with A = S_r^½ (the two products are similar), and A S_g A is
    symmetric positive semi-definite: one `eigvalsh` per resample instead of torch-fidelity's general
    `eigvals` of S_g S_r, the same number up to round-off (~4× faster, no complex round-off at n < D). In
    torch, on the features' device: numpy's BLAS threads fight torch's spinning ones between the two."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, device: torch.device | str = "cpu"):
        w, v = torch.linalg.eigh(torch.from_numpy(sigma).double().to(device))
        self.half = (v * w.clamp(min=0).sqrt()) @ v.T  # negative eigenvalues are round-off of zeros
        self.mu, self.trace = torch.from_numpy(mu).double().to(device), float(np.trace(sigma))

    def __call__(self, mu: torch.Tensor, sigma: torch.Tensor) -> float:
        diff = mu - self.mu
        tr_covmean = torch.linalg.eigvalsh(self.half @ sigma @ self.half).clamp(min=0).sqrt().sum()
        return float(diff.dot(diff) + sigma.trace() + self.trace - 2 * tr_covmean)


def kid_draws(n: int, m: int, size: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    # kid_features_to_metric's draws: a fresh RandomState(rng_seed), then per subset a generated draw and a
    # reference draw. Every call restarts the sequence, so a resample with fewer subsets uses a prefix.
    rng = np.random.RandomState(TF_RNG_SEED)
    return [(rng.choice(n, size, replace=False), rng.choice(m, size, replace=False)) for _ in range(count)]


def _block(kernel: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    # C order, as torch-fidelity's kernels: numpy's float32 row/column sums round differently by layout
    return np.ascontiguousarray(kernel[rows][:, cols])


class KidKernels:
    """torch-fidelity's KID (polynomial kernel, unbiased MMD², its own subset draws) with kernels computed once.

    A subset of a resample is a set of rows of the generated features, so its gen-gen and gen-ref kernels are
    gathered from the full matrices, and the reference's block of each draw is the same in every resample
    (kept for the first `keep` draws). Gathered entries are the floats torch-fidelity computes: float32 sgemm
    gives an entry the same bits wherever it sits, except in OpenBLAS's small-matrix path, so subsets below
    KID_GATHER_MIN recompute their kernels as torch-fidelity does (cheap at that size)."""

    def __init__(self, gen: torch.Tensor, ref: torch.Tensor, size: int, draws: int, keep: int):
        self.gen, self.ref = gen.cpu().numpy(), ref.cpu().numpy()  # torch-fidelity's dtype (float32)
        self.draws = kid_draws(len(gen), len(ref), size, draws)
        self.gather = size >= KID_GATHER_MIN
        if self.gather:
            self.gg, self.gr = kernel_poly(self.gen, self.gen), kernel_poly(self.gen, self.ref)
        self.keep, self.rr = keep, {}

    def _ref_block(self, s: int, j: np.ndarray) -> np.ndarray:
        block = self.rr.get(s)
        if block is None:
            block = kernel_poly(self.ref[j], self.ref[j])
            if s < self.keep:
                self.rr[s] = block
        return block

    def _mmd(self, s: int, i: np.ndarray, j: np.ndarray) -> float:
        if not self.gather:
            return kernel_mmd(self.gen[i], self.ref[j])
        return mmd2(_block(self.gg, i, i), _block(self.gr, i, j), self._ref_block(s, j))

    def __call__(self, idx: np.ndarray | None, subsets: int) -> dict[str, float]:
        mmds = np.zeros(subsets)
        for s, (i, j) in enumerate(self.draws[:subsets]):
            mmds[s] = self._mmd(s, i if idx is None else idx[i], j)
        return {"kid_mean": float(np.mean(mmds)), "kid_std": float(np.std(mmds))}


class PrecisionRecall:
    """torch-fidelity's k-NN precision/recall (metric_prc) with every distance computed once.

    The radius of a sample is the (k+1)-th smallest distance in its row of its own set's distances: the
    sample itself counts as the first at ~0, and in a resample each duplicate of it counts as another
    neighbour at that same distance, so duplicates shrink radii. The reference is fixed, so its radii and
    each generated sample's precision hit are computed once; a resample gathers its gen-gen block (its radii)
    and its columns of the ref-gen distances. cdist blocks are as torch-fidelity's, so comparisons see the
    same floats."""

    def __init__(self, gen: torch.Tensor, ref: torch.Tensor, k: int):
        b = PRC_BATCH_SIZE
        self.k = k
        self.gg, self.rg = calc_cdist_full(gen, gen, b), calc_cdist_full(ref, gen, b)
        ref_radii = torch.cat([calc_cdist_part(r, ref, b).kthvalue(k + 1).values for r in ref.split(b)])
        self.hit = torch.cat([(calc_cdist_part(g, ref, b) <= ref_radii).any(dim=1).float() for g in gen.split(b)])

    def __call__(self, idx: np.ndarray | None) -> dict[str, float]:
        t = None if idx is None else torch.from_numpy(idx)
        gg = self.gg if t is None else self.gg[t][:, t]
        radii = gg.kthvalue(self.k + 1).values
        recall = ((self.rg if t is None else self.rg[:, t]) <= radii).any(dim=1).float().mean().item()
        precision = (self.hit if t is None else self.hit[t]).mean().item()
        f_score = 2 * precision * recall / max(1e-5, precision + recall)  # torch-fidelity's expression
        return {"precision": precision, "recall": recall, "f_score": f_score}


def interval(values: list[float], point: float) -> list[float]:
    """95% bias-corrected percentile interval: the bootstrap distribution shifted so that its mean is the
    point estimate. Resampling with replacement duplicates samples, and duplicates bias FID and KID upward
    (and recall downward) by an amount that grows as n shrinks: unshifted percentiles at n = 8 can miss the
    point estimate altogether. The shift keeps the bootstrap's spread and removes its bias."""
    draws = np.asarray(values, dtype=np.float64)
    shift = float(np.mean(draws)) - float(point)
    lo, hi = np.percentile(draws - shift, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_draws(fns: dict[str, Callable[..., dict[str, float]]], keys: list[str], n: int, bootstrap: int,
                    seed: int) -> dict[str, list[float]]:
    """`bootstrap` resamples (with replacement, numpy Generator seeded with `seed`) of n indices, each passed to
    every metric function; the values of `keys`, one list per key."""
    draws: dict[str, list[float]] = {k: [] for k in keys}
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        idx = rng.integers(0, n, size=n)
        for fn in fns.values():
            for k, v in fn(idx).items():
                if k in draws:
                    draws[k].append(v)
    return draws
