"""Training on an ImageNet-style folder (`train --data`): layout, VAR's transform, streamed batches, resume, presets."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from varbench.harness.eval.synthetic import make_dataset
from varbench.harness.train import TrainConfig, train
from varbench.harness.train.data import FolderData, ImageFolderSet, crop_rng, epoch_indices, scan_folder
from varbench.harness.train import steps as T
from varbench.variants.loading import load_var_net
from varbench.variants.var_model import VARConfig, VARNet
from varbench.variants.vqvae import VQVAE, VQVAEConfig

from conftest import KEYS, need

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("zebra", "apple", "mango")  # synthetic classes 0, 1, 2; sorted: apple 0, mango 1, zebra 2
LABEL = {"apple": 0, "mango": 1, "zebra": 2}
W, H = 100, 90  # shorter side 90 -> 72 (= round(1.125·64)), longer int(72·100/90) = 80, then a 64 crop
RUN = dict(preset="tiny", threads=1, progress=False, log_every=1, ckpt_every=1000, depth=1, batch_size=6, lr=3e-3)


def _save(img: np.ndarray, path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((W, H), Image.Resampling.BILINEAR).convert(mode).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 4 train / 2 val images of 100x90, one a grayscale .JPEG, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("imagenet")
    images, labels = make_dataset(60, seed=3, size=96)
    for k, name in enumerate(CLASSES):
        own = images[labels == k]
        for i in range(4):
            jpeg = k == 0 and i == 3
            _save(own[i], root / "train" / name / f"{name}_{i}.{'JPEG' if jpeg else 'png'}", "L" if jpeg else "RGB")
        for i in range(2):
            _save(own[4 + i], root / "val" / name / f"{name}_val_{i}.png")
    (root / "train" / "apple" / "notes.txt").write_text("not an image")
    return root


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_labels_follow_sorted_class_dirs(folder):
    index = scan_folder(folder)
    assert index.classes == ("apple", "mango", "zebra")
    assert len(index.train_files) == 12 and len(index.val_files) == 6  # notes.txt skipped, .JPEG kept
    assert np.bincount(index.train_labels).tolist() == [4, 4, 4]
    for rel, label in zip(index.train_files, index.train_labels):
        assert LABEL[Path(rel.decode()).parent.name] == label
    assert sum(f.decode().endswith(".JPEG") for f in index.train_files) == 1
    assert index.val_labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_transform_is_resize_then_crop_and_deterministic(folder):
    index = scan_folder(folder)
    train_set = ImageFolderSet(index.root, index.train_files, index.train_labels, 64, seed=7, train=True)
    val_set = ImageFolderSet(index.root, index.val_files, index.val_labels, 64, seed=7, train=False)
    x, label = train_set[(5, 11, 2)]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (64, 64, 3) and label == index.train_labels[5]
    assert torch.equal(x, train_set[(5, 11, 2)][0])
    with Image.open(index.root / index.train_files[5].decode()) as img:  # 100x90 -> 80x72 with LANCZOS
        resized = np.asarray(img.convert("RGB").resize((80, 72), Image.Resampling.LANCZOS))
    rng = crop_rng(7, 11, 2)
    top, left = int(rng.integers(0, 9)), int(rng.integers(0, 17))
    assert np.array_equal(x.numpy(), resized[top:top + 64, left:left + 64])
    crops = {train_set[(5, step, 0)][0].numpy().tobytes() for step in range(6)}
    assert len(crops) > 1  # the crop moves with the step
    with Image.open(index.root / index.val_files[0].decode()) as img:  # center crop: offsets (4, 8)
        resized = np.asarray(img.convert("RGB").resize((80, 72), Image.Resampling.LANCZOS))
    assert np.array_equal(val_set[(0, 0, 0)][0].numpy(), resized[4:68, 8:72])
    gray = next(i for i, f in enumerate(index.train_files) if f.decode().endswith(".JPEG"))
    g = train_set[(gray, 0, 0)][0]
    assert g.shape[-1] == 3 and torch.equal(g[..., 0], g[..., 1]) and torch.equal(g[..., 1], g[..., 2])


def test_batches_depend_on_seed_and_step_only(folder):
    index = scan_folder(folder)
    order = torch.cat([epoch_indices(0, s, 4, 12) for s in range(3)])
    assert sorted(order.tolist()) == list(range(12))  # one epoch visits every image once
    full = FolderData(index, 64, seed=0, batch_size=4)
    ranks = [FolderData(index, 64, seed=0, batch_size=4, workers=1, rank=r, world=2) for r in range(2)]
    whole = list(full.batches(2, 5))
    again = list(full.batches(3, 5))  # starting later (a resume) gives the same steps
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[1:], again))
    for step, (x, y) in enumerate(whole):
        parts = [list(r.batches(2 + step, 3 + step))[0] for r in ranks]  # every 2nd sample, same crops
        assert torch.equal(parts[0][0], x[0::2]) and torch.equal(parts[1][0], x[1::2])
        assert torch.equal(parts[0][1], y[0::2]) and torch.equal(parts[1][1], y[1::2])


def test_var_on_folder_scores_val(folder, tmp_path):
    out = tmp_path / "var"
    summary = train(TrainConfig("var", str(out), steps=3, data=str(folder), **RUN))
    assert summary["finished"] and len(_log(out)) == 3
    assert summary["data_classes"] == 3 and summary["data_train_images"] == 12
    assert summary["heldout_split"] == "val/ (6 images)" and summary["epochs"] == pytest.approx(1.5)
    net = load_var_net(out / "model.pt")
    assert net.cfg == T.var_config("tiny", 1)
    # the held-out CE is the model's CE on val/'s center crops, tokenised by the run's random VQVAE (seed + 1)
    index = scan_folder(folder)
    val = ImageFolderSet(index.root, index.val_files, index.val_labels, 64, seed=0, train=False)
    images = torch.stack([val[(i, 0, 0)][0] for i in range(6)])
    vae = T.init_vqvae_(VQVAE(T.TINY.vqvae), torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():
        tokens = vae.encode_tokens(T.images_to_tensor(images), T.TINY.patch_nums)
        ce, _ = T.var_step(net.eval(), vae, tokens, torch.from_numpy(index.val_labels), 0.0)
    assert summary["heldout_ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert summary["heldout_ce"] < summary["uniform_ce"] + 0.1


def test_folder_run_resumes_exactly_with_workers(folder, tmp_path):
    common = dict(RUN, steps=5, data=str(folder))
    full = tmp_path / "full"
    train(TrainConfig("var", str(full), **common))
    part = tmp_path / "part"
    s1 = train(TrainConfig("var", str(part), stop_at=2, workers=2, **common))
    assert not s1["finished"] and "heldout_ce" not in s1
    s2 = train(TrainConfig("var", str(part), workers=2, **common), resume=True)
    assert s2["finished"] and s2["steps_this_run"] == 3
    losses = [e["loss"] for e in _log(full)]
    assert len(losses) == 5 and [e["loss"] for e in _log(part)] == losses
    a, b = torch.load(full / "model.pt", weights_only=True), torch.load(part / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    with pytest.raises(ValueError, match="data: checkpoint"):  # another folder is another run
        train(TrainConfig("var", str(part), **dict(common, data=str(moved))), resume=True)
    train(TrainConfig("var", str(tmp_path / "m"), stop_at=1, **dict(common, data=str(moved))))
    next((moved / "train" / "zebra").iterdir()).unlink()
    with pytest.raises(ValueError, match="data folder changed.*\n.*data_train_images: checkpoint 12 vs now 11"):
        train(TrainConfig("var", str(tmp_path / "m"), **dict(common, data=str(moved))), resume=True)


def test_image_kinds_read_the_folder_and_report_missing_val(folder, tmp_path):
    cls = train(TrainConfig("classifier", str(tmp_path / "cls"), **dict(RUN, steps=2, data=str(folder))))
    assert cls["num_classes"] == 10 and cls["heldout_acc"] * 6 == pytest.approx(round(cls["heldout_acc"] * 6))
    no_val = tmp_path / "no_val"
    shutil.copytree(folder / "train", no_val / "train")
    vq = train(TrainConfig("vqvae", str(tmp_path / "vq"), **dict(RUN, steps=2, batch_size=4, data=str(no_val))))
    assert vq["heldout_split"].startswith("none") and "heldout_mse" not in vq
    assert vq["data_train_images"] == 12 and len(_log(tmp_path / "vq")) == 2


def _tree(root: Path, files: list[str]) -> Path:
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            Image.new("RGB", (8, 8)).save(path)
        else:
            path.write_text("x")
    return root


@pytest.mark.parametrize("files, problem", [
    (["images/a.png"], "no train/ directory"),
    (["train/a.png"], "no class directories"),
    (["train/cat/readme.txt", "train/dog/d.png"], "cat holds no images"),
    (["train/cat/c.png", "val/bird/b.png"], r"val has class directories that train/ lacks: \['bird'\]"),
])
def test_bad_folders_are_refused(tmp_path, files, problem):
    root = _tree(tmp_path / "data", files)
    with pytest.raises(ValueError, match=problem) as err:
        scan_folder(root)
    assert "expected PATH/train/<class_dir>/" in str(err.value)


def test_settings_that_do_not_fit_are_refused(folder, tmp_path):
    many = _tree(tmp_path / "many", [f"train/c{i:02d}/x.png" for i in range(11)])
    with pytest.raises(ValueError, match="11 class directories, but preset 'tiny' has 10"):
        train(TrainConfig("classifier", str(tmp_path / "out"), **dict(RUN, steps=1, data=str(many))))
    with pytest.raises(ValueError, match="workers"):
        TrainConfig("var", str(tmp_path / "out"), steps=1, workers=2)
    wrong = VQVAE(VQVAEConfig(ch=32, ch_mult=(1,) * 5, num_res_blocks=1, vocab_size=64, z_channels=8, hit_rows=7))
    torch.save(wrong.state_dict(), tmp_path / "vae16x.pt")  # tiny's vocab and Cvae, but 16x: 128 px for 8x8
    with pytest.raises(ValueError, match="downsamples 16x.*128 px images; preset 'tiny' uses 64 px"):
        train(TrainConfig("var", str(tmp_path / "out"), **dict(RUN, steps=1, data=str(folder),
                                                              vqvae=str(tmp_path / "vae16x.pt"))))


def test_imagenet256_preset_is_the_official_configuration():
    p = T.sizes("imagenet256")
    assert p.vqvae == VQVAEConfig() and p.image_size == 256 and p.num_classes == 1000
    assert p.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert T.var_config("imagenet256", 16) == VARConfig(depth=16)  # width 1024, 16 heads, vocab 4096, Cvae 32
    with torch.device("meta"):
        assert sum(q.numel() for q in VARNet(T.var_config("imagenet256", 16)).parameters()) == 310_283_520  # §6
    # the official vae_ch160v4096z32 state dict (key listing of docs/keys) reads as exactly this preset's VQVAE
    sd = {}
    for line in need(KEYS / "keys_vqvae.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape = line.split("\t")[:2]
        sd[name] = torch.empty(ast.literal_eval(shape), device="meta")  # shapes like "(160, 3, 3, 3)"
    assert VQVAEConfig.from_state_dict(sd) == p.vqvae
    for preset in ("zoo", "tiny", "imagenet256"):  # every preset's image fits its tokenizer's latent
        q = T.sizes(preset)
        assert 2 ** (len(q.vqvae.ch_mult) - 1) * q.patch_nums[-1] == q.image_size
    assert T.hmar_config("imagenet256", 16).n_layers_train == 8  # the official HMAR's 8 private blocks
