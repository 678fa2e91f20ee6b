"""Pixel consistency of a variant's images against the baseline's images for the same seeds and labels.

As ScaleKV reports for KV-cache compression: PSNR, SSIM and (when its weights are on disk) LPIPS, per image,
averaged, with percentile-bootstrap 95% intervals over images.

- `psnr`: 10·log10(255² / MSE) per image over all pixels and channels (float64). Identical images have
  MSE 0 and PSNR +inf; the mean is then +inf too (reported as float("inf"), and `num_identical` counts them).
- `ssim`: Wang et al. 2004 with an 11×11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, L 255, computed
  per RGB channel over the "valid" region (no padding) and averaged over the map and the channels; no
  downsampling (Wang's MATLAB script downsamples images larger than 256 px by round(min(H, W) / 256)).
- `lpips`: torch-fidelity's LPIPS-VGG16 ("lpips-vgg16"). It needs two files that torch-fidelity would
  download: the LPIPS linear layers `weights-vgg16-lpips.pth` (torch-fidelity v0.2.0 release) and
  torchvision's ImageNet VGG16 `vgg16-397923af.pth`. Only local files are used (see `lpips_weight_files`);
  without them `lpips` returns None and logs why.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .extractors import file_sha256

__all__ = ["psnr", "ssim", "lpips", "lpips_weight_files", "consistency", "LPIPS_WEIGHTS_FILE",
           "VGG16_WEIGHTS_FILE"]

log = logging.getLogger(__name__)

LPIPS_WEIGHTS_FILE = "weights-vgg16-lpips.pth"
LPIPS_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{LPIPS_WEIGHTS_FILE}"
VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"
VGG16_WEIGHTS_URL = f"https://download.pytorch.org/models/{VGG16_WEIGHTS_FILE}"
LPIPS_ENV = "VARBENCH_LPIPS_WEIGHTS"
VGG16_ENV = "VARBENCH_VGG16_WEIGHTS"
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2, DATA_RANGE = 11, 1.5, 0.01, 0.03, 255.0


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be a uint8 N×H×W×3 array, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {a.shape} vs {b.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 N×H×W×3 arrays (data range 255); +inf where the images are identical."""
    _check_pair(a, b)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE**2 / mse)


