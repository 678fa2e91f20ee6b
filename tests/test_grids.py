"""Sample grids: every image lands at its tile, pixel for pixel; a comparison puts the baseline above the variant
at the same indices (issue 13, item 19)."""

import numpy as np
import pytest
from PIL import Image

from varbench.harness.eval.grids import BACKGROUND, LABEL_HEIGHT, PAD, save_comparison, save_grid, tile_origin


def _images(n: int, h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    """Random images: a wrong offset or a resampled tile would not reproduce them exactly."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_every_image_lands_at_its_tile(tmp_path):
    images = _images(7)
    grid = _read(save_grid(images, tmp_path / "g.png", nrow=3))
    assert grid.shape == (2 + 3 * (6 + 2), 2 + 3 * (5 + 2), 3)  # 3 rows of 3 tiles, 2 px around and between
    for k in range(7):
        top, left = 2 + (k // 3) * 8, 2 + (k % 3) * 7
        assert (top, left) == tile_origin(k, 6, 5, 3)
        np.testing.assert_array_equal(grid[top:top + 6, left:left + 5], images[k])
    assert (grid[0] == BACKGROUND).all() and (grid[:, 0] == BACKGROUND).all()
    assert (grid[2 + 2 * 8:, 2 + 7:] == BACKGROUND).all()  # the two empty tiles of the last row


def test_labels_sit_in_a_strip_above_each_tile(tmp_path):
    images = _images(4, 16, 16, seed=1)
    grid = _read(save_grid(images, tmp_path / "g.png", nrow=2, labels=["a", "bb", "c", "dd"]))
    assert grid.shape == (PAD + 2 * (16 + LABEL_HEIGHT + PAD), PAD + 2 * (16 + PAD), 3)
    for k in range(4):
        top, left = tile_origin(k, 16, 16, 2, labelled=True)
        assert top == PAD + (k // 2) * (16 + LABEL_HEIGHT + PAD) + LABEL_HEIGHT
        np.testing.assert_array_equal(grid[top:top + 16, left:left + 16], images[k])
        strip = grid[top - LABEL_HEIGHT:top, left:left + 16]
        assert (strip != 255).any(), f"no caption drawn above image {k}"


def test_comparison_puts_the_baseline_above_the_variant_at_the_same_indices(tmp_path):
    baseline, variant = _images(10, 8, 8, seed=2), _images(10, 8, 8, seed=3)
    grid = _read(save_comparison(baseline, variant, tmp_path / "c.png", n=4, titles=None))
    assert grid.shape == (PAD + 2 * (8 + PAD), PAD + 4 * (8 + PAD), 3)  # two rows of n = 4
    for i in range(4):
        top, left = tile_origin(i, 8, 8, 4)
        np.testing.assert_array_equal(grid[top:top + 8, left:left + 8], baseline[i])
        below, _ = tile_origin(4 + i, 8, 8, 4)
        np.testing.assert_array_equal(grid[below:below + 8, left:left + 8], variant[i])
    captioned = _read(save_comparison(baseline, variant, tmp_path / "t.png", n=20))  # n beyond N: all 10
    assert captioned.shape == (PAD + 2 * (8 + LABEL_HEIGHT + PAD), PAD + 10 * (8 + PAD), 3)


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 3, 8, 8), np.uint8), r"shape \(N, H, W, 3\).*got \(2, 3, 8, 8\).*transpose\(0, 2, 3, 1\)"),
    (np.zeros((2, 8, 8, 3), np.float32), "must be uint8.*got float32"),
    (np.zeros((0, 8, 8, 3), np.uint8), "N >= 1"),
    ([[0]], "numpy array .* got list"),
])
def test_bad_images_are_refused_with_what_was_given(tmp_path, images, message):
    with pytest.raises(ValueError, match=message):
        save_grid(images, tmp_path / "g.png")


def test_bad_arguments_are_refused(tmp_path):
    images = _images(3)
    with pytest.raises(ValueError, match="labels must name every image: got 2 labels for 3 images"):
        save_grid(images, tmp_path / "g.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="nrow must be an integer >= 1, got 0"):
        save_grid(images, tmp_path / "g.png", nrow=0)
    with pytest.raises(ValueError, match="ending in .png, got '.*g.jpg'"):
        save_grid(images, tmp_path / "g.jpg")
    with pytest.raises(ValueError, match=r"one image size, got \(6, 5, 3\) and \(5, 6, 3\)"):
        save_comparison(images, _images(3, 5, 6), tmp_path / "c.png")
