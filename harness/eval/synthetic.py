"""The project's procedural, class-conditional image data set ("synthetic").

It is the reference set for the embedded default's FID and the training data of the small model zoo
(64x64 images, an 8x VQVAE, scales 1,2,3,4,5,6,8). Everything is drawn with numpy on a coordinate grid, so it
needs no download; the random draws are platform independent, while sin/exp may differ in the last float bit
between CPUs' SIMD paths, which can at most move an anti-aliased edge pixel by one level.

Classes (label = position in `CLASSES`); each is a distinct combination of shape, texture and palette:
  0 red_disc            a filled red disc on a random neutral background
  1 blue_square         a rotated filled blue square on a random neutral background
  2 green_triangle      a rotated filled green equilateral triangle on a random neutral background
  3 yellow_ring         a yellow annulus (random thickness) on a random neutral background
  4 magenta_cross       a rotated magenta plus-shaped cross (random arm width) on a random neutral background
  5 stripes_horizontal  full-frame cyan / navy stripes, near horizontal (within 10 degrees)
  6 stripes_diagonal    full-frame orange / purple stripes along either diagonal (within 10 degrees)
  7 checkerboard        a rotated near-white / near-black checkerboard
  8 dots                a rotated lattice of cream polka dots on teal
  9 gradient_blobs      three soft Gaussian blobs of random saturated colours on a dark background

Within-class variation: position (centre within +-0.3 of the half-width), size (radius 0.30-0.55), rotation,
foreground colour jitter (+-0.08 per channel, brightness x0.8-1.1), background grey level and tint, stripe /
checker / dot frequency and phase, a linear illumination gradient (up to +-20%) and mild luminance noise
(uniform, sigma 3/255). Geometry lives in normalised coordinates [-1, 1], so any `size` renders the same
content scaled; edges are anti-aliased over one pixel from signed distances.

Determinism: image i (its global index, `start + position`) draws all its randomness from
`np.random.default_rng(SeedSequence([seed, i]))` -- a fixed number of uniforms, then the noise field -- and
every pixel operation is elementwise per image, so rendering in blocks or in any batch size gives identical
bytes. `make_dataset` assigns labels index % num_classes, class balanced as the VAR FID protocol does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "NUM_CLASSES", "render", "make_dataset", "save_npz"]

CLASSES: tuple[str, ...] = (
    "red_disc", "blue_square", "green_triangle", "yellow_ring", "magenta_cross",
    "stripes_horizontal", "stripes_diagonal", "checkerboard", "dots", "gradient_blobs",
)
NUM_CLASSES = len(CLASSES)

# Uniforms drawn per image, the same count for every class so the stream layout never depends on the label.
# Columns: 0-1 centre, 2 size, 3 rotation, 4-6 colour jitter, 7 brightness, 8 background grey, 9-11 tint,
# 12 illumination direction, 13 illumination strength, 14 frequency, 15 phase, 16-17 class specific,
# 18-35 three blobs (centre x, centre y, sigma, r, g, b), 36-39 spare for future classes.
_NUM_PARAMS = 40
_NOISE_SIGMA = 3.0 / 255.0
_PIXELS_PER_CHUNK = 1 << 22  # bounds the float32 working set (~50 MB per image-sized temporary)

_SHAPE_COLOURS = {
    0: (0.85, 0.15, 0.12), 1: (0.15, 0.30, 0.85), 2: (0.15, 0.70, 0.20),
    3: (0.95, 0.80, 0.10), 4: (0.80, 0.15, 0.75),
}
_TEXTURE_COLOURS = {  # (foreground, background)
    5: ((0.20, 0.80, 0.85), (0.05, 0.10, 0.30)),
    6: ((0.95, 0.55, 0.10), (0.35, 0.10, 0.45)),
    7: ((0.90, 0.90, 0.88), (0.10, 0.10, 0.12)),
    8: ((0.98, 0.95, 0.85), (0.00, 0.45, 0.45)),
}

Grid = tuple[np.ndarray, np.ndarray, float]  # x (1, 1, S), y (1, S, 1), pixel width in normalised units


def _col(p: np.ndarray) -> np.ndarray:
    """A per-image scalar broadcast against (n, S, S) grids."""
    return p[:, None, None]


def _jitter(base: Sequence[float], p: np.ndarray) -> np.ndarray:
    rgb = np.asarray(base, np.float32) + (p[:, 4:7] - 0.5) * 0.16
    return np.clip(rgb * (0.8 + 0.3 * p[:, 7:8]), 0.0, 1.0)


def _neutral_background(p: np.ndarray) -> np.ndarray:
    # Grey level spans dark to light so colour, not luminance contrast, identifies the shape classes.
    grey = 0.1 + 0.8 * p[:, 8:9]
    return np.clip(grey + (p[:, 9:12] - 0.5) * 0.2, 0.0, 1.0)


def _coverage(sd: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of a signed distance (negative inside), a linear ramp one pixel wide."""
    return np.clip(0.5 - sd / px, 0.0, 1.0)


