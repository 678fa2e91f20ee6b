"""The zoo: the export (fp16 + manifest), checked loading, the registered zoo variants, and the shipped zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import varbench.variants  # noqa: F401  (registers the variants)
from varbench.harness.train import zoo_build
from varbench.harness.eval.extractors import ProjectCNN, project_extractor_name, resolve_weights
from varbench.harness.eval.fits import fit_power_law
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import VARIANTS
from varbench.harness.core.sampling import SampleConfig
from varbench.harness.train import TrainConfig, train
from varbench.harness.train import steps as T
from varbench.variants import zoo
from varbench.variants.loading import load_var_net
from varbench.variants.zoo import ZooError, manifest, zoo_file

SMALL = dict(preset="tiny", threads=1, num_train=64, num_heldout=16, progress=False, log_every=1, ckpt_every=1000)
TINY_ZOO = ("vqvae", "classifier", "var_d1", "var_d2")


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    """A zoo of tiny-preset models trained for a few steps, exported like the real one."""
    runs = tmp_path_factory.mktemp("runs")
    train(TrainConfig("vqvae", str(runs / "vqvae"), steps=3, batch_size=8, **SMALL))
    train(TrainConfig("classifier", str(runs / "classifier"), steps=3, batch_size=8, **SMALL))
    for d in (1, 2):
        train(TrainConfig("var", str(runs / f"var_d{d}"), steps=3, batch_size=8, depth=d,
                          vqvae=str(runs / "vqvae" / "model.pt"), **SMALL))
    dest = tmp_path_factory.mktemp("zoo")
    zoo_build.export(runs, dest, train_minutes=0.1, names=TINY_ZOO, calibration_images=64)
    return dest


def test_export_writes_fp16_files_and_a_manifest_that_describes_them(tiny_zoo):
    doc = json.loads((tiny_zoo / zoo.MANIFEST).read_text())
    assert set(doc["models"]) == set(TINY_ZOO) and doc["data"]["patch_nums"] == [1, 2, 3, 4, 5, 6, 8]
    for name, entry in doc["models"].items():
        state = torch.load(tiny_zoo / entry["file"], weights_only=True)
        floats = [v for k, v in state.items() if v.is_floating_point() and k not in ("feature_mean", "feature_scale")]
        assert floats and all(v.dtype == torch.float16 for v in floats)  # the classifier's scale buffers: fp32
        assert [s for s, _ in entry["loss_curve"]] == [1, 2, 3]
        assert entry["train_config"]["steps"] == 3 and entry["bytes"] == (tiny_zoo / entry["file"]).stat().st_size
    assert doc["models"]["var_d1"]["heldout"]["heldout_ce"] > 0
    assert doc["models"]["var_d2"]["params"] == T.param_count(load_var_net(tiny_zoo / "var_d2.pt"))
    assert 0 <= doc["models"]["classifier"]["heldout"]["heldout_acc"] <= 1


def test_export_calibrates_the_classifier_feature_scale_so_a_retrained_zoo_scores_on_the_documented_scale(tiny_zoo):
    from varbench.harness.eval.extractors import PROJECT_CNN, SCALE_KEYS, feature_scale_name

    doc = json.loads((tiny_zoo / zoo.MANIFEST).read_text())
    assert doc["models"]["classifier"]["feature_scale"]["images"] == 64
    state = torch.load(tiny_zoo / "classifier.pt", weights_only=True)
    assert all(state[k].dtype == torch.float32 for k in SCALE_KEYS)
    weights = str(tiny_zoo / "classifier.pt")
    assert feature_scale_name(PROJECT_CNN, weights).startswith("centred")


def test_zoo_file_checks_the_manifest(tiny_zoo, tmp_path):
    assert zoo_file("var_d1", tiny_zoo) == str(tiny_zoo / "var_d1.pt")
    with pytest.raises(ZooError, match="has no model 'var_d9'; it has: classifier, var_d1, var_d2, vqvae"):
        zoo_file("var_d9", tiny_zoo)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_zoo.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    with open(broken / "var_d2.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ZooError, match=r"var_d2.pt has sha256 .* the manifest says .*varbench train zoo"):
        zoo_file("var_d2", broken)
    (broken / "var_d1.pt").unlink()
    with pytest.raises(ZooError, match="var_d1.pt is missing"):
        zoo_file("var_d1", broken)
    with pytest.raises(ZooError, match="no zoo manifest"):
        zoo_file("var_d1", tmp_path)


def test_zoo_variants_load_the_zoo_and_name_it(tiny_zoo, monkeypatch):
    monkeypatch.setenv("VARBENCH_ZOO", str(tiny_zoo))
    variant = VARIANTS.get("var_zoo_d1")()
    sha = manifest()["models"]["var_d1"]["sha256"]
    assert variant.name == "var_zoo_d1" and f"zoo:var_d1 (sha256 {sha[:12]})" in variant.weights
    assert next(variant.net.parameters()).dtype == torch.float32  # fp16 files compute in fp32
    images = generate(variant, torch.tensor([0, 3]), SampleConfig(cfg=1.5, top_k=10, top_p=0.9), g_seed=0).images
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    random = VARIANTS.get("var_zoo_d1")(weights="random")
    assert random.weights.startswith("random") and random.net.cfg == T.var_config("zoo", 1)


def test_the_project_extractor_defaults_to_the_zoo_classifier(tiny_zoo, monkeypatch):
    monkeypatch.setenv("VARBENCH_ZOO", str(tiny_zoo))
    path = resolve_weights("varbench-cnn", None)
    assert path == str(tiny_zoo / "classifier.pt")
    assert project_extractor_name(path).startswith("varbench-cnn (zoo classifier, held-out accuracy")
    assert resolve_weights("varbench-cnn", "random") == "random"
    assert "untrained" in project_extractor_name("random")
    model = ProjectCNN.load(path)
    assert model.head.weight.shape[0] == T.ZOO_NUM_CLASSES and model.head.weight.dtype == torch.float32
    monkeypatch.setenv("VARBENCH_ZOO", str(tiny_zoo / "nowhere"))
    with pytest.raises(FileNotFoundError, match="quality.extractor_weights=random"):
        resolve_weights("varbench-cnn", None)


def test_build_runs_each_member_with_the_planned_arguments(tmp_path):
    args = zoo_build.job_args("var_d3", tmp_path)
    assert args[0] == "var" and args[args.index("--depth") + 1] == "3" and "--resume" in args
    assert args[args.index("--vqvae") + 1] == str(tmp_path / "vqvae" / "model.pt")
    assert args[args.index("--steps") + 1] == str(T.ZOO_PLAN["var_d3"].steps)
    assert zoo_build.job_args("vqvae", tmp_path, threads=2)[:2] == ["vqvae", "--out"]
    refiner = zoo_build.job_args("refiner_d2", tmp_path)
    assert refiner[refiner.index("--from-scale") + 1] == str(T.ZOO_CODE_DRAFT_STEPS)
    assert refiner[refiner.index("--init") + 1] == str(tmp_path / "var_d2" / "model.pt")
    hmar = zoo_build.job_args("hmar_d5", tmp_path)
    assert hmar[0] == "hmar" and hmar[hmar.index("--stage") + 1] == "2"
    assert hmar[hmar.index("--init") + 1] == str(tmp_path / "hmar_d5_ns" / "model.pt")
    with pytest.raises(RuntimeError, match="has not finished training"):
        zoo_build.export(tmp_path, tmp_path / "zoo", names=["vqvae"])


def test_the_plan_trains_every_member_once_after_what_it_starts_from():
    lanes = [list(lane) for lane in T.ZOO_LANES]
    in_lanes = [n for lane in lanes for n in lane]
    assert sorted(in_lanes) == sorted(n for n in T.ZOO_PLAN if n not in ("vqvae", "classifier"))
    for lane in lanes:
        for i, name in enumerate(lane):
            init = T.ZOO_PLAN[name].init
            assert not init or init in lane[:i], f"{name} starts from {init}, which must come before it in its lane"
    assert "hmar_d5_ns" not in T.ZOO_SHIPPED and "hmar_d5" in T.ZOO_SHIPPED


def test_one_registered_factory_per_zoo_depth():
    assert VARIANTS.list("var_zoo_d*") == [f"var_zoo_d{d}" for d in T.ZOO_VAR_DEPTHS]
    plan = T.plan_minutes()
    assert plan["total"] < 90  # the budget for retraining the whole zoo on a 2-core CPU


# -- the shipped zoo ----------------------------------------------------------------------------------------

SHIPPED = zoo.ZOO_DIR / zoo.MANIFEST
shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="no zoo in this checkout (varbench train zoo --export)")


@shipped
def test_shipped_zoo_matches_its_manifest_and_fits_the_budget():
    doc = manifest(zoo.ZOO_DIR)
    assert set(doc["models"]) == set(T.ZOO_SHIPPED)
    total = 0
    for name in doc["models"]:
        path = Path(zoo_file(name, zoo.ZOO_DIR))  # checks the sha256
        total += path.stat().st_size
    assert total < 50e6
    assert doc["models"]["classifier"]["heldout"]["heldout_acc"] > 0.9


@shipped
def test_shipped_zoo_test_loss_falls_as_a_power_law_of_parameters():
    models = manifest(zoo.ZOO_DIR)["models"]
    names = [f"var_d{d}" for d in T.ZOO_VAR_DEPTHS]
    params = [models[n]["params"] for n in names]
    loss = [models[n]["heldout"]["heldout_ce"] for n in names]
    assert len(names) >= 5 and loss == sorted(loss, reverse=True)
    fit = fit_power_law(params, loss, holdout=0)
    assert fit.alpha < 0 and fit.r <= -0.95


@shipped
def test_shipped_code_refiner_is_specialised_to_the_scales_it_makes():
    """The fine-tuned refiner beats the plain VAR-d2 it started from on the scales CoDe gives it (held-out)."""
    from varbench.harness.eval.synthetic import make_dataset
    from varbench.harness.train.tasks import HELDOUT_START
    from varbench.variants.loading import load_vqvae

    images, labels = make_dataset(256, seed=0, start=HELDOUT_START)  # the trainer's held-out split
    vae = load_vqvae(zoo_file("vqvae")).float().eval()
    x, y = T.images_to_tensor(torch.from_numpy(images)), torch.from_numpy(labels).long()
    with torch.no_grad():
        tokens = vae.encode_tokens(x, T.ZOO_PATCH_NUMS)
        ce = {name: T.var_step(load_var_net(zoo_file(name)), vae, tokens, y, 0.0, None,
                               T.ZOO_CODE_DRAFT_STEPS)[0].item() for name in ("var_d2", "refiner_d2")}
    assert ce["refiner_d2"] < ce["var_d2"] - 0.005, ce
    code = VARIANTS.get("code_zoo_d5_d2")()
    assert "refiner zoo:refiner_d2" in code.weights and code.draft_steps == T.ZOO_CODE_DRAFT_STEPS
    assert "refiner zoo:var_d2" in VARIANTS.get("code_zoo_d5_d2")(finetuned=False).weights


@shipped
def test_shipped_hmar_masked_path_predicts_better_than_its_next_scale_path():
    entry = manifest(zoo.ZOO_DIR)["models"]["hmar_d5"]
    held = entry["heldout"]
    assert entry["train_config"]["stage"] == 2 and entry["init_run"]["name"] == "hmar_d5_ns"  # stage 1 recorded
    # same held-out masked positions: the masked path sees the scale's other tokens, the next-scale pass does not
    assert held["heldout_mask_ce"] < held["heldout_ns_ce_masked"]
    hmar = VARIANTS.get("hmar_zoo_d5")()
    out = generate(hmar, torch.tensor([0, 7]), SampleConfig(cfg=1.5, top_k=50, top_p=0.96), g_seed=0)
    assert out.images.shape == (2, 3, 64, 64) and "zoo:hmar_d5" in hmar.weights
    assert [t.shape for t in out.tokens] == [(2, pn * pn) for pn in T.ZOO_PATCH_NUMS]