def _gaussian_1d() -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _blur(t: torch.Tensor) -> torch.Tensor:
    """Gaussian filter of every channel over the valid region. The window is the outer product of a 1-D
    Gaussian with itself, so two 1-D passes equal the 11×11 one at 2/11 of the work (float64 convolutions
    have no fast CPU kernels)."""
    c, g = t.shape[1], _gaussian_1d()
    t = F.conv2d(t, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(t, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(a: np.ndarray, b: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004; see the module docstring) of uint8 N×H×W×3 arrays, in float64."""
    _check_pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW}, got {a.shape[1:3]}")
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    out = []
    for i in range(0, len(a), batch_size):
        x = torch.from_numpy(a[i:i + batch_size]).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(b[i:i + batch_size]).permute(0, 3, 1, 2).double()
        mu_x, mu_y, xx, yy, xy = _blur(torch.cat((x, y, x * x, y * y, x * y), dim=1)).split(3, dim=1)
        var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
        smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        out.append(smap.mean(dim=(1, 2, 3)))
    return torch.cat(out).numpy()


def lpips_weight_files(weights: str | None = None) -> tuple[str, str] | None:
    """(LPIPS linear layers, VGG16 backbone) files if both exist locally, else None.

    LPIPS: `weights`, $VARBENCH_LPIPS_WEIGHTS, or the torch hub cache (<hub>/checkpoints/weights-vgg16-lpips.pth).
    VGG16: $VARBENCH_VGG16_WEIGHTS, vgg16-397923af.pth beside the LPIPS file, or the torch hub cache.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    lp = next((c for c in (weights, os.environ.get(LPIPS_ENV), str(hub / LPIPS_WEIGHTS_FILE))
               if c and Path(c).is_file()), None)
    beside = str(Path(lp).parent / VGG16_WEIGHTS_FILE) if lp else None
    vgg = next((c for c in (os.environ.get(VGG16_ENV), beside, str(hub / VGG16_WEIGHTS_FILE))
                if c and Path(c).is_file()), None)
    if lp is None or vgg is None:
        missing = [f"{LPIPS_WEIGHTS_FILE} (from {LPIPS_WEIGHTS_URL}; pass a path, ${LPIPS_ENV} or the hub "
                   f"cache {hub})"] if lp is None else []
        missing += [f"{VGG16_WEIGHTS_FILE} (from {VGG16_WEIGHTS_URL}; ${VGG16_ENV}, beside the LPIPS file or "
                    f"the hub cache)"] if vgg is None else []
        log.info("LPIPS skipped: missing %s", "; ".join(missing))
        return None
    return str(Path(lp).resolve()), str(Path(vgg).resolve())


@contextlib.contextmanager
def _hub_dir_with(files: dict[str, str]):
    """A temporary torch hub dir whose checkpoints/ links the given files under the names torch looks for,
    so torch-fidelity's `load_state_dict_from_url` finds them and never downloads."""
    old = getattr(torch.hub, "_hub_dir", None)  # None means "follow $TORCH_HOME": restore exactly that
    with tempfile.TemporaryDirectory(prefix="varbench-hub-") as tmp:
        ckpt = Path(tmp) / "checkpoints"
        ckpt.mkdir()
        for name, src in files.items():
            (ckpt / name).symlink_to(src)
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub._hub_dir = old


@functools.lru_cache(maxsize=1)
def _lpips_model(lpips_file: str, vgg_file: str, shas: tuple[str, str], device: str):
    from torch_fidelity.utils import create_sample_similarity

    cuda = torch.device(device).type == "cuda"
    with _hub_dir_with({LPIPS_WEIGHTS_FILE: lpips_file, VGG16_WEIGHTS_FILE: vgg_file}):
        model = create_sample_similarity("lpips-vgg16", cuda=cuda, verbose=False,
                                         sample_similarity_resize=None, sample_similarity_dtype="uint8")
    return model.to(device)


def lpips(a: np.ndarray, b: np.ndarray, weights: str | None = None, device: str = "cpu",
          batch_size: int = 16) -> np.ndarray | None:
    """Per-image LPIPS-VGG16 distance at full resolution, or None (logged) if its weight files are absent."""
    _check_pair(a, b)
    files = lpips_weight_files(weights)
    if files is None:
        return None
    model = _lpips_model(*files, (file_sha256(files[0]), file_sha256(files[1])), str(device))
    out = []
    with torch.no_grad():
        for i in range(0, len(a), batch_size):
            x = torch.from_numpy(a[i:i + batch_size]).permute(0, 3, 1, 2).to(device)
            y = torch.from_numpy(b[i:i + batch_size]).permute(0, 3, 1, 2).to(device)
            out.append(model(x, y).reshape(-1).double().cpu())
    return torch.cat(out).numpy()


def _mean_ci(values: np.ndarray, draws: np.ndarray) -> tuple[float, list[float] | None]:
    """Mean and percentile-bootstrap 95% interval; non-interpolating percentiles when a mean is inf."""
    if len(draws) == 0:
        return float(values.mean()), None
    means = values[draws].mean(axis=1)
    if np.isfinite(means).all():
        lo, hi = np.percentile(means, [2.5, 97.5])
    else:  # linear interpolation between inf and inf would give nan
        lo, hi = np.percentile(means, 2.5, method="lower"), np.percentile(means, 97.5, method="higher")
    return float(values.mean()), [float(lo), float(hi)]


def consistency(a: np.ndarray, b: np.ndarray, lpips_weights: str | None = None, bootstrap: int = 100,
                seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """PSNR (dB), SSIM and LPIPS of `a` against baseline `b` (same order: image i of each is the same seed).

    Keys: psnr_db, ssim, lpips (None without weights), each with `<key>_ci95` ([lo, hi] over `bootstrap`
    resamples of the images, None if bootstrap == 0), num_images, num_identical (images with PSNR +inf),
    bootstrap, seed, lpips_weights_sha256 (None if LPIPS was skipped).
    """
    _check_pair(a, b)
    per_image = {"psnr_db": psnr(a, b), "ssim": ssim(a, b)}
    lp_files = lpips_weight_files(lpips_weights)
    lp = lpips(a, b, lpips_weights, device) if lp_files else None
    if lp is not None:
        per_image["lpips"] = lp
    n = len(a)
    draws = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
    out: dict[str, Any] = {"lpips": None, "lpips_ci95": None}
    for key, values in per_image.items():
        out[key], out[f"{key}_ci95"] = _mean_ci(values, draws)
    out.update(num_images=n, num_identical=int(np.isinf(per_image["psnr_db"]).sum()), bootstrap=bootstrap,
               seed=seed, lpips_weights_sha256=file_sha256(lp_files[0]) if lp_files else None)
    return out