def _wave_coverage(v: np.ndarray, k: np.ndarray, px: float) -> np.ndarray:
    """Coverage of {v > 0} for a wave of angular frequency k, whose distance to the zero set is about v / k."""
    return np.clip(0.5 + v / (k * px), 0.0, 1.0)


def _local(p: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates in the shape's rotated frame, and its radius."""
    x, y, _ = grid
    dx, dy = x - _col((p[:, 0] - 0.5) * 0.6), y - _col((p[:, 1] - 0.5) * 0.6)
    theta = 2 * np.pi * p[:, 3]
    c, s = _col(np.cos(theta)), _col(np.sin(theta))
    return dx * c + dy * s, dy * c - dx * s, _col(0.30 + 0.25 * p[:, 2])


def _box(qx: np.ndarray, qy: np.ndarray, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    # Max of the slab distances: exact inside, bevelled just outside corners -- invisible after anti-aliasing.
    return np.maximum(np.abs(qx) - a, np.abs(qy) - b)


def _shape_mask(label: int, p: np.ndarray, grid: Grid) -> np.ndarray:
    qx, qy, r = _local(p, grid)
    if label == 0:
        sd = np.sqrt(qx * qx + qy * qy) - r
    elif label == 1:
        sd = _box(qx, qy, 0.85 * r, 0.85 * r)  # same area scale as the disc
    elif label == 2:
        # Intersection of three half-planes whose outward normals are 120 degrees apart; apothem 0.55 r.
        sd = np.maximum(qy, -0.5 * qy + 0.8660254 * qx)
        sd = np.maximum(sd, -0.5 * qy - 0.8660254 * qx) - 0.55 * r
    elif label == 3:
        thickness = r * _col(0.12 + 0.15 * p[:, 16])
        sd = np.abs(np.sqrt(qx * qx + qy * qy) - r) - thickness
    else:
        arm = r * _col(0.22 + 0.12 * p[:, 16])
        sd = np.minimum(_box(qx, qy, r, arm), _box(qx, qy, arm, r))
    return _coverage(sd, grid[2])


def _texture_mask(label: int, p: np.ndarray, grid: Grid) -> np.ndarray:
    x, y, px = grid
    phase = _col(2 * np.pi * p[:, 15])
    if label in (5, 6):
        k = _col(np.pi * (3.0 + 2.5 * p[:, 14]))  # 3 to 5.5 periods across the frame
        wobble = (p[:, 3] - 0.5) * 0.35  # +-10 degrees
        if label == 5:
            angle = np.pi / 2 + wobble  # the wave runs along y, so the stripes lie horizontal
        else:
            angle = np.where(p[:, 16] < 0.5, np.pi / 4, 3 * np.pi / 4) + wobble
        t = x * _col(np.cos(angle)) + y * _col(np.sin(angle))
        return _wave_coverage(np.sin(k * t + phase), k, px)
    theta = np.pi / 2 * p[:, 3]  # squares and lattices repeat every 90 degrees
    c, s = _col(np.cos(theta)), _col(np.sin(theta))
    qx, qy = x * c + y * s, y * c - x * s
    if label == 7:
        k = _col(np.pi * (2.0 + 1.5 * p[:, 14]))  # 4 to 7 squares across
        v = np.sin(k * qx + phase) * np.sin(k * qy + _col(2 * np.pi * p[:, 17]))
        return _wave_coverage(v, k, px)
    period = _col(2.0 / (4.0 + 2.0 * p[:, 14]))  # 4 to 6 dots across
    fx = np.mod(qx / period + _col(p[:, 15]), 1.0) - 0.5
    fy = np.mod(qy / period + _col(p[:, 17]), 1.0) - 0.5
    sd = np.sqrt(fx * fx + fy * fy) * period - period * _col(0.20 + 0.12 * p[:, 16])
    return _coverage(sd, px)


def _blobs(p: np.ndarray, grid: Grid) -> np.ndarray:
    x, y, _ = grid
    img = (0.05 + 0.15 * p[:, 8])[:, None, None, None]  # a dark background the blobs add light onto
    for j in range(3):
        b = p[:, 18 + 6 * j: 24 + 6 * j]
        d2 = (x - _col((b[:, 0] - 0.5) * 1.4)) ** 2 + (y - _col((b[:, 1] - 0.5) * 1.4)) ** 2
        sigma = _col(0.25 + 0.30 * b[:, 2])
        img = img + np.exp(-d2 / (2 * sigma * sigma))[..., None] * b[:, None, None, 3:6]
    return img


def _compose(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    img = mask[..., None] * (fg - bg)[:, None, None, :]
    img += bg[:, None, None, :]  # in place: these (n, S, S, 3) passes dominate the run time
    return img


def _render_class(label: int, p: np.ndarray, grid: Grid) -> np.ndarray:
    if label in _SHAPE_COLOURS:
        return _compose(_shape_mask(label, p, grid), _jitter(_SHAPE_COLOURS[label], p), _neutral_background(p))
    if label in _TEXTURE_COLOURS:
        fg, bg = _TEXTURE_COLOURS[label]
        return _compose(_texture_mask(label, p, grid), _jitter(fg, p), _jitter(bg, p))
    return _blobs(p, grid)


def _draw(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    # Uniform noise: several times cheaper to draw than Gaussian, and invisible as a difference at 3/255.
    return rng.random(_NUM_PARAMS), rng.random((size, size), dtype=np.float32) - np.float32(0.5)


def _render_block(labels: np.ndarray, seed: int, start: int, size: int) -> np.ndarray:
    draws = [_draw(seed, start + i, size) for i in range(len(labels))]
    params = np.stack([d[0] for d in draws]).astype(np.float32)
    axis = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    grid: Grid = (axis[None, None, :], axis[None, :, None], 2.0 / size)
    # Illumination gain and sensor noise are shared by every class, so neither gives the label away; both
    # are folded with the 255 scale and the rounding offset into single-channel planes.
    angle = 2 * np.pi * params[:, 12]
    ramp = grid[0] * _col(np.cos(angle)) + grid[1] * _col(np.sin(angle))
    gain = (1.0 + _col(0.2 * params[:, 13]) * ramp) * np.float32(255.0)
    offset = np.stack([d[1] for d in draws]) * np.float32(_NOISE_SIGMA * 255.0 * 12**0.5) + np.float32(0.5)
    out = np.empty((len(labels), size, size, 3), np.uint8)
    for label in np.unique(labels):
        sel = np.flatnonzero(labels == label)
        img = _render_class(int(label), params[sel], grid)
        img *= gain[sel][..., None]
        img += offset[sel][..., None]
        np.clip(img, 0.0, 255.0, out=img)
        out[sel] = img.astype(np.uint8)  # truncation of x + 0.5: round half up
    return out


def render(labels: np.ndarray | Sequence[int], seed: int, size: int = 64, *, start: int = 0) -> np.ndarray:
    """Renders one image per label as uint8 (N, size, size, 3); image i uses global index `start + i`."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), got {labels.min()}..{labels.max()}")
    if size < 1 or seed < 0 or start < 0:
        raise ValueError(f"need size >= 1, seed >= 0 and start >= 0, got {size}, {seed}, {start}")
    out = np.empty((len(labels), size, size, 3), np.uint8)
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for lo in range(0, len(labels), chunk):
        out[lo:lo + chunk] = _render_block(labels[lo:lo + chunk], seed, start + lo, size)
    return out


def make_dataset(num_images: int, seed: int = 0, size: int = 64, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images of global indices [start, start + num_images) with labels index % num_classes."""
    labels = np.arange(start, start + num_images, dtype=np.int64) % NUM_CLASSES
    return render(labels, seed, size, start=start), labels


def save_npz(path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray) -> Path:
    """Writes the ADM layout (arr_0: uint8 NHWC, labels) atomically, so a crash never leaves half a file."""
    images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append its own ".npz"
            np.savez(f, arr_0=images, labels=labels)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

