"""The real-data row (issue 13, item 1): held-out real images scored against the reference exactly like a cell,
from the synthetic set, from a folder or .npz of real images large enough to split, or absent with its reason."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from varbench.harness.eval.quality import reference_from_images, score
from varbench.harness.eval.synthetic import make_dataset, save_npz
from varbench.harness.run.reference import heldout_real, study_reference

W = "random"  # the untrained seeded extractor: these tests check which images meet which reference


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))


def _q(reference: str, n: int = 4) -> SimpleNamespace:
    return SimpleNamespace(num_samples=n, reference=reference, extractor="varbench-cnn", extractor_weights=W,
                           metrics=("fid", "kid", "prc"))


def _folder(path, images: np.ndarray):
    path.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return path


def test_a_folder_of_real_images_holds_out_its_last_n_against_the_others(tmp_path):
    images = make_dataset(12, seed=5, size=32)[0]
    held, reference, provenance = heldout_real(_q(str(_folder(tmp_path / "real", images))), (32, 32), "cpu")
    assert np.array_equal(held, images[8:]) and reference.num_images == 8
    assert provenance == {"heldout": "the last 4 of the reference's 12 images, against the other 8"}
    assert reference.source.endswith("real (its first 8 images)")
    by_hand = reference_from_images(images[:8], "first 8", "varbench-cnn", W)  # the same statistics
    np.testing.assert_allclose(reference.mu, by_hand.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reference.sigma, by_hand.sigma, rtol=1e-4, atol=1e-6)
    ours = score(held, reference, ["fid", "prc"], "varbench-cnn", W, bootstrap=0)
    again = score(held, by_hand, ["fid", "prc"], "varbench-cnn", W, bootstrap=0)
    assert ours["fid"] == pytest.approx(again["fid"], rel=1e-4) and ours["recall"] == again["recall"]


def test_an_npz_of_real_images_is_split_the_same_way(tmp_path):
    images, labels = make_dataset(10, seed=6, size=16)
    path = save_npz(tmp_path / "real.npz", images, labels)
    held, reference, provenance = heldout_real(_q(str(path)), (16, 16), "cpu")
    assert np.array_equal(held, images[6:]) and reference.num_images == 6
    assert provenance["heldout"] == "the last 4 of the reference's 10 images, against the other 6"


def test_too_few_reference_images_leave_the_row_absent_with_its_reason(tmp_path):
    folder = _folder(tmp_path / "few", make_dataset(7, seed=5, size=16)[0])
    assert heldout_real(_q(str(folder)), (16, 16), "cpu") == (
        "the reference holds 7 images, fewer than twice the 4 samples; none held out")


def test_reference_statistics_over_every_image_leave_nothing_to_hold_out(tmp_path, monkeypatch):
    from varbench.harness.run import reference as ref_module

    images = make_dataset(12, seed=5, size=16)[0]
    full = reference_from_images(images, "adm", "varbench-cnn", W)
    full.stats_from = "npz mu/sigma"  # as an ADM batch's statistics, computed over all of its images
    monkeypatch.setattr(ref_module, "study_reference", lambda q, hw, device: full)
    assert heldout_real(_q("adm.npz"), (16, 16), "cpu") == (
        "the reference's FID statistics (npz mu/sigma) cover all its images; none can be held out")
    full.features = None
    assert heldout_real(_q("adm.npz"), (16, 16), "cpu") == (
        "the reference adm.npz holds statistics only, no images to hold out")


def test_synthetic_held_out_images_follow_the_reference_and_never_overlap_it():
    q = _q("synthetic", n=3)
    held, reference, provenance = heldout_real(q, (16, 16), "cpu")
    assert reference.sha256 == study_reference(q, (16, 16), "cpu").sha256  # the cells' own reference
    assert np.array_equal(held, make_dataset(3, seed=20251123, size=16, start=1000)[0])
    with np.load(reference.source) as npz:
        ref_images = npz["arr_0"]
    assert len(ref_images) == 1000 and np.array_equal(ref_images[:3], make_dataset(3, seed=20251123, size=16)[0])
    flat = {im.tobytes() for im in ref_images}
    assert not any(im.tobytes() in flat for im in held)
    assert provenance == {"heldout": "synthetic images 1000..1002 of seed 20251123 (the reference holds 0..999)"}
