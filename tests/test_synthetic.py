"""The procedural data set: deterministic per (seed, index), class balanced, scale-invariant and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from varbench.harness.eval import synthetic
from varbench.harness.eval.synthetic import CLASSES, make_dataset, render, save_npz

K = len(CLASSES)


@pytest.fixture(scope="module")
def train_test() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    a, ya = make_dataset(500, seed=11)
    b, yb = make_dataset(500, seed=11, start=500)  # held out: disjoint indices of the same stream
    return a, ya, b, yb


def test_classes_are_named_and_unique():
    assert K >= 10 and len(set(CLASSES)) == K and all(isinstance(c, str) and c for c in CLASSES)


def test_same_seed_is_identical_and_another_seed_differs():
    labels = np.arange(30) % K
    a, b = render(labels, seed=7), render(labels, seed=7)
    assert np.array_equal(a, b)
    c = render(labels, seed=8)
    # Every image changes, not just a few pixels.
    diff = np.abs(a.astype(np.int16) - c.astype(np.int16)).mean(axis=(1, 2, 3))
    assert (diff > 10.0).all()


def test_blocks_and_batch_sizes_give_the_same_images(monkeypatch):
    whole, labels = make_dataset(20, seed=3)
    head, head_labels = make_dataset(7, seed=3)
    tail, tail_labels = make_dataset(13, seed=3, start=7)
    assert np.array_equal(whole, np.concatenate([head, tail]))
    assert np.array_equal(labels, np.concatenate([head_labels, tail_labels]))
    # One image at a time, by its global index.
    assert np.array_equal(render([labels[12]], seed=3, start=12)[0], whole[12])
    # Internal chunks of 3 images render the same bytes as one chunk.
    monkeypatch.setattr(synthetic, "_PIXELS_PER_CHUNK", 3 * 64 * 64)
    assert np.array_equal(render(labels, seed=3), whole)


def test_a_label_changes_the_class_not_the_stream():
    # Image i's randomness depends on (seed, i) only: relabelling one image leaves the others untouched.
    labels = np.arange(12) % K
    other = labels.copy()
    other[4] = (labels[4] + 3) % K
    a, b = render(labels, seed=5), render(other, seed=5)
    keep = np.arange(12) != 4
    assert np.array_equal(a[keep], b[keep]) and not np.array_equal(a[4], b[4])


@pytest.mark.parametrize("size", [32, 64])
def test_shape_dtype_and_balanced_labels(size):
    images, labels = make_dataset(25, seed=0, size=size, start=3)
    assert images.shape == (25, size, size, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.array_equal(labels, np.arange(3, 28) % K)
    assert images.min() < 40 and images.max() > 200  # uses the range, not a washed-out band


def test_content_scales_with_size():
    big, _ = make_dataset(40, seed=2, size=64)
    small, _ = make_dataset(40, seed=2, size=32)
    pooled = big.astype(np.float32).reshape(40, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    same = np.abs(pooled - small).mean()
    # A different image of the same class is far away; the same image at half size is close.
    shuffled = np.abs(pooled - np.roll(small, K, axis=0)).mean()
    assert same < 5.0 and shuffled > 5 * same


def test_classes_differ_and_vary_within():
    images, labels = make_dataset(1000, seed=4)
    x = images.astype(np.float32)
    means = np.stack([x[labels == c].mean(axis=0) for c in range(K)])
    gap = np.abs(means[:, None] - means[None]).mean(axis=(2, 3, 4))
    assert gap[~np.eye(K, dtype=bool)].min() > 6.0
    for c in range(K):
        members = x[labels == c]
        assert members.std(axis=0).mean() > 20.0, CLASSES[c]  # position, size, colour and background vary
        assert len({m.tobytes() for m in members}) == len(members)


def _features(images: np.ndarray) -> np.ndarray:
    """8x8 average-pooled pixels plus a square-rooted 4x4x4 joint colour histogram."""
    n, s = len(images), images.shape[1]
    pooled = images.astype(np.float32).reshape(n, 8, s // 8, 8, s // 8, 3).mean(axis=(2, 4)).reshape(n, -1) / 255
    q = images.astype(np.int64) * 4 // 256
    bins = (q[..., 0] * 4 + q[..., 1]) * 4 + q[..., 2]
    hist = np.stack([np.bincount(b.ravel(), minlength=64) for b in bins]) / (s * s)
    return np.concatenate([pooled, 4.0 * np.sqrt(hist)], axis=1)


def test_nearest_class_mean_beats_chance(train_test):
    a, ya, b, yb = train_test
    fa, fb = _features(a), _features(b)
    centroids = np.stack([fa[ya == c].mean(axis=0) for c in range(K)])
    pred = ((fb[:, None] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    accuracy = (pred == yb).mean()
    assert accuracy > 0.6  # chance is 0.1
    assert len(np.unique(pred)) == K  # every class is predicted somewhere, none collapses into another


def test_save_npz_writes_the_adm_layout_atomically(tmp_path):
    images, labels = make_dataset(12, seed=1, size=32)
    path = save_npz(tmp_path / "sub" / "ref.npz", images, labels)
    assert path == tmp_path / "sub" / "ref.npz"
    with np.load(path) as data:
        assert set(data.files) == {"arr_0", "labels"}
        assert np.array_equal(data["arr_0"], images) and data["arr_0"].dtype == np.uint8
        assert np.array_equal(data["labels"], labels)
    save_npz(path, images[:3], labels[:3])  # replaces the old file
    with np.load(path) as data:
        assert len(data["arr_0"]) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temporary left behind


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError):
        render([0, K], seed=0)
    with pytest.raises(ValueError):
        render([-1], seed=0)
    with pytest.raises(ValueError):
        save_npz(tmp_path / "x.npz", np.zeros((2, 8, 8, 3), np.float32), np.zeros(2))
    with pytest.raises(ValueError):
        save_npz(tmp_path / "x.npz", np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3))
    assert not any(tmp_path.iterdir())
    assert render([], seed=0).shape == (0, 64, 64, 3)
