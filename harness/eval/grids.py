"""Sample grids: the generated images of a cell as one PNG, and a cell beside its baseline on the same seeds.

Layout (what the tests pin): tiles of H×W pixels in rows of `nrow`, `PAD` pixels of background around and
between them; with labels, each tile has a `LABEL_HEIGHT`-pixel caption strip above it. Image k sits at
row k // nrow, column k % nrow, its top-left pixel at (`tile_origin`). Written with Pillow (a dependency of
matplotlib), so no figure machinery and exact pixels: what is in the PNG is the images, not a resampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["PAD", "LABEL_HEIGHT", "BACKGROUND", "tile_origin", "grid_image", "save_grid", "save_comparison"]

PAD = 2
LABEL_HEIGHT = 12
BACKGROUND = (255, 255, 255)


def _check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """(N, H, W, 3) uint8, or a ValueError that says what was given and what is expected."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (N, H, W, 3) uint8, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        hint = (" (channels first? use images.transpose(0, 2, 3, 1))"
                if images.ndim == 4 and images.shape[1] == 3 else "")
        raise ValueError(f"{name} must have shape (N, H, W, 3) with N >= 1, got {images.shape}{hint}")
    if images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got {images.dtype}; convert floats in [0, 1] with "
                         f"(x * 255).round().clip(0, 255).astype(np.uint8)")
    return images


def tile_origin(k: int, height: int, width: int, nrow: int, labelled: bool = False) -> tuple[int, int]:
    """(top, left) pixel of image k in a grid of `nrow` tiles per row."""
    strip = LABEL_HEIGHT if labelled else 0
    row, col = divmod(k, nrow)
    return PAD + row * (height + strip + PAD) + strip, PAD + col * (width + PAD)


def grid_image(images: np.ndarray, nrow: int = 8, labels: Sequence[str] | None = None):
    """The grid as a PIL image (see the module's layout)."""
    from PIL import Image, ImageDraw

    images = _check_images(images)
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an integer >= 1, got {nrow!r}")
    n, h, w, _ = images.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels must name every image: got {len(labels)} labels for {n} images")
    cols, rows = min(nrow, n), -(-n // nrow)
    strip = LABEL_HEIGHT if labels is not None else 0
    canvas = Image.new("RGB", (PAD + cols * (w + PAD), PAD + rows * (h + strip + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        top, left = tile_origin(k, h, w, nrow, labels is not None)
        canvas.paste(Image.fromarray(images[k], "RGB"), (left, top))
        if labels is not None:
            _caption(draw, str(labels[k]), left, top - strip, w)
    return canvas


def _caption(draw, text: str, left: int, top: int, width: int) -> None:
    """Text in the strip above a tile, cut to the tile's width (the default bitmap font, ~6 px a character)."""
    while text and draw.textlength(text) > width:
        text = text[:-1]
    draw.text((left, top), text, fill=(0, 0, 0))


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 8, labels: Sequence[str] | None = None) -> Path:
    """Writes images (N, H, W, 3) uint8 as one PNG grid of `nrow` tiles per row; returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"a grid is written as PNG: give a path ending in .png, got {str(path)!r}")
    image = grid_image(images, nrow, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def save_comparison(baseline: np.ndarray, images: np.ndarray, path: str | Path, n: int = 8,
                    titles: tuple[str, str] | None = ("baseline", "variant")) -> Path:
    """Writes the first `n` images of `baseline` in the top row and the same indices (same seeds) of `images`
    below, captioned `#<index> <title>` (cut to the tile's width) unless `titles` is None; returns the path."""
    baseline, images = _check_images(baseline, "baseline"), _check_images(images, "images")
    if baseline.shape[1:] != images.shape[1:]:
        raise ValueError(f"baseline and images must have one image size, got {baseline.shape[1:]} and "
                         f"{images.shape[1:]}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    n = min(n, len(baseline), len(images))
    labels = None
    if titles is not None:
        labels = [f"#{i} {titles[row]}" for row in (0, 1) for i in range(n)]
    return save_grid(np.concatenate([baseline[:n], images[:n]]), path, nrow=n, labels=labels)
