"""Pixel-consistency metrics against closed forms and an independent SciPy SSIM; LPIPS only with local weights."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from varbench.harness.eval import consistency as cons
from varbench.harness.eval.consistency import consistency, lpips, psnr, ssim

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _images(n: int = 6, size: int = 32, seed: int = 0, high: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(n, size, size, 3), dtype=np.uint8)


def _empty_hub(monkeypatch, torch_home):
    """Points torch's hub cache at an empty folder (no set_dir override, so $TORCH_HOME decides)."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert torch.hub.get_dir() == str(torch_home / "hub")
    return torch_home / "hub"


def _noisy(a: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, a.shape)
    return np.clip(a.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("d", [1, 5, 10, 55])
def test_psnr_of_constant_offset(d: int) -> None:
    a = _images(high=200)  # a + d stays <= 255: no clipping, so MSE = d²
    b = (a.astype(np.int64) + d).astype(np.uint8)
    np.testing.assert_allclose(psnr(a, b), 20 * math.log10(255 / d), rtol=1e-12)
    np.testing.assert_allclose(psnr(b, a), 20 * math.log10(255 / d), rtol=1e-12)


def test_psnr_identical_is_inf_and_consistency_reports_it() -> None:
    a = _images()
    assert np.isposinf(psnr(a, a)).all()
    out = consistency(a, a, bootstrap=20)
    assert out["psnr_db"] == float("inf") and out["psnr_db_ci95"] == [float("inf"), float("inf")]
    assert out["num_identical"] == len(a)
    assert out["ssim"] == pytest.approx(1.0, abs=1e-12)
    # one identical image among changed ones: the mean is still inf, the interval has no nan
    b = _noisy(a, 10)
    b[0] = a[0]
    out = consistency(a, b, bootstrap=50)
    assert out["num_identical"] == 1 and out["psnr_db"] == float("inf")
    assert not any(math.isnan(v) for v in out["psnr_db_ci95"])


def test_ssim_identical_is_one() -> None:
    a = _images(size=40)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)


@pytest.mark.parametrize("c1,c2", [(100, 100), (100, 120), (30, 200), (0, 255), (250, 10)])
def test_ssim_of_constant_images_is_the_luminance_term(c1: int, c2: int) -> None:
    # constant images: variances and covariance are 0, so the contrast-structure factor is C2 / C2 = 1
    a = np.full((2, 16, 16, 3), c1, np.uint8)
    b = np.full((2, 16, 16, 3), c2, np.uint8)
    expected = (2 * c1 * c2 + C1) / (c1**2 + c2**2 + C1)
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-9)


def test_ssim_matches_scipy_gaussian_filter_reference() -> None:
    a = _images(n=3, size=24, seed=3, high=256)
    b = _noisy(a, 30, seed=4)
    expected = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        per_channel = []
        for c in range(3):
            # sigma 1.5, radius 5 -> the 11-tap window; crop 5 px to keep the "valid" region only
            def g(t: np.ndarray) -> np.ndarray:
                return gaussian_filter(t, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]
            xc, yc = x[..., c], y[..., c]
            mx, my = g(xc), g(yc)
            vx, vy, cxy = g(xc * xc) - mx**2, g(yc * yc) - my**2, g(xc * yc) - mx * my
            m = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
            per_channel.append(m.mean())
        expected.append(np.mean(per_channel))
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-10)


def test_ssim_and_psnr_decrease_with_noise() -> None:
    a = _images(size=32, high=256)
    s = [ssim(a, _noisy(a, sigma)).mean() for sigma in (2, 10, 40)]
    p = [psnr(a, _noisy(a, sigma)).mean() for sigma in (2, 10, 40)]
    assert 1 > s[0] > s[1] > s[2]
    assert p[0] > p[1] > p[2]


def test_input_checks() -> None:
    a = _images()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match="uint8"):
        ssim(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(a[:, :8, :8], a[:, :8, :8])


def test_consistency_interval_and_seed() -> None:
    a = _images(n=20, size=16)
    b = _noisy(a, 15)
    out = consistency(a, b, bootstrap=200, seed=7)
    for key in ("psnr_db", "ssim"):
        lo, hi = out[f"{key}_ci95"]
        assert lo <= out[key] <= hi and lo < hi
    assert out["psnr_db"] == pytest.approx(psnr(a, b).mean(), rel=1e-12)
    assert consistency(a, b, bootstrap=200, seed=7) == out
    assert consistency(a, b, bootstrap=200, seed=8)["ssim_ci95"] != out["ssim_ci95"]
    assert consistency(a, b, bootstrap=0)["ssim_ci95"] is None


def test_lpips_is_none_without_weights(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.delenv(cons.LPIPS_ENV, raising=False)
    monkeypatch.delenv(cons.VGG16_ENV, raising=False)
    _empty_hub(monkeypatch, tmp_path / "torch-home")
    a = _images(n=2)
    with caplog.at_level(logging.INFO, logger="varbench.harness.eval.consistency"):
        assert lpips(a, a) is None
        assert lpips(a, a, weights=str(tmp_path / "nope.pth")) is None
    assert cons.LPIPS_WEIGHTS_FILE in caplog.text and cons.VGG16_WEIGHTS_FILE in caplog.text
    out = consistency(a, _noisy(a, 5), bootstrap=5)
    assert out["lpips"] is None and out["lpips_ci95"] is None and out["lpips_weights_sha256"] is None


@pytest.fixture(scope="module")
def fake_lpips_files(tmp_path_factory):
    """Random LPIPS + VGG16 weight files (the architecture only; the numbers mean nothing). VGG16's
    classifier (124 M parameters, unused by LPIPS) is saved as stride-0 zeros so the file stays ~60 MB."""
    import torchvision

    d = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    for i, (fan_out, fan_in) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
        state[f"classifier.{i}.weight"] = torch.zeros(1).expand(fan_out, fan_in)
        state[f"classifier.{i}.bias"] = torch.zeros(1).expand(fan_out)
    torch.save(state, d / cons.VGG16_WEIGHTS_FILE)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
           for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, d / cons.LPIPS_WEIGHTS_FILE)
    return d / cons.LPIPS_WEIGHTS_FILE


def test_lpips_with_local_weights_never_downloads(fake_lpips_files, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(cons.VGG16_ENV, raising=False)
    hub = _empty_hub(monkeypatch, tmp_path / "torch-home")  # nothing in the hub cache: only our files
    a = _images(n=3, size=32, high=256)
    same = lpips(a, a, weights=str(fake_lpips_files))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)
    d1 = lpips(a, _noisy(a, 10), weights=str(fake_lpips_files))
    d2 = lpips(a, _noisy(a, 60), weights=str(fake_lpips_files))
    assert (d1 > 0).all() and (d2 > d1).all()
    np.testing.assert_allclose(lpips(_noisy(a, 10), a, weights=str(fake_lpips_files)), d1, rtol=1e-5)
    assert not hub.exists()
    out = consistency(a, _noisy(a, 10), lpips_weights=str(fake_lpips_files), bootstrap=10)
    assert out["lpips"] == pytest.approx(d1.mean(), rel=1e-6) and out["lpips_weights_sha256"]
