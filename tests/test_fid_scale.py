"""The project CNN's feature scale (issue 13, item 1): the zoo classifier ships a centring and one global factor
computed on its training split, so FID/KID read on a documented scale; raw-feature maths is unchanged."""

import numpy as np
import pytest
import torch
from varbench.harness.eval import extractors as ex
from varbench.harness.eval.quality import reference_from_images, score
from varbench.harness.eval.synthetic import make_dataset

SEED = 20251123  # the synthetic reference's seed (harness/run/reference.py)


@pytest.fixture(scope="module")
def zoo_and_raw(tmp_path_factory):
    """The shipped classifier, and the same weights without the scale buffers (how it was before)."""
    zoo = ex.resolve_weights(ex.PROJECT_CNN, None)
    state = torch.load(zoo, map_location="cpu", weights_only=True)
    raw = tmp_path_factory.mktemp("raw") / "classifier_raw.pt"
    torch.save({k: v for k, v in state.items() if k not in ex.SCALE_KEYS}, raw)
    return zoo, str(raw)


def test_calibration_centres_the_features_and_gives_unit_mean_variance():
    images = make_dataset(40, seed=3, size=32)[0]
    model = ex.ProjectCNN().reset_parameters_deterministic()
    assert not model.is_calibrated  # the identity buffers: raw features
    ex.calibrate_feature_scale(model, images)
    assert model.is_calibrated
    with torch.no_grad():
        z = model.normalise(model.features(torch.from_numpy(images).permute(0, 3, 1, 2))).double()
    assert z.mean(0).abs().max() < 1e-4
    assert float(z.var(0).sum()) == pytest.approx(ex.ProjectCNN.feature_dim, rel=1e-4)


def test_the_shipped_classifier_names_its_calibrated_scale(zoo_and_raw):
    zoo, raw = zoo_and_raw
    # calibrate_weights on the training split (seed 0, images 0..9999) gave x0.2500063 (tr Σ_raw = 4096)
    assert float(ex.ProjectCNN.load(zoo).feature_scale) == pytest.approx(0.2500063, rel=1e-6)
    assert ex.feature_scale_name(ex.PROJECT_CNN, zoo).startswith(
        "centred, unit mean variance on the training split (x0.25, sha256 ")
    assert ex.feature_scale_name(ex.PROJECT_CNN, raw) == ex.RAW_SCALE  # weights older than the buffers
    assert ex.feature_scale_name(ex.PROJECT_CNN, ex.RANDOM_INIT) == ex.RAW_SCALE
    assert ex.feature_scale_name(ex.INCEPTION, "any.pth") == ex.RAW_SCALE


def test_a_state_dict_with_foreign_keys_is_refused(tmp_path, zoo_and_raw):
    state = torch.load(zoo_and_raw[0], map_location="cpu", weights_only=True)
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match=r"not a ProjectCNN state dict: missing \[\], unexpected \['extra"):
        ex.ProjectCNN.load(str(tmp_path / "bad.pt"))


def test_the_scale_multiplies_fid_by_its_square_and_leaves_precision_recall_alone(zoo_and_raw):
    zoo, raw = zoo_and_raw
    ref_images = make_dataset(120, seed=SEED)[0]
    real = make_dataset(40, seed=SEED, start=120)[0]  # held out from the reference, as the real-data row
    grey = np.full((40, 64, 64, 3), 128, np.uint8)
    out = {}
    for name, w in (("zoo", zoo), ("raw", raw)):
        ref = reference_from_images(ref_images, "ref", ex.PROJECT_CNN, w)
        out[name] = {x: score(imgs, ref, ["fid", "kid", "prc"], ex.PROJECT_CNN, w, bootstrap=0)
                     for x, imgs in (("real", real), ("grey", grey))}
    s2 = float(ex.ProjectCNN.load(zoo).feature_scale) ** 2
    for x in ("real", "grey"):
        assert out["zoo"][x]["fid"] == pytest.approx(out["raw"][x]["fid"] * s2, rel=1e-5)
        assert (out["zoo"][x]["precision"], out["zoo"][x]["recall"]) == (
            out["raw"][x]["precision"], out["raw"][x]["recall"])
    assert out["zoo"]["real"]["feature_scale"].startswith("centred") and out["raw"]["real"]["feature_scale"] == "raw"
    # the readable scale: held-out data a few units (3.8 at 100 vs 300 images, 1.6 at 256 vs 1000), a flat grey
    # image in the hundreds (511), where the raw scale read 61 and 8,000
    assert out["zoo"]["real"]["fid"] < 10 and out["zoo"]["grey"]["fid"] > 100
    assert abs(out["zoo"]["real"]["kid_mean"]) < 0.5 < out["zoo"]["grey"]["kid_mean"]
